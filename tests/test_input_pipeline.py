"""Input pipelines: tf.data/tfds and device-resident, on real CIFAR and ImageNet JPEGs, and the
augmentation the train step applies to what they deliver (`augment`).

CIFAR tests read real CIFAR-10/100 as tfds datasets (fixture `tfds_data_dir`, conftest.py) and
are skipped where it is absent. ImageNet tests build a tiny tfds dataset from the shared sample
photos, and also run on `tfds.testing.mock_data` for imagenet2012. conftest.py gives JAX 8 CPU
devices, so batch sizes here are multiples of 8.
"""

import collections
import os
import pathlib
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

import jpeg_datasets
from resnet_v2_jax import base_config
from resnet_v2_jax import augment, batching, datasets, device_input, inputs, tfds_input

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_config(data_dir, **overrides):
    config = base_config.get_config()
    config.data_dir = data_dir
    config.update(overrides)
    return config


def batch_sharding():
    return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def window_table(originals):
    """{crop bytes: (source, offset_y, offset_x, flipped)} over every 32x32 window of every
    zero-padded original, mirrored or not."""
    pad = augment.CIFAR_PADDING
    size = originals.shape[1]
    table = {}
    for source, image in enumerate(np.pad(originals, ((0, 0), (pad, pad), (pad, pad), (0, 0)))):
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                window = image[dy:dy + size, dx:dx + size]
                table.setdefault(window.tobytes(), (source, dy, dx, False))
                table.setdefault(window[:, ::-1].tobytes(), (source, dy, dx, True))
    return table


def match_crops(batches, table):
    """[steps, batch, 4] (source, dy, dx, flip) of each training image; fails on a non-window."""
    matches = []
    for batch in batches:
        images = np.asarray(batch["image"])
        missing = sum(image.tobytes() not in table for image in images)
        assert missing == 0, f"{missing} crops are not windows of a zero-padded training image"
        matches.append([table[image.tobytes()] for image in images])
    return np.array(matches)


def check_crop_statistics(matches):
    """Offsets uniform on 0..8 and flips with probability 1/2 (within ~4 standard errors)."""
    _, offset_y, offset_x, flips = (matches[..., i].ravel() for i in range(4))
    n = flips.size
    assert abs(flips.mean() - 0.5) < 4 * 0.5 / np.sqrt(n)
    for offsets in (offset_y, offset_x):
        counts = np.bincount(offsets, minlength=9)
        expected = n / 9
        assert ((counts - expected) ** 2 / expected).sum() < 30, counts  # chi2, 8 dof
    return flips.mean(), offset_y.mean(), offset_x.mean()


def image_counts(images):
    return collections.Counter(image.tobytes() for image in images)


def sources(batch, images):
    """Index in `images` of each image of a batch of stored (un-augmented) images."""
    index = {image.tobytes(): i for i, image in enumerate(images)}
    return np.array([index[image.tobytes()] for image in np.asarray(batch["image"])])


def augmented(batches, kind="pad_crop_flip", size=32, color=False):
    """`batches` augmented as the train step does it (`augment.for_training`), keyed by step and
    position in the batch, as uint8."""
    crop = jax.jit(augment.for_training(kind, size, color))
    key = jax.random.PRNGKey(0)
    out = []
    for step, batch in enumerate(batches):
        images = np.asarray(batch["image"])
        keys = augment.example_keys(key, step, 0, len(images))
        out.append({**batch, "image": np.asarray(jnp.round(crop(images, keys))).astype(np.uint8)})
    return out


# --- registry and TF-free imports ------------------------------------------------------------

def test_registry_and_normalize():
    assert datasets.get("cifar10:3.0.2").num_classes == 10
    assert datasets.get("cifar100").mean != datasets.get("cifar10").mean
    assert base_config.imagenet(50).eval_crop_sizes == (224, 320)  # Table 5's two test crops
    with pytest.raises(ValueError, match="supported are cifar10, cifar100, imagenet2012"):
        datasets.get("mnist")
    images = np.full((2, 4, 4, 3), [125, 123, 114], np.uint8)
    cifar10 = datasets.get("cifar10")
    out = datasets.normalize(images, cifar10.mean, cifar10.std, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == images.shape
    expected = (np.array([125, 123, 114]) - np.array([125.3, 123.0, 113.9])) / np.array(
        [63.0, 62.1, 66.7])
    np.testing.assert_allclose(np.asarray(out, np.float32)[0, 0, 0], expected, atol=1e-2)


def test_only_the_tfds_pipeline_imports_tensorflow():
    """Training from `device_input` (npz arrays) needs no TensorFlow: every module but
    `tfds_input` imports without it."""
    modules = sorted(p.stem for p in (REPO / "resnet_v2_jax").glob("*.py")
                     if p.stem not in ("__init__", "tfds_input"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module('resnet_v2_jax.' + m)\n"
            "print(sorted({'tensorflow', 'tensorflow_datasets'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, text=True,
                            capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[]"]
    assert "device_input" in modules and "train" in modules


def test_local_batch_size_errors():
    assert batching.local_batch_size(256, 2, 8) == 128
    with pytest.raises(ValueError, match="device count 8"):
        batching.local_batch_size(100, 1, 8)
    assert [batching.process_share(11, i, 3) for i in range(3)] == [(0, 4), (4, 8), (8, 11)]


def test_the_missing_train_extra_message_fits_the_pipeline():
    """The .npz path needs only tensorboardX, and says so; the tfds path names TensorFlow and
    tfds, and the .npz alternative."""
    npz = base_config.get_config()
    npz.input_pipeline, npz.array_dir = "device_resident", "/data/arrays"
    tfds_config = base_config.get_config()
    tfds_config.input_pipeline = "tfds"
    assert inputs.train_modules(npz) == ("tensorboardX",)
    assert inputs.train_modules(tfds_config) == ("tensorboardX", "tensorflow",
                                                 "tensorflow_datasets")
    assert inputs.not_installed("tensorboardX", npz) == (
        "tensorboardX is not installed: training from .npz arrays needs only it, for the logs: "
        "pip install tensorboardX (or the whole [train] extra: pip install "
        "'resnet_v2_jax[train]')")
    assert inputs.not_installed("tensorflow", tfds_config) == (
        "tensorflow is not installed: reading tfds needs tensorflow and tensorflow_datasets, "
        "and the logs tensorboardX: pip install 'resnet_v2_jax[train]' (or train CIFAR from .npz "
        "arrays, which needs only tensorboardX: --config.input_pipeline=device_resident "
        "--config.array_dir=DIR)")


def test_prefetch_to_device_order_and_errors():
    assert list(inputs.prefetch_to_device(iter(range(10)), lambda x: 2 * x, 3)) == list(
        range(0, 20, 2))

    def failing():
        yield 1
        raise RuntimeError("boom")

    prefetched = inputs.prefetch_to_device(failing(), lambda x: x)
    assert next(prefetched) == 1      # the error, met while reading ahead, waits its turn
    with pytest.raises(RuntimeError, match="boom"):
        next(prefetched)

    # Closing a half-read prefetcher leaves no thread behind, and reads nothing more.
    threads = set(threading.enumerate())
    read = []
    source = (read.append(i) or i for i in range(100))
    half_read = inputs.prefetch_to_device(source, lambda x: x, 2)
    assert [next(half_read) for _ in range(3)] == [0, 1, 2] and read == [0, 1, 2, 3, 4]
    half_read.close()
    assert set(threading.enumerate()) == threads and read == [0, 1, 2, 3, 4]


# --- CIFAR, tf.data ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar10_test(tfds_data_dir):
    return tfds_input.load_split_arrays(make_config(tfds_data_dir), "test")


@pytest.fixture(scope="module")
def small_train(tfds_data_dir):
    """The first 64 CIFAR-10 training images and the table of all their crops."""
    images, labels = tfds_input.load_split_arrays(make_config(tfds_data_dir), "train[:64]")
    return images, labels, window_table(images)


def test_train_batches_shapes_dtypes_and_device_put(tfds_data_dir):
    config = make_config(tfds_data_dir, train_split="train[:1000]", batch_size=64)
    batch = next(tfds_input.create_train_iterator(config))
    assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
    sharding = batch_sharding()
    put = lambda b: jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), b)
    on_device = next(inputs.prefetch_to_device(iter([batch]), put))
    assert on_device["image"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(on_device["image"]), batch["image"])


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_eval_normalisation_gives_zero_mean_unit_std(tfds_data_dir, dataset):
    if not (pathlib.Path(tfds_data_dir) / dataset).is_dir():
        pytest.skip(f"{dataset} is not prepared in {tfds_data_dir}")
    config = make_config(tfds_data_dir, dataset=dataset, eval_batch_size=10_000)
    batch = next(iter(tfds_input.create_eval_iterator(config)))
    assert batch["mask"].all()
    info = datasets.get(dataset)
    images = np.asarray(datasets.normalize(batch["image"], info.mean, info.std))
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=0.05)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=0.05)


@pytest.mark.parametrize("batch_size", [400, 384])  # divides 10,000 or not
def test_eval_covers_test_split_exactly_once(tfds_data_dir, cifar10_test, batch_size):
    images, labels = cifar10_test
    config = make_config(tfds_data_dir, eval_batch_size=batch_size)
    batches = tfds_input.create_eval_iterator(config)
    seen = list(batches)
    assert len(seen) == len(batches) == -(-10_000 // batch_size)
    assert batches.num_examples == 10_000
    mask = np.concatenate([b["mask"] for b in seen])
    assert mask.sum() == 10_000 and all(b["image"].shape[0] == batch_size for b in seen)
    real_labels = np.concatenate([b["label"] for b in seen])[mask]
    np.testing.assert_array_equal(np.bincount(real_labels, minlength=10),
                                  np.bincount(labels, minlength=10))
    real_images = np.concatenate([b["image"] for b in seen])
    assert image_counts(real_images[mask]) == image_counts(images)
    assert not real_images[~mask].any()


def test_eval_two_processes_split_the_test_set(tfds_data_dir, cifar10_test):
    config = make_config(tfds_data_dir, eval_batch_size=384)
    shares = [tfds_input.create_eval_iterator(config, process_index=i, process_count=2)
              for i in range(2)]
    assert len(shares[0]) == len(shares[1]) == -(-5_000 // 192)
    counts = []
    for share in shares:
        batches = list(share)
        assert len(batches) == len(share) and batches[0]["image"].shape[0] == 192
        counts.append(image_counts(np.concatenate([b["image"][b["mask"]] for b in batches])))
    assert sum(counts[0].values()) == sum(counts[1].values()) == 5_000
    assert counts[0] + counts[1] == image_counts(cifar10_test[0])


def test_train_epochs_cover_the_split_in_a_new_order(tfds_data_dir, small_train):
    """tf.data delivers the stored images: one batch of 64 is one epoch of train[:64]."""
    images, labels, _ = small_train
    config = make_config(tfds_data_dir, train_split="train[:64]", batch_size=64)
    batches = take(tfds_input.create_train_iterator(config), 4)
    orders = [sources(batch, images) for batch in batches]
    for batch, order in zip(batches, orders):
        assert sorted(order) == list(range(64))
        np.testing.assert_array_equal(batch["label"], labels[order])
    assert not (orders[0] == orders[1]).all()  # a new order each epoch


def test_train_step_crops_are_uniform_windows_of_the_padded_image(small_train):
    """`augment` (in the train step): every crop is a window of the zero-padded original,
    mirrored or not, offsets uniform on 0..8, flips with probability 1/2."""
    images, _, table = small_train
    batches = augmented([{"image": images}] * 16)
    matches = match_crops(batches, table)
    assert (matches[..., 0] == np.arange(64)).all()  # each crop comes from its own image
    check_crop_statistics(matches)


def test_pad_crop_flip_is_pad_then_window_then_mirror(small_train):
    images = small_train[0][:4]
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for image, big, (y, x, flip) in zip(images, padded, [(4, 4, False), (0, 0, False),
                                                           (8, 3, True), (2, 7, True)]):
        crop = np.asarray(augment.pad_crop_flip(jnp.asarray(image), y, x, flip, 32))
        expected = big[y:y + 32, x:x + 32]
        np.testing.assert_array_equal(crop, expected[:, ::-1] if flip else expected)
    centre = np.asarray(augment.pad_crop_flip(jnp.asarray(images[0]), 4, 4, False, 32))
    np.testing.assert_array_equal(centre, images[0])


def test_train_two_processes_read_disjoint_halves(tfds_data_dir):
    config = make_config(tfds_data_dir, train_split="train[:128]", batch_size=128)
    images, _ = tfds_input.load_split_arrays(config, "train[:128]")
    halves = [set(sources(take(tfds_input.create_train_iterator(
        config, process_index=i, process_count=2), 1)[0], images)) for i in range(2)]
    assert len(halves[0]) == len(halves[1]) == 64
    assert halves[0] | halves[1] == set(range(128))


def test_train_is_deterministic_and_resumes_exactly(tfds_data_dir):
    config = make_config(tfds_data_dir, train_split="train[:100]", batch_size=32)
    first = take(tfds_input.create_train_iterator(config), 6)
    again = take(tfds_input.create_train_iterator(config), 6)
    other = take(tfds_input.create_train_iterator(make_config(
        tfds_data_dir, train_split="train[:100]", batch_size=32, seed=1)), 1)
    assert not np.array_equal(other[0]["image"], first[0]["image"])
    for start in (3, 4):  # step 3 starts mid-epoch and runs into the next one
        resumed = take(tfds_input.create_train_iterator(config, start_step=start), 6 - start)
        for expected, got in zip(first[start:], resumed):
            np.testing.assert_array_equal(expected["image"], got["image"])
            np.testing.assert_array_equal(expected["label"], got["label"])
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])


# --- CIFAR, device-resident -------------------------------------------------------------------

def test_device_resident_epochs_cover_the_split_in_a_new_order(tfds_data_dir, small_train):
    images, labels, _ = small_train
    config = make_config(tfds_data_dir, train_split="train[:64]", batch_size=64)
    sharding = batch_sharding()
    batches = take(device_input.create_train_iterator(config, sharding), 4)
    assert batches[0]["image"].sharding == sharding
    assert batches[0]["image"].dtype == jnp.uint8 and batches[0]["label"].dtype == jnp.int32
    orders = [sources(batch, images) for batch in batches]
    for batch, order in zip(batches, orders):  # one batch = one epoch here
        assert sorted(order) == list(range(64))
        np.testing.assert_array_equal(np.asarray(batch["label"]), labels[order])
    assert not (orders[0] == orders[1]).all()


def test_device_resident_npz_and_resume(tfds_data_dir, small_train, tmp_path):
    images, labels, _ = small_train
    device_input.write_arrays(str(tmp_path), "cifar10", "small", images, labels)
    # 48 per batch = 6 per shard of 8: batches run across epoch ends.
    from_tfds = make_config(tfds_data_dir, train_split="train[:64]", batch_size=48)
    from_npz = make_config(None, train_split="small", batch_size=48, array_dir=str(tmp_path))
    sharding = batch_sharding()
    first = take(device_input.create_train_iterator(from_tfds, sharding), 8)
    same = take(device_input.create_train_iterator(from_npz, sharding), 8)
    resumed = take(device_input.create_train_iterator(from_npz, sharding, start_step=5), 3)
    for expected, got in zip(first, same[:5] + resumed):
        np.testing.assert_array_equal(np.asarray(expected["image"]), np.asarray(got["image"]))
        np.testing.assert_array_equal(np.asarray(expected["label"]), np.asarray(got["label"]))
    with pytest.raises(FileNotFoundError, match="python -m resnet_v2_jax.write_arrays"):
        device_input.load_arrays(from_npz, "missing")


def test_device_eval_equals_tf_data_eval(tfds_data_dir, cifar10_test, monkeypatch):
    config = make_config(tfds_data_dir, eval_batch_size=384)
    monkeypatch.setattr(device_input, "load_arrays", lambda config, split: cifar10_test)
    for index in range(2):
        from_numpy = device_input.create_eval_iterator(config, process_index=index,
                                                       process_count=2)
        from_tf = tfds_input.create_eval_iterator(config, process_index=index,
                                                      process_count=2)
        assert (len(from_numpy), from_numpy.num_examples) == (len(from_tf), 10_000)
        for a, b in zip(from_numpy, from_tf, strict=True):
            for key in ("image", "label", "mask"):
                np.testing.assert_array_equal(a[key], b[key])


# --- ImageNet ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imagenet_samples(shared_data_dir, tmp_path_factory):
    """(config, source files) of a tfds dataset "imagenet_samples": the shared sample photos
    plus a CMYK copy of the first, JPEG bytes stored as they are, one class per file;
    "train" and "validation" hold the same images."""
    root = tmp_path_factory.mktemp("imagenet_samples")
    files = sorted((shared_data_dir / "imagenet_samples").glob("*.JPEG"))
    cmyk = root / "cmyk_copy.JPEG"
    Image.open(files[0]).convert("CMYK").save(cmyk, quality=95)
    files.append(cmyk)
    jpeg_datasets.store_jpeg_dataset("imagenet_samples", files, str(root))
    config = make_config(str(root), dataset="imagenet_samples", eval_split="validation",
                         image_size=224, eval_crop_sizes=(224, 320), augment="scale",
                         batch_size=16, eval_batch_size=16, shuffle_buffer_size=200)
    return config, files


@pytest.mark.parametrize("kind", ["scale", "scale_aspect"])
def test_imagenet_train_on_real_jpegs(imagenet_samples, kind):
    """The host delivers each photo's random window, decoded and resized to the crop size, and
    nothing more: grayscale photos stay gray (no colour augmentation there)."""
    config, files = imagenet_samples
    config = config.copy_and_resolve_references()
    config.augment, config.color_augment = kind, True
    gray = {i for i, f in enumerate(files) if Image.open(f).mode == "L"}
    for batch in take(tfds_input.create_train_iterator(config), 8):  # one epoch
        assert batch["image"].shape == (16, 224, 224, 3) and batch["image"].dtype == np.uint8
        for image, label in zip(batch["image"], batch["label"]):
            if label in gray:
                assert (image[..., 0] == image[..., 1]).all()
                assert (image[..., 1] == image[..., 2]).all()


def colour_reference(image, factors, order, lighting):
    """fb.resnet.torch's colour augmentation in numpy, on a float image in [0, 1]."""
    for which in augment.JITTER_ORDERS[order]:
        gray = image @ np.array(augment.GRAY_WEIGHTS)
        other = (0.0, gray.mean(), gray[..., None])[which]
        image = factors[which] * image + (1 - factors[which]) * other
    rgb = np.array(augment.PCA_EIGVEC) @ (lighting * np.array(augment.PCA_EIGVAL))
    return np.clip(image + rgb, 0, 1)


def test_colour_augmentation_is_fb_resnet_torchs_on_a_real_photo(imagenet_samples):
    """`augment.augment_image` equals the blends in each of the six orders and the PCA lighting,
    written out in numpy, and the flip mirrors."""
    _, files = imagenet_samples
    photo = np.asarray(Image.open(files[1]).convert("RGB").resize((64, 48)), np.uint8)
    for order in range(len(augment.JITTER_ORDERS)):
        draws = {**augment.draw(jax.random.PRNGKey(order)), "order": jnp.int32(order),
                 "flip": jnp.bool_(order % 2)}
        got = np.asarray(augment.augment_image(jnp.asarray(photo), draws, color=True))
        source = photo[:, ::-1] if order % 2 else photo
        expected = 255 * colour_reference(source / 255.0, np.asarray(draws["factors"]), order,
                                          np.asarray(draws["lighting"]))
        np.testing.assert_allclose(got, expected, atol=2e-3)
        assert np.abs(got - photo).mean() > 1  # it did change the image
    draws = jax.vmap(augment.draw)(jax.random.split(jax.random.PRNGKey(0), 400))
    factors = np.asarray(draws["factors"])
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert set(np.asarray(draws["order"])) == set(range(6))
    assert abs(np.asarray(draws["flip"]).mean() - 0.5) < 0.1


def test_imagenet_eval_on_real_jpegs(imagenet_samples):
    config, files = imagenet_samples
    config = config.copy_and_resolve_references()
    config.antialias = True  # as PIL's bicubic resize, the reference below, does
    for crop in (224, 320):
        batches = tfds_input.create_eval_iterator(config, crop)
        seen = list(batches)
        assert batches.num_examples == len(files) == sum(b["mask"].sum() for b in seen)
        images = np.concatenate([b["image"][b["mask"]] for b in seen])
        labels = np.concatenate([b["label"][b["mask"]] for b in seen])
        by_file = dict(zip(labels, images))
        assert images.shape[1:] == (crop, crop, 3) and len(by_file) == len(files)
        for label, path in enumerate(files):
            source = Image.open(path)
            if source.mode == "L":  # grayscale: three equal channels
                image = by_file[label].astype(int)
                assert (image[..., 0] == image[..., 1]).all() and (
                    image[..., 1] == image[..., 2]).all()
            if source.mode == "RGB" and label < 10:
                # Same pixels as PIL's bicubic resize of the centre window (whose geometry
                # test_imagenet_crop_windows_stay_inside_the_image checks).
                width, height = source.size
                side = round(crop * min(width, height) / round(crop / 0.875))
                top, left = (height - side) // 2, (width - side) // 2
                reference = np.asarray(source.crop((left, top, left + side, top + side)).resize(
                    (crop, crop), Image.BICUBIC), np.float32)
                assert np.abs(by_file[label] - reference).mean() < 3, path.name
        # The CMYK copy decodes to (nearly) the RGB original.
        cmyk = by_file[len(files) - 1].astype(np.float32)
        assert np.abs(cmyk - by_file[0]).mean() < 4


def test_imagenet_crop_windows_stay_inside_the_image(imagenet_samples):
    _, files = imagenet_samples
    shapes = np.array([[*Image.open(f).size[::-1], 3] for f in files] * 8, np.int32)
    keys = np.stack([np.arange(len(shapes)), np.zeros(len(shapes))], 1).astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices((shapes, keys))
    windows = {}
    for name, window in (
            ("scale", lambda shape, key: tfds_input.scale_window(shape, key, 224)),
            ("scale_aspect", tfds_input.scale_aspect_window),
            ("center", lambda shape, key: tfds_input.center_window(shape, 320, 0.875))):
        windows[name] = next(iter(ds.map(window).batch(len(shapes)))).numpy()
    height, width = shapes[:, 0], shapes[:, 1]
    shorter = np.minimum(height, width)
    for y, x, h, w in (window.T for window in windows.values()):
        assert (y >= 0).all() and (x >= 0).all() and (h >= 1).all() and (w >= 1).all()
        assert (y + h <= height).all() and (x + w <= width).all()
    y, x, h, w = windows["scale"].T
    assert (h == w).all()
    assert (h >= np.round(224 * shorter / 480)).all() and (h <= np.round(224 * shorter / 256)).all()
    y, x, h, w = windows["scale_aspect"].T
    whole = (h == height) & (w == width)  # fallback when no window was found
    area, aspect = (h * w / (height * width))[~whole], (w / h)[~whole]
    assert whole.mean() < 0.1 and (area >= 0.07).all()
    assert (aspect > 0.7).all() and (aspect < 1.4).all()
    y, x, h, w = windows["center"].T
    np.testing.assert_array_equal(h, np.round(320 * shorter / 366))
    assert (np.abs(2 * y + h - height) <= 1).all() and (np.abs(2 * x + w - width) <= 1).all()


@pytest.fixture
def imagenet_mock(tmp_path):
    """imagenet2012 metadata (split sizes) for `tfds.testing.mock_data`."""
    builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[24], num_bytes=0)
        for split in ("train", "validation")]))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
        yield str(tmp_path)


def test_imagenet2012_mock_data(imagenet_mock):
    config = make_config(imagenet_mock, dataset="imagenet2012", eval_split="validation",
                         image_size=224, eval_crop_sizes=(224, 320), augment="scale_aspect",
                         color_augment=True, batch_size=8, eval_batch_size=16,
                         shuffle_buffer_size=100)
    batch = next(tfds_input.create_train_iterator(config))
    assert batch["image"].shape == (8, 224, 224, 3) and batch["image"].dtype == np.uint8
    assert ((0 <= batch["label"]) & (batch["label"] < 1000)).all()
    for crop in (224, 320):
        batches = list(tfds_input.create_eval_iterator(config, crop))
        assert len(batches) == 2 and sum(b["mask"].sum() for b in batches) == 24
        assert batches[0]["image"].shape == (16, crop, crop, 3)


# --- bad input --------------------------------------------------------------------------------

def test_bad_configs_raise_clear_errors(tfds_data_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="device count 8"):
        tfds_input.create_train_iterator(make_config(tfds_data_dir, batch_size=100))
    with pytest.raises(ValueError, match="process count 3"):
        tfds_input.create_eval_iterator(make_config(tfds_data_dir, eval_batch_size=400),
                                            process_index=0, process_count=3)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        tfds_input.create_train_iterator(make_config(tfds_data_dir, dataset="mnist"))
    with pytest.raises(ValueError, match="stores png images"):
        tfds_input.create_train_iterator(make_config(tfds_data_dir, augment="scale"))
    with pytest.raises(ValueError, match="evaluates images as stored"):
        tfds_input.create_eval_iterator(make_config(tfds_data_dir, eval_batch_size=400), 224)
    with pytest.raises(FileNotFoundError, match='docs/running.md, "Preparing ImageNet"'):
        tfds_input.create_train_iterator(make_config(str(tmp_path), dataset="imagenet2012",
                                                         augment="scale"))

    def offline(self, *args, **kwargs):
        raise ConnectionError("no network")

    # The host answers, the download then fails: the folders tfds created are removed.
    monkeypatch.setattr(tfds_input, "_unreachable_hosts", lambda builder: [])
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(FileNotFoundError, match="could not be downloaded.*tfds build cifar10"):
        tfds_input.create_train_iterator(make_config(str(tmp_path)))
    assert list(tmp_path.iterdir()) == []  # neither attempt left folders behind


def test_an_offline_download_fails_at_once_and_an_answering_host_is_reachable(tmp_path,
                                                                               monkeypatch):
    """Without a route to the download host the one-line error comes before tfds' minutes of
    retries and before any folder exists; an HTTP error status still means the host is there."""
    asked = []

    def no_route(request, timeout):
        asked.append((request.get_method(), request.full_url, timeout))
        raise urllib.error.URLError("Name or service not known")

    def never(self, *args, **kwargs):
        raise AssertionError("download_and_prepare must not start")

    monkeypatch.setattr(urllib.request, "urlopen", no_route)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", never)
    with pytest.raises(FileNotFoundError, match=r"its download host \(www.cs.toronto.edu\) "
                       r"cannot be reached; run `tfds build cifar10"):
        tfds_input.check_data(make_config(str(tmp_path)))
    assert asked == [("HEAD", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", 10.0)]
    assert list(tmp_path.iterdir()) == []

    def forbidden(request, timeout):
        raise urllib.error.HTTPError(request.full_url, 403, "Forbidden", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", forbidden)
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    assert tfds_input._unreachable_hosts(builder) == []  # pylint: disable=protected-access
