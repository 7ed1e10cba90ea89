"""The data stages across processes (``torchrun`` / ``accelerate launch``): share the batches, gather the results.

Under a launcher (``WORLD_SIZE`` > 1) every process runs the same stage code on the same inputs. A loop over
batches (scoring, decoding, MC, drift) first forms its batches exactly as one process would, then each process
takes a share of *whole* batches (:func:`share`, balanced by padded tokens) and works on those; the results are
gathered to every process in the original order (:func:`gather`). A batch therefore holds the same examples
however many processes there are, so the numbers (and the seed of a sampled batch) do not depend on the split.
After the collect, only the first process scores and writes outputs and caches (:func:`is_main`); the others wait
at a :func:`barrier` where a later read needs the file, and return. Every process must call a sharing loop with
the same inputs, in the same order: decisions that read files are taken on every process from files written
before the last barrier.

With ``WORLD_SIZE`` unset or 1 nothing here does anything: no process group, every batch is this process's.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Callable, Sequence, TypeVar

import torch

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The first process alone grades code, writes reports and copies caches while the others wait at a barrier.
TIMEOUT = datetime.timedelta(hours=2)


def launched() -> bool:
    """True when a launcher started several processes (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def start() -> bool:
    """Join the launcher's process group (nccl on GPUs, else gloo) unless one exists; True when distributed."""
    if not launched():
        return initialized()
    if not initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            launch_device("cuda")
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        logger.info("process %d of %d", rank(), world_size())
    return True


def stop() -> None:
    """Wait for every process, then leave the group (processes that exit with a gloo group up can abort at exit)."""
    if initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def world_size() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized():
        torch.distributed.barrier()


def launch_device(device: str | None) -> str:
    """``cpu`` or ``cuda[:LOCAL_RANK]`` (None / ``auto``: CUDA when present); under a launcher, makes this rank's
    GPU the current one first, so no rank creates a CUDA context on GPU 0 (``torch.cuda.is_bf16_supported`` and
    friends use the current device)."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return device


def assign(costs: Sequence[float], world: int) -> list[list[int]]:
    """Batch numbers per process: the costliest batch first, each to the least loaded process (lowest rank on a
    tie); each process's list in batch order. Deterministic: every process computes the same assignment.

    >>> assign([5, 4, 3, 3, 1], 2)
    [[0, 3], [1, 2, 4]]
    """
    loads, owned = [0.0] * world, [[] for _ in range(world)]
    for b in sorted(range(len(costs)), key=lambda b: (-costs[b], b)):
        r = min(range(world), key=lambda r: (loads[r], r))
        loads[r] += costs[b]
        owned[r].append(b)
    return [sorted(o) for o in owned]


def padded_tokens(batch: Sequence[int], lengths: Sequence[int]) -> int:
    """What a right- or left-padded batch costs: its rows times its longest row."""
    return len(batch) * max(lengths[i] for i in batch)


def share(batches: list[list[int]], lengths: Sequence[int]) -> list[list[int]]:
    """This process's batches (all of them in one process), balanced by padded tokens (``lengths`` per item)."""
    if world_size() == 1:
        return batches
    mine = assign([padded_tokens(b, lengths) for b in batches], world_size())[rank()]
    return [batches[b] for b in mine]


def gather(partial: dict[int, T], n: int) -> list[T]:
    """The results of items ``0..n-1`` in order, on every process, from each process's ``{item: result}``."""
    if world_size() > 1:
        parts: list[Any] = [None] * world_size()
        torch.distributed.all_gather_object(parts, partial)
        partial = {i: r for part in parts for i, r in part.items()}
    missing = [i for i in range(n) if i not in partial]
    if missing:
        raise RuntimeError(f"{len(missing)} of {n} items have no result (first: {missing[0]}); the processes did not "
                           "share the same inputs")
    return [partial[i] for i in range(n)]


def on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the first process alone (a stage that only writes files: mask, report); the
    others wait for it and receive its return value."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    box = [fn(*args, **kwargs) if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
