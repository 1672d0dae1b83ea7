"""torchrun plumbing for the multi-GPU configs: join the process group, pick this rank's device, prepare the data
once, and put per-tile evaluation results from all ranks back together.

torchrun starts one process per GPU and describes the job in environment variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT).  Every rank parses the same config, so anything that writes shared files (the fold
cache, the synthetic demo data) must not run on all ranks at once: `in_rank_order` lets global rank 0 do it first,
then the first rank of every other node (for node-local cache folders), then the rest, which find it done.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from ignite.engine import Engine

from scripts.pannuke.datasets import PanNuke
from scripts.scoring.score_handler import PanNukeScoreHandler

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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
        raise RuntimeError(
            f"the multi_gpu_*.json configs must be started by torchrun (missing {', '.join(missing)}), e.g. "
            "torchrun --nproc_per_node 2 -m monai.bundle run training --config_file "
            "\"['configs/train.json','configs/multi_gpu_train.json']\" ..."
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return dist.get_rank()


def in_rank_order(build: Callable[[], T]) -> T:
    """Run `build` on rank 0, then on the first rank of each other node, then on all other ranks, in three turns.

    Shared files are written once, by rank 0; node-local ones once per node; everyone else only reads.  A failure on
    any rank stops every rank at the end of that turn with the failing rank's message, instead of leaving the others
    waiting at a barrier until the collective times out.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return build()
    my_turn = 0 if dist.get_rank() == 0 else 1 if local_rank() == 0 else 2
    result, error = None, None
    for turn in range(3):
        if turn == my_turn:
            try:
                result = build()
            except Exception as e:  # re-raised below, after the other ranks have heard about it
                error = e
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(messages) if message]
        if failed:
            rank, message = failed[0]
            raise RuntimeError(f"rank {rank} failed while preparing the data, so this rank stops too: {message}")
    return result  # type: ignore[return-value]


class DistributedPanNuke(PanNuke):
    """PanNuke for torchrun: folds are checked and cached by one rank first, so no two ranks write the same cache."""

    def __init__(self, *args, **kwargs) -> None:
        in_rank_order(lambda: PanNuke.__init__(self, *args, **kwargs))


def gather_in_sampler_order(items: list[T]) -> list[T]:
    """All ranks' per-item results, in dataset order, on every rank.

    A DistributedSampler without shuffling hands rank r the items r, r + world_size, ... (MONAI's uneven split only
    drops the tail), so interleaving the ranks' lists restores the order a single process would have seen.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    per_rank: list[list[T]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(per_rank, list(items))
    longest = max(len(part) for part in per_rank)
    return [part[i] for i in range(longest) for part in per_rank if i < len(part)]


class GatheredPanNukeScoreHandler(PanNukeScoreHandler):
    """PanNukeScoreHandler for a sharded evaluation: rank 0 scores the rows of every rank, in dataset order.

    Every rank must run it (the gather is collective); only rank 0 writes the tables, logs and TensorBoard scalars.
    """

    def complete(self, engine: Engine) -> None:
        self.rows, self.tissues = gather_in_sampler_order(self.rows), gather_in_sampler_order(self.tissues)
        if not dist.is_initialized() or dist.get_rank() == 0:
            super().complete(engine)
