"""One finished tile's prediction -> its nuclei: the records of the nuclei the tile is responsible for, and their
outlines in level-0 slide pixels.

`tile_nuclei` is the post-processing of one tile: the bundle's instance post-processing (`instances`, the transform
tile inference uses), then the nuclei whose centroid lies in the tile's core (each nucleus is kept once, whole, by
the tile responsible for it), each outline traced and simplified to within `tolerance` pixels. `TileNucleiPool` runs
it in this process or in a pool of CPU processes while the network goes on with the next tiles, and hands results
back in submission order, so the slide's files do not depend on the pool.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Hashable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import torch

from scripts.core.classes import NucleusClasses
from scripts.model.postprocess import NucleiInstancesd
from scripts.workflows.predict.nucleus_record import nucleus_outlines, nucleus_table
from scripts.core.memory import trim_heap
from scripts.model.tiled import Tile


def tile_nuclei(
    instances: NucleiInstancesd,
    pred: np.ndarray,
    tile: Tile,
    classes: NucleusClasses,
    scale: float,
    mpp: float,
    tolerance: float,
) -> tuple[dict, list]:
    """The record table of the nuclei whose centroid lies in the tile's core, and their outlines in level-0 pixels;
    top level so that a process pool can run it."""
    trim_heap()  # the previous tile's arrays are freed by now: hand their pages back (here or in a pool's process)
    inst, inst_types, inst_probs = instances.instances(torch.from_numpy(pred))
    inst = inst.astype(np.int64)
    origin = tile.window[:2]
    table = nucleus_table(inst, inst_types, inst_probs, classes, mpp=mpp, origin=origin, scale=scale, core=tile.core)
    outlines = nucleus_outlines(inst, table["nucleus_id"], origin, scale, tolerance)
    return table, outlines


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
        self.pending: deque[tuple[Hashable, Future]] = deque()

    def submit(self, key: Hashable, pred: np.ndarray, tile: Tile, scale: float, mpp: float) -> None:
        job = (self.instances, pred, tile, self.classes, scale, mpp, self.tolerance)
        future: Future = Future()
        if self.workers <= 0:
            try:
                future.set_result(tile_nuclei(*job))
            except Exception as err:  # noqa: BLE001 - handed back with the tile, as a pool's failure would be
                future.set_exception(err)
        else:
            trim_heap()  # the pool post-processes, so this process's per-tile arrays are the prediction's alone
            if self.pool is None:
                self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            future = self.pool.submit(tile_nuclei, *job)
        self.pending.append((key, future))

    def finished(self, everything: bool = False) -> Iterator[tuple[Hashable, Future]]:
        """Finished tiles in submission order: those done now, the oldest too when more than twice the workers wait
        (so the pool's queue stays bounded), every one with `everything`."""
        block = len(self.pending) > 2 * self.workers
        while self.pending and (everything or block or self.pending[0][1].done()):
            block = False
            key, future = self.pending.popleft()
            future.exception()  # waits for it
            yield key, future

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
