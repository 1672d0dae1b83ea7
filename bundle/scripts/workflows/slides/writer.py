"""Turn each finished tile into the slide's nuclei and write them; finish a slide when its last tile is in.

`SlideNucleiWriterd` is the post-processing of inference_wsi.json. For one tile it runs the bundle's instance post-
processing (`instances`, the same transform tile inference uses) on the network's output, keeps the nuclei whose
centroid lies in the tile's core (each nucleus once, whole), traces each outline, simplifies it to within
`tolerance` pixels (Douglas-Peucker: a few dozen vertices instead of every pixel step), converts it to level-0 slide
pixels and appends it to the slide's GeoJSON and CSV. With `workers` > 0 that work runs in a pool of CPU processes
while the network goes on with the next tiles; results are written in tile order, so the files are the same. As a
handler it finishes slides whose tiles are all in, writes their summary and overlay, and logs the run's summary;
`raise_if_failed` then makes the run exit 1 if a slide failed, after the others were processed.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.transforms import MapTransform
from PIL import Image, ImageDraw

from scripts.core.classes import PANNUKE, NucleusClasses
from scripts.core.atomic import atomic_write
from scripts.workflows.predict.nucleus_record import (
    csv_lines,
    csv_type_id,
    nucleus_features,
    nucleus_outlines,
    nucleus_table,
    renumber,
    renumber_feature,
)
from scripts.model.postprocess import NucleiInstancesd
from scripts.workflows.slides.memory import trim_heap
from scripts.workflows.slides.plan import SlidePlan, SlidePlanner, Tile, rank_share
from scripts.workflows.slides.progress import SlideProgress

logger = logging.getLogger(__name__)


def tile_job(
    instances: NucleiInstancesd,
    pred: np.ndarray,
    tile: Tile,
    classes: NucleusClasses,
    scale: float,
    mpp: float,
    tolerance: float,
):
    """Post-process one tile: the record table of the nuclei whose centroid lies in the tile's core, and their
    outlines in level-0 pixels; top level so that a process pool can run it."""
    trim_heap()  # the previous tile's arrays are freed by now: hand their pages back (here or in a pool's process)
    inst, inst_types, inst_probs = instances.instances(torch.from_numpy(pred))
    inst = inst.astype(np.int64)
    origin = tile.window[:2]
    table = nucleus_table(inst, inst_types, inst_probs, classes, mpp=mpp, origin=origin, scale=scale, core=tile.core)
    outlines = nucleus_outlines(inst, table["nucleus_id"], origin, scale, tolerance)
    return table, outlines


class SlideNucleiWriterd(MapTransform):
    """Post-process one tile and write its nuclei into its slide's outputs (see the module docstring).

    Args:
        slides: the run's `SlidePlanner` (`@slides`).
        instances: the instance post-processing (`@instances`).
        tolerance: polygon simplification, in model pixels.
        model: what made the nuclei (the checkpoint path), for the summary.
        workers: CPU processes that post-process while the network runs (0: in this process).
        classes: the model's classes (`@classes`): type names and colours of every output.
    """

    def __init__(
        self,
        slides: SlidePlanner,
        instances: NucleiInstancesd,
        tolerance: float = 1.0,
        model: str = "",
        workers: int = 0,
        pred_key: str = "pred",
        classes: NucleusClasses = PANNUKE,
    ):
        super().__init__(keys=pred_key)
        self.classes = classes
        self.plans: list[SlidePlan] = slides.plans
        self.instances, self.pred_key = instances, pred_key
        self.tolerance, self.model = float(tolerance), str(model)
        self.workers = int(workers)
        self.pool: ProcessPoolExecutor | None = None
        self.pending: deque = deque()
        self.progress: dict[int, SlideProgress] = {}
        self.started: dict[int, float] = {}
        self.rank, self.world, part = rank_share()
        for index, plan in enumerate(self.plans):
            if plan.slide is not None and not plan.error:
                self.progress[index] = progress = SlideProgress(plan.folder, plan.name, part)
                progress.resume()
                if not plan.todo and self.world == 1:
                    self._finish(index)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        index, tile_index = int(d["slide"]), int(d["tile"])
        plan = self.plans[index]
        if plan.error:
            return d
        if d.get("error"):
            plan.error = str(d["error"])
            logger.error(f"{plan.name}: FAILED, {plan.error}")
            self.progress[index].close()
            return d
        self.started.setdefault(index, time.perf_counter())
        pred = d.pop(self.pred_key)
        pred = (pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)).detach().cpu().numpy()
        job = (
            self.instances,
            pred,
            plan.tiles[tile_index],
            self.classes,
            plan.slide.scale,
            plan.slide.target_mpp,
            self.tolerance,
        )
        if self.workers <= 0:
            self._write(index, tile_index, tile_job(*job))
            return d
        trim_heap()  # the pool post-processes, so this process's per-tile arrays are the prediction's alone
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        self.pending.append((index, tile_index, self.pool.submit(tile_job, *job)))
        self.drain(block=len(self.pending) > 2 * self.workers)
        return d

    def drain(self, block: bool = False, everything: bool = False) -> None:
        """Write finished tiles in submission order; wait for the oldest if `block`, for all if `everything`."""
        while self.pending and (everything or block or self.pending[0][2].done()):
            index, tile_index, future = self.pending.popleft()
            block = False
            plan = self.plans[index]
            if plan.error:
                continue
            try:
                nuclei = future.result()
            except Exception as err:  # noqa: BLE001 - a worker's failure (or its death) fails its slide only
                plan.error = f"{plan.path}: post-processing tile {tile_index} failed ({type(err).__name__}: {err})"
                logger.error(f"{plan.name}: FAILED, {plan.error}")
                self.progress[index].close()
                continue
            self._write(index, tile_index, nuclei)

    def _write(self, index: int, tile_index: int, nuclei: tuple) -> None:
        plan, progress = self.plans[index], self.progress[index]
        table, outlines = nuclei
        table = renumber(table, progress.nuclei + 1)
        features = [_text(f) for f in nucleus_features(table, outlines, self.classes)]
        progress.add_tile(tile_index, features, csv_lines(table), table["type_id"].tolist())
        if self.world == 1 and len(progress.done) == len(plan.tiles):
            self._finish(index)

    def _finish(self, index: int) -> None:
        plan, progress = self.plans[index], self.progress[index]
        seconds = time.perf_counter() - self.started.get(index, time.perf_counter())
        counts = progress.per_type + [0] * (self.classes.num_types - len(progress.per_type))
        per_type = dict(zip(self.classes.names, counts, strict=True))
        mm2 = max(plan.tissue_mm2, 1e-12)
        summary = {
            "slide": str(plan.path),
            "mpp": plan.mpp,
            "model_mpp": plan.slide.target_mpp,
            "level_read": plan.slide.level_for_model(),
            "reader": plan.slide.backend,
            "model": self.model,
            "tissue_mm2": round(plan.tissue_mm2, 4),
            "tiles": len(plan.tiles),
            "nuclei": progress.nuclei,
            "nuclei_per_type": per_type,
            "density_per_mm2": {k: round(v / mm2, 2) for k, v in {"all": progress.nuclei, **per_type}.items()},
            "seconds_this_run": round(seconds, 2),
        }
        progress.finish(summary)
        _overlay_png(plan, progress, self.classes)
        plan.slide.close()
        logger.info(f"{plan.name}: {progress.nuclei} nuclei on {plan.tissue_mm2:.2f} mm² of tissue -> {plan.folder}")

    def attach(self, engine: Engine) -> None:
        """Nothing to attach: `complete` runs after the evaluator, even when this process had no tile to do (ignite
        fires no COMPLETED event for an empty data loader)."""

    def complete(self) -> None:
        """After the evaluator: write what the pool still holds, put ranks' shares together, log the summary."""
        self.close_pool()
        if self.world > 1:
            self.merge_ranks()
        self.summarise()

    def close_pool(self, engine: Engine | None = None) -> None:
        """Write every tile still in the pool, then stop the pool."""
        self.drain(everything=True)
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def merge_ranks(self, engine: Engine | None = None) -> None:
        """Under torchrun: once every rank has written its share of the tiles, rank 0 puts each slide together in
        tile order, numbering nuclei as one process would, so the files are exactly a single process's."""
        for progress in self.progress.values():
            progress.close()
        errors: list[dict[int, str]] = [{}] * self.world
        dist.all_gather_object(errors, {i: p.error for i, p in enumerate(self.plans) if p.error})
        for found in errors:
            for index, error in found.items():
                self.plans[index].error = self.plans[index].error or error
        if self.rank == 0:
            for index in self.progress:
                if not self.plans[index].error:
                    self._merge(index)
        dist.barrier()

    def _merge(self, index: int) -> None:
        plan = self.plans[index]
        parts = [SlideProgress(plan.folder, plan.name, f".rank{r}of{self.world}") for r in range(self.world)]
        ranges = [part.tile_ranges() for part in parts]
        whole = SlideProgress(plan.folder, plan.name)
        whole.reset()
        files = [
            (open(p.partial["geojson"], "rb"), open(p.partial["csv"], "rb")) if ranges[r] else (None, None)
            for r, p in enumerate(parts)
        ]
        try:
            for tile in plan.tiles:
                r = (tile.index + plan.number) % self.world
                g0, g1, c0, c1 = ranges[r][tile.index]
                geojson, csv_file = files[r]
                geojson.seek(g0)
                text = geojson.read(g1 - g0).decode("utf-8").removeprefix(",\n")
                csv_file.seek(c0)
                lines = csv_file.read(c1 - c0).decode("utf-8").splitlines(keepends=True)
                features, rows, types = [], [], []
                for n, (feature, row) in enumerate(zip(json.loads(f"[{text}]"), lines, strict=True)):
                    nucleus_id = whole.nuclei + n + 1
                    features.append(_text(renumber_feature(feature, nucleus_id)))
                    rows.append(str(nucleus_id) + row[row.index(",") :])
                    types.append(csv_type_id(row))
                whole.add_tile(tile.index, features, rows, types)
        finally:
            for pair in files:
                for f in pair:
                    if f is not None:
                        f.close()
        self.progress[index] = whole
        self._finish(index)
        for part in parts:
            part.remove()

    def summarise(self, engine: Engine | None = None) -> None:
        failed = [p for p in self.plans if p.error]
        logger.info(f"slides: {len(self.plans) - len(failed)} done, {len(failed)} failed")
        for plan in failed:
            logger.error(f"  {plan.error}")

    def raise_if_failed(self) -> None:
        failed = [p for p in self.plans if p.error]
        if failed:
            raise SystemExit(f"{len(failed)} of {len(self.plans)} slides failed (see the log)")


def default_workers(device: torch.device) -> int:
    """Post-processing processes: none on a CPU (torch already uses every core), else half the cores shared by the
    ranks of this machine."""
    if torch.device(device).type == "cpu":
        return 0
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, (os.cpu_count() or 2) // (2 * ranks_here))


def _text(feature: dict) -> str:
    return json.dumps(feature, separators=(",", ":"), ensure_ascii=False)


def _overlay_png(plan: SlidePlan, progress: SlideProgress, classes: NucleusClasses) -> None:
    """The thumbnail with a dot per nucleus in its type's colour, read back from the CSV in one pass."""
    thumb, factor = plan.slide.thumbnail(1024)
    picture = Image.fromarray(thumb)
    draw = ImageDraw.Draw(picture)
    per_model_px = 1.0 / (factor * plan.slide.scale)  # thumbnail pixels per level-0 pixel
    with open(progress.csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            x, y = float(row["x_px"]) * per_model_px, float(row["y_px"]) * per_model_px
            type_id = min(max(int(row["type_id"]), 1), classes.num_types)
            draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=tuple(classes.colour(type_id)))
    atomic_write(Path(plan.folder) / f"{plan.name}_overlay.png", lambda tmp: picture.save(tmp, format="PNG"))
