"""How a global batch and a split are shared among processes and devices: the arithmetic the
data-parallel code (`parallel`) and both input pipelines (`tfds_input`, `device_input`) keep.

A global batch splits evenly over processes and devices (`local_batch_size`); a process reads a
contiguous share of a split (`process_share`); an evaluation is one exact pass whose tail is
padded and masked, never dropped (`EvalBatches`, `eval_num_batches`).
"""

import dataclasses
import math
from typing import Callable, Iterator, Optional, Tuple

import jax

from resnet_v2_jax import errors


def local_batch_size(global_batch: int, process_count: int, device_count: int,
                     name: str = "batch_size") -> int:
    """This process's share of a global batch; raises unless every device gets the same."""
    if global_batch < 1 or global_batch % device_count or global_batch % process_count:
        raise errors.ConfigError(f"global {name}={global_batch} must be a positive multiple of the "
                                 f"device count {device_count} (and of the process count "
                                 f"{process_count})")
    return global_batch // process_count


def resolve_process(process_index: Optional[int],
                    process_count: Optional[int]) -> Tuple[int, int]:
    """(index, count) of this process; None means JAX's (tests pass values to simulate hosts)."""
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def process_share(num_examples: int, process_index: int, process_count: int) -> Tuple[int, int]:
    """[start, stop) of this process's share: contiguous, sizes differ by at most one, larger
    shares first (the convention of `tfds.even_splits` with drop_remainder=False)."""
    small, extra = divmod(num_examples, process_count)
    start = process_index * small + min(process_index, extra)
    return start, start + small + (process_index < extra)


@dataclasses.dataclass(frozen=True)
class EvalBatches:
    """One exact pass over an eval split, in per-process batches {"image", "label", "mask"}.

    Iterate it once per evaluation (each `iter()` starts a fresh pass). Every process yields
    `num_batches` batches, so collectives inside the eval step line up on every host; the
    tail is padded with zero images whose `mask` is False, never dropped. `num_examples` is
    the number of real examples over all processes (the mask sum).
    """
    make_iterator: Callable[[], Iterator[dict]]
    num_batches: int
    num_examples: int

    def __iter__(self):
        return self.make_iterator()

    def __len__(self):
        return self.num_batches


def eval_num_batches(num_examples: int, process_count: int, local_batch: int) -> int:
    """Batches per process: enough for the largest process share."""
    return math.ceil(math.ceil(num_examples / process_count) / local_batch)
