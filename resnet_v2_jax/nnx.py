"""The networks as Flax NNX modules: the factories and options of `models`, for NNX codebases.

    import optax
    from flax import nnx
    from resnet_v2_jax import nnx as resnet_nnx

    model = resnet_nnx.cifar_resnet(164, num_classes=10, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, images, labels):
        def loss_fn(model):
            logits = model(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()   # BN normalises with batch statistics and updates its running averages
    model.eval()    # BN normalises with the running averages; the dropout shortcut is off
    evaluation = nnx.view(model, use_running_average=True, deterministic=True)  # a view, likewise

    probe = nnx.view(model, use_running_average=True, deterministic=True, intermediates=True)
    probe(images)
    features = nnx.pop(probe, nnx.Intermediate)  # {"stem": ..., "stage1": ..., ...}: NHWC maps

Each NNX network holds its variables as NNX `Param`s and `BatchStat`s and runs the linen
`models.ResNetV2` on them (a bridge in the manner of `flax.nnx.bridge.ToNNX`, but updating the
BN statistics in place, so the module graph never changes and `nnx.cached_partial` works): the
paper's units have one implementation, and the NNX and linen forms give the same logits on the
same weights. The variables keep the linen names (`model.params["stage1_unit1"]["conv1"]`)
and convert both ways with `to_linen` / `from_linen`: a checkpoint of a training run
(`weights.load` of an exported file, or `resnet_v2_jax.export`), or timm weights
(`resnet_v2_jax.timm_import.load`), load into NNX, and NNX-trained weights go back to linen.
The jitted NNX train step compiles to the linen one. Around it, nnx.jit's traversal of the
module costs about 3 ms per call on a 2-core CPU (ResNet-20), `nnx.cached_partial` removes it
(`benchmarks/nnx_vs_linen.py`; README, "Use in your own code").
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_v2_jax import errors, models


class ResNetV2(nnx.Module):
    """An NNX module holding the variables of the linen network `network` (a `models.ResNetV2`)
    and running it.

    Args:
        network: the linen network, e.g. `models.cifar_resnet(110, block="basic")`.
        rngs: `nnx.Rngs` for the initial parameters ("params" or the default stream) and, for
            the dropout shortcut, the stream it draws from in training ("dropout", else default).
        variables: linen variables {"params", "batch_stats"} to hold instead of initial ones
            (see `from_linen`, which checks them).
        input_shape: the shape of the example batch the variables are created from; only the
            channel count matters (the networks end in a global average pool).

    Attributes:
        params: the parameters, `nnx.Param`s under the linen names
            (`model.params["stage1_unit1"]["conv1"]["kernel"]`).
        batch_stats: BN running averages, `nnx.BatchStat`s, updated in place in training mode.
        use_running_average: False in training mode (the default, as for Flax's NNX BatchNorm),
            True after `.eval()`.
        deterministic: the dropout shortcut's switch (False in training mode, as for NNX's
            Dropout). The linen network runs BN and dropout in one mode (`train`), so a
            dropout-shortcut network refuses a call where the two disagree.
        intermediates: when True, a call sows the stem's and each stage's output as
            `nnx.Intermediate`s (`stem`, `stage1`, ...), as linen sows them into its
            "intermediates" collection; read them with `nnx.pop(model, nnx.Intermediate)`.

    `.train()`, `.eval()` and `nnx.view(model, use_running_average=..., deterministic=...,
    intermediates=...)` set these (`set_view`).
    """

    def __init__(self, network: models.ResNetV2, *, rngs: nnx.Rngs,
                 variables: Optional[Dict[str, Any]] = None,
                 input_shape: Sequence[int] = (1, 32, 32, 3)):
        if variables is None:
            variables = _init(network, input_shape)(rngs.params())
        self.network = network  # a frozen dataclass: static in NNX's graph
        self.params = nnx.data(jax.tree.map(nnx.Param, variables["params"]))
        self.batch_stats = nnx.data(jax.tree.map(nnx.BatchStat,
                                                 variables.get("batch_stats", {})))
        self.rngs = rngs.fork() if network.shortcut == "dropout" else None
        self.use_running_average = False
        self.deterministic = False
        self.intermediates = False

    def set_view(self, use_running_average: Optional[bool] = None,
                 deterministic: Optional[bool] = None,
                 intermediates: Optional[bool] = None) -> None:
        """What `nnx.view` sets; None leaves an attribute as it is (`nnx.view_info` reads this).

        Args:
          use_running_average: if True, BN normalises with its running averages and leaves
            them as they are (evaluation); if False, with the batch's statistics, and updates
            the averages (training).
          deterministic: if True, the dropout shortcut (Table 1) is off; it runs in BN's mode.
          intermediates: if True, each call sows the stem's and every stage's output as
            `nnx.Intermediate` (the linen network's "intermediates").
        """
        for name, value in (("use_running_average", use_running_average),
                            ("deterministic", deterministic), ("intermediates", intermediates)):
            if value is not None:
                setattr(self, name, value)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Logits (or pooled features, for num_classes=None) of images [B, H, W, 3]."""
        train = not self.use_running_average
        if self.rngs is not None and self.deterministic == train:
            raise ValueError(f"use_running_average={self.use_running_average} with "
                             f"deterministic={self.deterministic}: the dropout shortcut runs in "
                             "BN's mode; set both (.train(), .eval() or nnx.view with both)")
        variables = {"params": _values(self.params), "batch_stats": _values(self.batch_stats)}
        mutable = (["batch_stats"] if train else []) + (
            ["intermediates"] if self.intermediates else [])
        rngs = {"dropout": self.rngs.dropout()} if train and self.rngs is not None else None
        logits, updates = self.network.apply(variables, images, train=train, rngs=rngs,
                                             mutable=mutable)
        if train:
            jax.tree.map(lambda var, new: var.set_value(new), self.batch_stats,
                         updates.get("batch_stats", {}), is_leaf=_is_variable)
        for name, (value,) in updates.get("intermediates", {}).items():
            self.sow(nnx.Intermediate, name, value)
        return logits


def cifar_resnet(depth: int, num_classes: Optional[int] = 10, *, rngs: nnx.Rngs,
                 **options) -> ResNetV2:
    """`models.cifar_resnet` as an NNX module (same arguments, plus `rngs`)."""
    return ResNetV2(models.cifar_resnet(depth, num_classes, **options), rngs=rngs)


def imagenet_resnet(depth: int, num_classes: Optional[int] = 1000, *, rngs: nnx.Rngs,
                    **options) -> ResNetV2:
    """`models.imagenet_resnet` as an NNX module (same arguments, plus `rngs`)."""
    return ResNetV2(models.imagenet_resnet(depth, num_classes, **options), rngs=rngs)


def to_linen(model: ResNetV2) -> Tuple[models.ResNetV2, Dict[str, Any]]:
    """(linen network, variables {"params", "batch_stats"}) of an NNX network: what
    `network.apply(variables, images, train=False)` takes, and what checkpoints hold."""
    return model.network, {"params": _values(model.params),
                           "batch_stats": _values(model.batch_stats)}


def from_linen(network: models.ResNetV2, variables: Dict[str, Any], *,
               rngs: Optional[nnx.Rngs] = None, drop_head: bool = False) -> ResNetV2:
    """The NNX form of `network` holding `variables` (linen layout, e.g. from `weights.load`,
    `timm_import.load` or a checkpoint). Every variable must be there, with the network's
    shapes; anything else is refused with a one-line ValueError naming the difference.
    `drop_head=True` lets a headless `network` (num_classes=None) take a classifier's
    variables, leaving out its head (as linen's `apply` ignores it)."""
    expected = jax.eval_shape(_init(network, (1, 32, 32, 3)), jax.random.key(0))
    params = variables.get("params", {})
    if models.HEAD in params and network.num_classes is None:
        if not drop_head:
            raise errors.WeightsError(
                f"these params hold a classifier ({models.HEAD!r}) and the network "
                "is headless (num_classes=None): pass drop_head=True to leave it out")
        variables = {**variables, "params": {k: v for k, v in params.items()
                                             if k != models.HEAD}}
    collections = ("params", "batch_stats")  # no "batch_stats" without BatchNorm
    for collection in collections:
        _check_same_layout(collection, expected.get(collection, {}),
                           variables.get(collection, {}))
    variables = jax.tree.map(lambda want, have: jnp.asarray(have, want.dtype),
                             {c: expected.get(c, {}) for c in collections},
                             {c: variables.get(c, {}) for c in collections})
    return ResNetV2(network, rngs=rngs or nnx.Rngs(0), variables=variables)


def _init(network: models.ResNetV2, input_shape: Sequence[int]):
    """rng -> the network's initial variables, jitted (eager init of a deep net is slow)."""
    images = jnp.zeros(input_shape, network.dtype)
    return jax.jit(lambda rng: network.init(rng, images, train=False))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _values(tree):
    """The arrays of a tree of `nnx.Variable`s."""
    return jax.tree.map(lambda var: var.get_value(), tree, is_leaf=_is_variable)


def _check_same_layout(collection: str, expected, given) -> None:
    flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): np.shape(v)
                         for path, v in jax.tree_util.tree_leaves_with_path(tree)}
    want, have = flat(expected), flat(given)
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    shapes = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if missing or extra or shapes:
        parts = [f"missing {missing[:3]}" if missing else "",
                 f"unexpected {extra[:3]}" if extra else "",
                 ", ".join(f"{k} is {have[k]}, the network has {want[k]}" for k in shapes[:3])]
        raise errors.WeightsError(f"these {collection} do not fit the network: "
                                  + "; ".join(p for p in parts if p))
