"""timm ResNetV2 weight import: parity with timm's outputs, and clear errors on bad input.

The tiny-network checks read tests/fixtures/timm_tiny_resnetv2.npz (made by
make_timm_fixture.py) and need no torch. The full-size resnetv2_50 / resnetv2_101 checks run
only where torch and timm import, e.g. in a separate venv with the project on PYTHONPATH:

        PYTHONPATH=. /tmp/timmvenv/bin/python -m pytest tests/test_timm_import.py -s
"""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_v2_jax import models, timm_import

FIXTURE = Path(__file__).parent / "fixtures" / "timm_tiny_resnetv2.npz"
BIT_FIXTURE = Path(__file__).parent / "fixtures" / "timm_tiny_resnetv2_bit.npz"


def _fixture():
    """The fixture's arrays, with the state dict and batch statistics as dicts."""
    data = np.load(FIXTURE)
    ref = {k: data[k] for k in data.files if "/" not in k}
    for group in ("state_dict", "batch_stats"):
        ref[group] = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(group + "/")}
    return ref


def _max_diff(a, b, relative=False) -> float:
    """Max abs difference of two trees; with `relative`, relative where |b| > 1."""
    diffs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        y = np.asarray(y)
        diff = np.abs(np.asarray(x) - y)
        diffs.append(np.max(diff / np.maximum(1.0, np.abs(y)) if relative else diff))
    return float(max(diffs))


def _parity(ref, **options):
    """Max abs differences to timm's reference: eval logits, train logits, batch statistics.

    Batch statistics: with bn_momentum=0 a train-mode apply stores each BN's batch mean and
    (biased) variance as its running statistics; they are compared with timm's, converted,
    relative to their size where it exceeds 1 (deep variances reach ~10).
    """
    with jax.default_matmul_precision("float32"):
        model, variables = timm_import.load(ref["state_dict"], **options)
        eval_logits = model.apply(variables, ref["images"], train=False)
        model = model.clone(bn_momentum=0.0)
        train_logits, updates = model.apply(variables, ref["images"], train=True,
                                            mutable=["batch_stats"])
    expected = timm_import.convert_state_dict({**ref["state_dict"], **ref["batch_stats"]}, model)
    return (_max_diff(eval_logits, ref["eval_logits"]),
            _max_diff(train_logits, ref["train_logits"]),
            _max_diff(updates["batch_stats"], expected["batch_stats"], relative=True))


@pytest.mark.parametrize("scan_units", [False, True])
def test_tiny_fixture_matches_timm(scan_units):
    eval_diff, train_diff, stats_diff = _parity(_fixture(), scan_units=scan_units)
    assert eval_diff < 1e-4 and train_diff < 1e-4 and stats_diff < 1e-4


def test_model_from_state_dict_reads_the_shape():
    model = timm_import.model_from_state_dict(_fixture()["state_dict"])
    assert (tuple(model.stage_sizes), tuple(model.widths)) == ((1, 1, 2), (32, 64, 128))
    assert (model.stem_width, model.num_classes, model.bottleneck) == (16, 5, True)


def test_missing_and_unexpected_keys_are_named():
    state_dict = dict(_fixture()["state_dict"])
    del state_dict["stages.1.blocks.0.conv2.weight"]
    state_dict["stem.norm.extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing stages\.1\.blocks\.0\.conv2\.weight; "
                                         r"unexpected stem\.norm\.extra"):
        timm_import.load(state_dict)


def test_wrong_shape_is_named():
    state_dict = _fixture()["state_dict"]
    model = timm_import.model_from_state_dict(state_dict).clone(widths=(32, 64, 256))
    with pytest.raises(ValueError, match=r"timm \S+ of shape \(128,?.*\) does not fit"):
        timm_import.convert_state_dict(state_dict, model)
    # The right number of values in the wrong number of axes (a damaged file): named, not
    # "axes don't match array" from the transpose.
    state_dict = dict(state_dict)
    name = next(k for k, v in state_dict.items() if k.endswith("conv2.weight"))
    state_dict[name] = state_dict[name].reshape(-1)
    with pytest.raises(ValueError, match=rf"^timm {re.escape(name)} of shape \(\d+,\) \(float32\) "
                                         r"does not fit the model's params/\S+/conv2/kernel"):
        timm_import.load(state_dict)


def _mixed_norms(state_dict):
    """One norm layer without running statistics among BatchNorms."""
    return {k: v for k, v in state_dict.items() if not k.startswith("norm.running")}


def _deep_stem(state_dict):
    state_dict = dict(state_dict)
    state_dict["stem.conv1.weight"] = state_dict.pop("stem.conv.weight")
    return state_dict


def _post_activation(state_dict):
    return {**state_dict, "stem.norm.weight": np.ones(16, np.float32)}


@pytest.mark.parametrize("variant, message", [
    (_mixed_norms, "mixes norm layers"), (_deep_stem, "deep 3x3 stem"),
    (_post_activation, "post-activation")])
def test_unsupported_timm_variants_are_refused(variant, message):
    state_dict = variant(_fixture()["state_dict"])
    for convert in (timm_import.model_from_state_dict,
                    lambda sd: timm_import.convert_state_dict(sd, models.imagenet_resnet(
                        50, stem_norm="after_pool"))):
        with pytest.raises(ValueError, match=message):
            convert(state_dict)


def test_paper_stem_is_refused():
    with pytest.raises(ValueError, match="stem_norm='after_pool'"):
        timm_import.convert_state_dict(_fixture()["state_dict"], models.imagenet_resnet(50))


@pytest.mark.parametrize("name", ["resnetv2_50", "resnetv2_101"])
def test_full_size_matches_timm(name):
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from tests.fixtures.make_timm_fixture import randomise, timm_outputs

    model = timm.create_model(name, pretrained=False)
    # 128x128 leaves 4x4 maps in the last stage: smaller batches make the train-mode comparison
    # ill-conditioned, and both sides' float32 rounding then nears 1e-4 at 101 layers.
    shape = (2, 3, 128, 128)
    randomise(model, shape)
    ref = timm_outputs(model, torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    eval_diff, train_diff, stats_diff = _parity(ref)
    print(f"{name}: max abs diff eval logits {eval_diff:.2e}, train logits {train_diff:.2e}, "
          f"batch statistics {stats_diff:.2e} (rel.)")
    # Deep batch variances carry float32 rounding of ~4e-5 (relative) on each side, measured
    # against a float64 timm run; hence the looser bound on them.
    assert eval_diff < 1e-4 and train_diff < 1e-4 and stats_diff < 2e-4


# --- BiT: GroupNorm, weight-standardised convs, the zero-padded stem pool ------------------------

def _bit_parity(ref, **options):
    """Max abs difference of the eval logits to timm's, and between train and eval mode."""
    with jax.default_matmul_precision("float32"):
        model, variables = timm_import.load(ref["state_dict"], **options)
        eval_logits = model.apply(variables, ref["images"], train=False)
        train_logits = model.apply(variables, ref["images"], train=True)
    assert set(variables) == {"params"}  # GroupNorm keeps no statistics
    return _max_diff(eval_logits, ref["eval_logits"]), _max_diff(train_logits, eval_logits)


@pytest.mark.parametrize("scan_units", [False, True])
def test_tiny_bit_fixture_matches_timm(scan_units):
    data = np.load(BIT_FIXTURE)
    ref = {"state_dict": {k.split("/", 1)[1]: data[k] for k in data.files if "/" in k},
           "images": data["images"], "eval_logits": data["eval_logits"]}
    model = timm_import.model_from_state_dict(ref["state_dict"],
                                              norm_groups=int(data["num_groups"]))
    assert (model.norm, model.conv, model.stem_pool_pad) == ("group", "weight_standardized",
                                                             "zero")
    eval_diff, train_diff = _bit_parity(ref, norm_groups=int(data["num_groups"]),
                                        scan_units=scan_units)
    assert eval_diff < 1e-4 and train_diff == 0.0
    with pytest.raises(ValueError, match="the timm state dict is a BiT network"):
        timm_import.convert_state_dict(ref["state_dict"],
                                       models.imagenet_resnet(50, stem_norm="after_pool"))


@pytest.mark.parametrize("name", ["resnetv2_50x1_bit"])
def test_full_size_bit_matches_timm(name):
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from tests.fixtures.make_timm_fixture import bit_outputs, randomise_bit

    model = timm.create_model(name, pretrained=False)
    randomise_bit(model)
    ref = bit_outputs(model, torch.randn((2, 3, 128, 128),
                                         generator=torch.Generator().manual_seed(1)))
    eval_diff, train_diff = _bit_parity(ref)
    print(f"{name}: max abs diff of eval logits to timm {eval_diff:.2e}")
    assert eval_diff < 1e-4 and train_diff == 0.0
