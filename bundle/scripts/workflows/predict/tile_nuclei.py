"""One finished tile's prediction -> its nuclei, for images and slides alike: the records of the nuclei the tile
is responsible for, their outlines in input pixels and, for an image, its label map.

`tile_nuclei` is the post-processing of one tile: the bundle's instance post-processing (`instances`), then the
nuclei whose centroid lies in the tile's core (each nucleus is kept once, whole, by the tile responsible for it;
an image analysed whole is one tile whose core is the image, so it keeps every nucleus), each outline traced and
simplified to within `tolerance` pixels. `TileNucleiPool` runs it in this process or in a pool of CPU processes
while the network goes on with the next tiles, and hands results back in submission order, so the outputs do not
depend on the pool.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Hashable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from scripts.core.classes import NucleusClasses
from scripts.model.postprocess import NucleiInstancesd
from scripts.workflows.predict.nucleus_record import nucleus_outlines, nucleus_table
from scripts.core.memory import trim_heap
from scripts.model.tiled import Tile


# predictions waiting for the pool: about one 60 MP image's (7 float32 channels), some 50 slide windows' of 1152²
MAX_PENDING_BYTES = 2**31


class TileJob(NamedTuple):
    """A tile handed to the post-processing: `key` says to the outputs whose tile it is (an image's name, a slide's
    (slide, tile)); `scale` is input pixels per model pixel (1 for an image), `mpp` µm per model pixel."""

    key: Hashable
    tile: Tile
    scale: float
    mpp: float


@dataclass
class TileNuclei:
    """The nuclei of one tile: `table` (the nucleus record's columns, by label id), `outlines` (one ring each, input
    pixels) and, where asked for, `labels`: the tile's core as a label map holding those nuclei alone."""

    table: dict
    outlines: list
    labels: np.ndarray | None = None


def tile_nuclei(
    instances: NucleiInstancesd,
    pred: np.ndarray,
    tile: Tile,
    classes: NucleusClasses,
    scale: float,
    mpp: float,
    tolerance: float,
    label_map: bool = False,
) -> TileNuclei:
    """The nuclei whose centroid lies in the tile's core (see the module docstring); top level so that a process
    pool can run it."""
    trim_heap()  # the previous tile's arrays are freed by now: hand their pages back (here or in a pool's process)
    inst, inst_types, inst_probs = instances.instances(torch.from_numpy(pred))
    origin = tile.window[:2]
    table = nucleus_table(inst, inst_types, inst_probs, classes, mpp=mpp, origin=origin, scale=scale, core=tile.core)
    outlines = nucleus_outlines(inst, table["nucleus_id"], origin, scale, tolerance)
    labels = None
    if label_map and tile.core == tile.window:  # an image analysed whole: every nucleus is its own
        labels = inst
    elif label_map:
        (x, y, w, h), (wx, wy) = tile.core, origin
        labels = inst[y - wy : y - wy + h, x - wx : x - wx + w]
        labels = np.where(np.isin(labels, table["nucleus_id"]), labels, 0)
    return TileNuclei(table, outlines, labels)


class TileNucleiPool:
    """`tile_nuclei` for each submitted tile, in this process (`workers` 0) or in `workers` spawned processes.

    Args:
        instances: the instance post-processing (`@instances`).
        classes: the model's classes (`@classes`).
        tolerance: polygon simplification, in model pixels (`@polygon_tolerance`).
        workers: CPU processes that post-process while the network runs (0: in this process).
    """

    def __init__(self, instances: NucleiInstancesd, classes: NucleusClasses, tolerance: float = 1.0, workers: int = 0):
        self.instances, self.classes = instances, classes
        self.tolerance, self.workers = float(tolerance), int(workers)
        self.pool: ProcessPoolExecutor | None = None
        self.pending: deque[tuple[TileJob, Future, int]] = deque()  # with the bytes of its prediction
        self.pending_bytes = 0

    def submit(self, job: TileJob, pred: np.ndarray, label_map: bool = False) -> None:
        """Post-process `pred`, the network's output on `job.tile`'s window; `label_map`: hand back its label map."""
        args = (self.instances, pred, job.tile, self.classes, job.scale, job.mpp, self.tolerance, label_map)
        future: Future = Future()
        if self.workers <= 0:
            try:
                future.set_result(tile_nuclei(*args))
            except Exception as err:  # noqa: BLE001 - handed back with the tile, as a pool's failure would be
                future.set_exception(err)
        else:
            trim_heap()  # the pool post-processes, so this process's per-tile arrays are the prediction's alone
            if self.pool is None:
                self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            try:
                future = self.pool.submit(tile_nuclei, *args)
            except BrokenProcessPool:  # a worker died (killed, out of memory) since the last tile: a new pool
                self.pool.shutdown(wait=False)
                self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
                future = self.pool.submit(tile_nuclei, *args)
        self.pending.append((job, future, pred.nbytes))
        self.pending_bytes += pred.nbytes

    def finished(self, everything: bool = False) -> Iterator[tuple[TileJob, Future]]:
        """Finished tiles in submission order: those done now, the oldest too while more than twice the workers
        wait or their predictions hold more than `MAX_PENDING_BYTES` (so the queue stays bounded, for a folder of
        large images too), every one with `everything`."""
        while self.pending:
            job, future, size = self.pending[0]
            full = len(self.pending) > 2 * self.workers or self.pending_bytes > MAX_PENDING_BYTES
            if not (everything or full or future.done()):
                return
            self.pending.popleft()
            self.pending_bytes -= size
            if isinstance(future.exception(), BrokenProcessPool) and self.pool is not None:  # waits for it
                self.pool.shutdown(wait=False)  # a worker died: what it held fails, the next tile gets a new pool
                self.pool = None
            yield job, future

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


def default_workers(device: torch.device) -> int:
    """Post-processing processes: none on a CPU (torch already uses every core), else half the cores shared by the
    ranks of this machine."""
    if torch.device(device).type == "cpu":
        return 0
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, (os.cpu_count() or 2) // (2 * ranks_here))
