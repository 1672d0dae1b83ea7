"""torchrun plumbing: join the process group, pick this rank's device, prepare the data once, and put per-tile
evaluation results from all ranks back together.

The bundle's own handlers and datasets call these helpers themselves, so they are right on 1 or N processes without
an overlay swapping their classes (as MONAI's MetricsSaver is): the data is prepared `in_rank_order`, scores are
gathered in dataset order, files are written by the main rank only.  MONAI's logging and TensorBoard handlers are
switched off on the other ranks through train.json's named id `secondary_rank`.

torchrun starts one process per GPU and describes the job in environment variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT).  Every rank parses the same config, so anything that writes shared files (the fold
cache, the synthetic demo data) must not run on all ranks at once: `in_rank_order` lets global rank 0 do it first,
then the first rank of every other node (for node-local cache folders), then the rest, which find it done.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from scripts.core.errors import BundleError, ConfigError, DataError

T = TypeVar("T")
# ranks wait for one another at the end of a slide run while rank 0 merges every slide: longer than the default
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_rank() -> bool:
    """True in a single process and on global rank 0 of a torchrun job: the one that writes shared outputs."""
    return not is_distributed() or dist.get_rank() == 0


def is_secondary_rank() -> bool:
    """True on every rank of a torchrun job but rank 0 (train.json's `secondary_rank`, which disables handlers)."""
    return not is_main_rank()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_device() -> torch.device:
    """cuda:LOCAL_RANK when GPUs are visible (one process per GPU), else the CPU (gloo runs, tests)."""
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed() -> int:
    """Join the process group torchrun set up: NCCL between GPUs, gloo on CPU. Returns this process's rank."""
    if dist.is_initialized():
        return dist.get_rank()
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(
            f"the multi_gpu_*.json configs must be started by torchrun (missing {', '.join(missing)}), e.g. "
            "torchrun --nproc_per_node 2 -m monai.bundle run training --config_file "
            "\"['configs/train.json','configs/multi_gpu_train.json']\" ..."
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
        dist.init_process_group(backend="nccl", timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank()


def join_ranks() -> int:
    """What the multi_gpu_*.json overlays run once the options are checked (named id `join_ranks`; null without
    torchrun): join the process group, and keep the log of every rank but 0 to warnings and errors, so that one
    rank speaks for the job.  Returns this process's rank."""
    rank = init_distributed()
    logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return rank


def leave_ranks() -> None:
    """The overlays' `finalize`: every rank waits for the others, then leaves the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def in_rank_order(build: Callable[[], T], what: str = "preparing the data") -> T:
    """Run `build` on rank 0, then on the first rank of each other node, then on all other ranks, in three turns.

    Shared files are written once, by rank 0; node-local ones once per node; everyone else only reads.  A failure on
    any rank stops every rank at the end of that turn with the failing rank's message, instead of leaving the others
    waiting at a barrier until the collective times out.
    """
    if not is_distributed():
        return build()
    my_turn = 0 if dist.get_rank() == 0 else 1 if local_rank() == 0 else 2
    result, error = None, None
    for turn in range(3):
        if turn == my_turn:
            try:
                result = build()
            except Exception as e:  # re-raised below, after the other ranks have heard about it
                error = e
        messages: list[tuple[bool, str] | None] = [None] * dist.get_world_size()
        report = None if error is None else (isinstance(error, BundleError), f"{type(error).__name__}: {error}")
        dist.all_gather_object(messages, report)
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(messages) if message]
        if failed:
            rank, (expected, message) = failed[0]
            text = f"rank {rank} failed while {what}, so this rank stops too: {message}"
            raise DataError(text) if expected else RuntimeError(text)
    return result  # type: ignore[return-value]


def gather_in_sampler_order(items: list[T]) -> list[T]:
    """All ranks' per-item results, in dataset order, on every rank.

    A DistributedSampler without shuffling hands rank r the items r, r + world_size, ... (MONAI's uneven split only
    drops the tail), so interleaving the ranks' lists restores the order a single process would have seen.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return list(items)
    per_rank: list[list[T]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(per_rank, list(items))
    longest = max(len(part) for part in per_rank)
    return [part[i] for i in range(longest) for part in per_rank if i < len(part)]
