"""BiT checkpoints (big_vision's bit_paper and the original release) against big_vision's own
logits: tests/fixtures/big_vision_tiny_bit.npz, made by make_big_vision_fixture.py from
big_vision's unchanged `bit_paper.Model`."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_v2_jax import big_vision_import, models, pretrained, timm_import

FIXTURE = Path(__file__).parent / "fixtures" / "big_vision_tiny_bit.npz"


def _fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def big_vision_arrays():
    """The weights as a big_vision npz checkpoint holds them (`params/block1/unit01/...`)."""
    return {k: v for k, v in _fixture().items() if k.startswith("params/")}


def release_arrays():
    """The same weights as the original BiT release names and shapes them: GroupNorm gamma and
    beta of shape (C,), the head a 1x1 conv (the names are big_vision's converter's, checked by
    the fixture's maker)."""
    data = _fixture()
    arrays = {}
    for key, name in zip(data["release_keys"], data["release_names"]):
        value = data[f"params/{name}"]
        if "group_norm" in key:
            value = value.reshape(-1)
        elif key.endswith("head/conv2d/kernel"):
            value = value[None, None]
        arrays[str(key)] = value
    return arrays


FORMATS = {"big_vision": big_vision_arrays, "release": release_arrays}


@pytest.mark.parametrize("scan_units", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("form", FORMATS)
def test_tiny_fixture_matches_big_vision(form, scan_units):
    data = _fixture()
    model, variables = big_vision_import.load(FORMATS[form](), scan_units=scan_units)
    assert set(variables) == {"params"}
    logits = model.apply(variables, jnp.asarray(data["images"]), train=False)
    np.testing.assert_allclose(logits, data["logits"], atol=2e-6, rtol=0)
    # timm's StdConv2d epsilon (1e-8) or timm's zero-padded pool would be other networks; the
    # padding shows at this size, the epsilon only in the last digits of these weights.
    zero_pad = model.clone(stem_pool_pad="zero").apply(variables, jnp.asarray(data["images"]),
                                                       train=False)
    assert np.abs(zero_pad - data["logits"]).max() > 1e-3


def test_the_network_is_read_from_the_checkpoint():
    model = big_vision_import.model_from_arrays(release_arrays())
    assert (tuple(model.stage_sizes), tuple(model.widths), model.stem_width, model.num_classes) \
        == ((2, 1), (128, 256), 32, 5)
    assert {k: getattr(model, k) for k in big_vision_import.BIG_VISION_OPTIONS} \
        == big_vision_import.BIG_VISION_OPTIONS
    headless = {k: v for k, v in big_vision_arrays().items() if "/head/" not in k}
    model, variables = big_vision_import.load(headless)
    assert model.num_classes is None and models.HEAD not in variables["params"]


def test_missing_unexpected_and_misshapen_arrays_are_named():
    arrays = big_vision_arrays()
    arrays.pop("params/block2/unit01/conv_proj/kernel")
    arrays["params/block1/unit01/gn9/scale"] = np.ones((1, 1, 1, 32), np.float32)
    with pytest.raises(ValueError, match=r"^BiT checkpoint does not fit the model: missing "
                                         r"block2/unit01/conv_proj/kernel; unexpected "
                                         r"block1/unit01/gn9/scale$"):
        big_vision_import.load(arrays)
    arrays = big_vision_arrays()
    arrays["params/block1/unit02/conv2/kernel"] = np.ones((3, 3, 32, 16), np.float32)
    with pytest.raises(ValueError, match=r"BiT block1/unit02/conv2/kernel of shape \(3, 3, 32, 16"
                                         r"\) \(float32\) does not fit the model's params/"
                                         r"stage1_unit2/conv2/kernel: expected \(3, 3, 32, 32\)"):
        big_vision_import.load(arrays)
    arrays["params/block1/unit02/conv2/kernel"] = np.array(["x"])   # a damaged file's text
    with pytest.raises(ValueError, match=r"conv2/kernel of shape \(1,\) \(<U1\) does not fit "
                                         r"the model's params/stage1_unit2/conv2/kernel"):
        big_vision_import.load(arrays)
    with pytest.raises(ValueError, match="^not a BiT checkpoint: need root_block/conv_root"):
        big_vision_import.load({"params/head/kernel": np.ones((4, 5))})


def test_another_network_is_refused_by_its_options():
    arrays = big_vision_arrays()
    timm_bit = big_vision_import.model_from_arrays(arrays, conv_epsilon=1e-8,
                                                   stem_pool_pad="zero")
    with pytest.raises(ValueError, match=r"BiT checkpoints need models.ResNetV2 with .*; the model "
                                         r"has conv_epsilon=1e-08, stem_pool_pad='zero'$"):
        big_vision_import.convert(arrays, timm_bit)
    timm_state_dict = {"stem.conv.weight": np.ones((8, 3, 7, 7))}
    assert big_vision_import.is_big_vision(release_arrays())
    assert not big_vision_import.is_big_vision(timm_state_dict)
    assert timm_import.BIT_OPTIONS["stem_pool_pad"] != big_vision_import.BIG_VISION_OPTIONS[
        "stem_pool_pad"]


@pytest.mark.parametrize("form", FORMATS)
def test_an_npz_file_loads_and_starts_a_fine_tuning(form, tmp_path):
    """What `--config.init_from=BiT-M-R50x1.npz` does: the file is recognised, its network
    built, and its backbone copied into a network of other classes."""
    path = tmp_path / "bit.npz"
    arrays = FORMATS[form]()
    if form == "big_vision":  # a training checkpoint: the optimiser's state is not read
        arrays["opt/state/block1/unit01/conv1/kernel"] = np.zeros((1, 1, 32, 32), np.float16)
    np.savez(path, **arrays)
    data = _fixture()
    model, variables = pretrained.load_file(str(path))
    np.testing.assert_allclose(model.apply(variables, jnp.asarray(data["images"]), train=False),
                               data["logits"], atol=2e-6, rtol=0)
    target = model.clone(num_classes=7)
    fresh = jax.jit(lambda rng: target.init(rng, jnp.zeros((1, 32, 32, 3)), train=False))(
        jax.random.key(1))
    started = pretrained.initialize_from(str(path), fresh, target)
    assert started["params"]["head"]["kernel"].shape == (256, 7)
    np.testing.assert_array_equal(started["params"]["stage2_unit1"]["conv2"]["kernel"],
                                  variables["params"]["stage2_unit1"]["conv2"]["kernel"])


@pytest.mark.parametrize("depth", [50])
def test_full_size_matches_big_vision(depth):
    """BiT-R50x1 against big_vision's own network, where big_vision is on the path (it is no
    package; see make_big_vision_fixture.py): random weights, two 128 px images, both formats."""
    pytest.importorskip("big_vision.models.bit_paper")
    from tests.fixtures.make_big_vision_fixture import big_vision_outputs, release_name
    images = np.random.RandomState(1).uniform(-1.0, 1.0, (2, 128, 128, 3)).astype(np.float32)
    flat, logits = big_vision_outputs(images, num_classes=1000, width=1, depth=depth)
    for arrays in (flat, dict(release_name(n, v) for n, v in flat.items())):
        model, variables = big_vision_import.load(arrays)
        ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
        np.testing.assert_allclose(ours, logits, atol=5e-5 * np.abs(logits).max(), rtol=0)
