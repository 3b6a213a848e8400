"""Weights from elsewhere, and their transfer into a new network (`--config.init_from`).

Sources (`initialize_from` takes any of them; `load_file` reads files, `runs.read_run` runs):

* a run's workdir or one of its checkpoint step folders;

* a file written by `python -m resnet_v2_jax.export` (`weights.save`): safetensors holding the
  network's options;
* a timm ResNetV2 state dict (`resnetv2_50`, `resnetv2_101`, `resnetv2_50x1_bit`, ...; see
  `timm_import`): `.safetensors` (what the Hugging Face hub serves as `model.safetensors`),
  `.npz`, or `.pth` where torch is installed;
* a BiT checkpoint `.npz`, of the original release (`BiT-M-R50x1.npz`) or of big_vision's
  `bit_paper` models (see `big_vision_import`).

`transfer` copies the backbone, every variable outside the classifier, into a freshly
initialised network of the same architecture: the usual fine-tuning start (docs/paper.md,
"ImageNet networks", for the networks). The classifier head is kept when its shape matches and
re-initialised otherwise (another class count).
"""

import dataclasses
import os
import tempfile
import zipfile
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from resnet_v2_jax import (big_vision_import, errors, models, rundir, timm_import, unit_layout,
                           weights)

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


@dataclasses.dataclass(frozen=True)
class Source:
    """Weights to start from: their network, variables {"params", "batch_stats"}, and where
    they came from (for messages)."""
    model: models.ResNetV2
    variables: Dict[str, Any]
    where: str


def load_source(source: str, target: Optional[models.ResNetV2] = None,
                run: Optional[int] = None) -> Source:
    """The weights of `source`: a run's workdir or step folder (`runs.read_run`; of a workdir
    of several runs, run `run`), or a weights file (`load_file`). With `target`, also checks
    that they fit it (`check_fits`), so that a run refuses a wrong source before it writes
    anything."""
    path = rundir.resolve(source)
    if not path.exists():
        raise errors.NotFoundError(f"init_from {path} does not exist: give a run's workdir, a step "
                                   "folder <workdir>/checkpoints/<step> or a weights file")
    if path.is_dir():
        from resnet_v2_jax import runs  # the training stack: only for this source
        read = runs.one_run(runs.read_run(str(path), run=run), "--config.init_from_run")
        where = read.checkpoint if run is None else f"{read.checkpoint} (run {run})"
        loaded = Source(read.model, read.variables, where)
    else:
        loaded = Source(*load_file(str(path)), str(path))
    check_finite(loaded.variables, loaded.where)
    if target is not None:
        check_fits(loaded.model, target, loaded.where)
    return loaded


def check_finite(variables: Dict[str, Any], where: str) -> None:
    """Raises a one-line `errors.WeightsError` naming the first tensor of `variables` that holds
    NaN or Inf: such weights would train on silently (ReLU hides NaN) until the run diverged."""
    for name, value in traverse_util.flatten_dict(variables, sep="/").items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            continue
        finite = np.isfinite(value)
        if not finite.all():
            bad = value.size - int(finite.sum())
            raise errors.WeightsError(
                f"init_from {where}: {name} holds {bad} NaN or Inf value(s) of "
                f"{value.size}; these weights cannot start a run: give another "
                "checkpoint or file")


def transfer_from(source: Source, variables: Dict[str, Any],
                  model: models.ResNetV2) -> Dict[str, Any]:
    """`variables` (freshly initialised, of `model`) with the backbone of `source` (`transfer`),
    logging what was copied."""
    variables, summary = transfer(source.model, source.variables, model, variables, source.where)
    logging.info("%s", summary)
    return variables


def initialize_from(source: str, variables: Dict[str, Any],
                    model: models.ResNetV2) -> Dict[str, Any]:
    """`variables` (freshly initialised, of `model`) with the backbone of `source`: a run's
    workdir or step folder, or a weights file. See `transfer`."""
    return transfer_from(load_source(source, model), variables, model)


def load_file(path: str) -> Tuple[models.ResNetV2, Dict[str, Any]]:
    """(model, variables) of a weights file: this project's export, a timm state dict or a BiT
    checkpoint. Raises a one-line `errors.WeightsError` naming the file when it is none of them
    (a run's folder included: `load_source` reads both)."""
    if rundir.resolve(path).is_dir():
        raise errors.WeightsError(
            f"{path} is a folder, not a weights file: read a run with "
            "pretrained.load_source (or start from it with --config.init_from)")
    if "://" in path:  # safetensors, numpy and torch open local files: read a copy of it
        with tempfile.TemporaryDirectory() as folder:
            local = os.path.join(folder, epath.Path(path).name)
            epath.Path(local).write_bytes(epath.Path(path).read_bytes())
            try:
                return load_file(local)
            except (errors.WeightsError, errors.ConfigError) as e:  # named as given
                raise type(e)(str(e).replace(local, path)) from e
    state_dict = _read_state_dict(path)
    if state_dict is None:
        return weights.load(path)
    try:
        if big_vision_import.is_big_vision(state_dict):
            return big_vision_import.load(state_dict)
        return timm_import.load(state_dict)
    except (errors.WeightsError, errors.ConfigError) as e:
        raise errors.WeightsError(f"{path}: {e}") from e


def _read_state_dict(path: str) -> Optional[Dict[str, Any]]:
    """The arrays of a timm state dict or BiT checkpoint file; None for this project's own
    safetensors files."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.numpy import load_file as read_tensors
        try:
            with safe_open(path, framework="numpy") as f:
                ours = (f.metadata() or {}).get("format") == weights.FILE_FORMAT
            return None if ours else read_tensors(path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise errors.WeightsError(f"{path} is not a readable safetensors file ({e})") from e
    if path.endswith(".npz"):
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise errors.WeightsError(
                f"{path} is not a readable state dict of arrays "
                f"({str(e).splitlines()[0][:120]}); give timm weights saved with "
                "numpy.savez, .safetensors or .pth, or a BiT .npz") from e
    if path.endswith(TORCH_SUFFIXES):
        try:
            import torch
        except ImportError as e:
            raise errors.SetupError(
                f"{path} is a PyTorch file and torch is not installed: pip install "
                "'resnet_v2_jax[timm]', or save the state dict as .safetensors") from e
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = state_dict.get("state_dict", state_dict)
        return {k: v.numpy() for k, v in state_dict.items()}
    raise errors.WeightsError(
        f"{path}: weights files are .safetensors (resnet_v2_jax.export, or timm), "
        f".npz (timm state dicts, BiT checkpoints) or {'/'.join(TORCH_SUFFIXES)} "
        "(timm state dicts)")


def transfer(source: models.ResNetV2, source_variables: Dict[str, Any], target: models.ResNetV2,
             target_variables: Dict[str, Any], where: str) -> Tuple[Dict[str, Any], str]:
    """`target_variables` with every backbone variable replaced by `source_variables`' (and the
    head too where its shape matches). Returns (variables, a one-line summary). Raises a
    one-line `errors.WeightsError` naming what differs when `source` is another network
    (`check_fits`)."""
    check_fits(source, target, where)
    if source.scan_units != target.scan_units:
        convert = (unit_layout.unrolled_to_scanned if target.scan_units
                   else unit_layout.scanned_to_unrolled)
        source_variables = convert(source_variables)

    copied, head = 0, "none"
    out = {}
    for collection, tree in target_variables.items():
        given = source_variables.get(collection, {})
        out[collection] = dict(tree)
        for name, value in tree.items():
            fits = name in given and _shapes(given[name]) == _shapes(value)
            if name == models.HEAD:
                head = "kept" if fits else (
                    f"re-initialised ({_classes(source)} classes there, {_classes(target)} here)")
                if not fits:
                    continue
            elif not fits:  # same options, different tensors: a file that lies about its net
                raise errors.WeightsError(
                    f"init_from {where}: {collection}/{name} does not fit the "
                    "network (shapes differ)")
            out[collection][name] = jax.tree.map(lambda t, s: jnp.asarray(s, t.dtype),
                                                 value, given[name])
            copied += len(jax.tree.leaves(value))
    return out, f"init_from {where}: copied {copied} tensors; classifier head {head}"


def check_fits(source: models.ResNetV2, target: models.ResNetV2, where: str) -> None:
    """Raises a one-line `errors.WeightsError` naming what differs unless `source`'s weights can
    start `target`: the same `weights.signature` but the number of classes (the head is what
    fine-tuning replaces)."""
    differ = [f"{k} {a!r} there vs {b!r} here" for k, a, b in weights.signature_differences(
        weights.signature(source), weights.signature(target)) if k != "num_classes"]
    if differ:
        raise errors.WeightsError(f"init_from {where} is another network ({'; '.join(differ)}); "
                                  "set the config's model section to the source's")


def _shapes(tree):
    return jax.tree.map(np.shape, tree)


def _classes(model: models.ResNetV2):
    return model.num_classes if model.num_classes is not None else "no"
