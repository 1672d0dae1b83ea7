"""Each slide's outputs as its tiles' nuclei come in from the one writer (predict/writer.py): the GeoJSON and CSV
(through `SlideProgress`), then, when its last tile is in, the summary JSON and the overlay; under torchrun the ranks'
shares put together (merge.py); the run's summary and exit status at the end.  A tile the reader could not read, or
whose post-processing or writing failed, fails its slide; the other slides go on."""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Hashable, Mapping
from pathlib import Path

from PIL import Image, ImageDraw

from scripts.core.atomic import atomic_write
from scripts.core.classes import NucleusClasses
from scripts.core.errors import root_cause
from scripts.workflows.predict.nucleus_record import csv_lines, feature_text, nucleus_features, renumber
from scripts.workflows.predict.tile_nuclei import TileJob, TileNuclei
from scripts.workflows.slides.merge import merge_ranks
from scripts.workflows.slides.plan import SlidePlan, SlidePlanner, rank_share
from scripts.workflows.slides.progress import SlideProgress

logger = logging.getLogger(__name__)


class SlideOutputs:
    """The files of every slide in the run, and which slides failed.

    Args:
        slides: the run's `SlidePlanner` (`@slides`).
        classes: the model's classes (`@classes`): type names and colours of every output.
        model: what made the nuclei (the checkpoint path), for the summary.
    """

    label_maps = False  # a slide's nuclei are its records and outlines; a label map of a slide would not fit

    def __init__(self, slides: SlidePlanner, classes: NucleusClasses, model: str = "") -> None:
        self.plans: list[SlidePlan] = slides.plans
        self.classes, self.model = classes, str(model)
        self.progress: dict[int, SlideProgress] = {}
        self.started: dict[int, float] = {}
        self.rank, self.world, part = rank_share()
        for index, plan in enumerate(self.plans):
            if plan.slide is not None and not plan.error:
                self.progress[index] = progress = SlideProgress(plan.folder, plan.name, part)
                progress.resume()
                if not plan.todo and self.world == 1:
                    self.finish(index)

    def start(self, data: Mapping[Hashable, object]) -> TileJob | None:
        """The tile of a decollated item, whose prediction the writer post-processes next; None for a tile of a
        failed slide (the tile that could not be read fails it here)."""
        index, tile_index = int(data["slide"]), int(data["tile"])
        plan = self.plans[index]
        if plan.error:
            return None
        if data.get("error"):
            self.fail(index, str(data["error"]))
            return None
        self.started.setdefault(index, time.perf_counter())  # the slide's time counts from its first tile
        return TileJob((index, tile_index), plan.tiles[tile_index], plan.slide.scale, plan.slide.target_mpp)

    def given_up(self, key: Hashable) -> bool:
        return bool(self.plans[key[0]].error)

    def fail(self, index: int, error: str) -> None:
        """The slide is given up with `error`; what it wrote so far stays for a later run to go on from."""
        plan = self.plans[index]
        plan.error = error
        logger.error(f"{plan.name}: FAILED, {error}")
        self.progress[index].close()

    def tile_failed(self, job: TileJob, error: BaseException) -> None:
        """A tile's post-processing (or a worker's death) or writing raised `error`: its slide fails."""
        index = job.key[0]
        self.fail(index, f"{self.plans[index].path}: tile {job.tile.index} failed ({root_cause(error)})")

    def add(self, job: TileJob, nuclei: TileNuclei) -> None:
        """Append one tile's nuclei (numbered after the slide's earlier ones); finish the slide on its last tile."""
        index = job.key[0]
        plan, progress = self.plans[index], self.progress[index]
        table = renumber(nuclei.table, progress.nuclei + 1)
        features = [feature_text(f) for f in nucleus_features(table, nuclei.outlines, self.classes)]
        progress.add_tile(job.tile.index, features, csv_lines(table), table["type_id"].tolist())
        if self.world == 1 and len(progress.done) == len(plan.tiles):
            self.finish(index)

    def finish(self, index: int) -> None:
        """The summary (whose presence marks the slide finished) and the overlay."""
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
        overlay_png(plan, progress, self.classes)
        plan.slide.close()
        logger.info(f"{plan.name}: {progress.nuclei} nuclei on {plan.tissue_mm2:.2f} mm² of tissue -> {plan.folder}")

    def finish_run(self) -> None:
        """After the last tile: put the ranks' shares together under torchrun, then log the run's summary."""
        if self.world > 1:
            merge_ranks(self.plans, self.progress, self.rank, self.world, self.finish)
        for index, progress in self.progress.items():  # tiles that never reached the writer: the slide is not done
            plan = self.plans[index]
            if self.world == 1 and not plan.error and not progress.finished():
                self.fail(index, f"{plan.path}: {len(plan.tiles) - len(progress.done)} tiles never reached the writer")
        failed = [p for p in self.plans if p.error]
        logger.info(f"slides: {len(self.plans) - len(failed)} done, {len(failed)} failed")
        for plan in failed:
            logger.error(f"  {plan.error}")

    def raise_if_failed(self) -> None:
        """Exit with status 1 (no traceback) when a slide failed, after the others were processed."""
        failed = [p for p in self.plans if p.error]
        if failed:
            raise SystemExit(f"{len(failed)} of {len(self.plans)} slides failed (see the log)")


def overlay_png(plan: SlidePlan, progress: SlideProgress, classes: NucleusClasses) -> None:
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
