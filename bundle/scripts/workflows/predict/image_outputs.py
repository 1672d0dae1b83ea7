"""Each image's inference outputs, written into `<output_dir>/<name>/` once its nuclei are in, and the run's summary.

Per image (name = the input file's stem):
    <name>_instances.tif    lossless label map, one id per nucleus, same H x W as the input (uint16 / uint32)
    <name>_types.tif        type id 1..K per nucleus pixel, 0 = background
    <name>_nuclei.geojson   QuPath detections, one classified polygon per nucleus
    <name>_nuclei.csv       one row per nucleus: the nucleus record (nucleus_record.py), as slides write it
    <name>_overlay.png      the input with each nucleus outlined in its type colour
    <name>_instances.nii.gz the label map as NIfTI, only with save_nifti=True
and for the run, `<output_dir>/inference_summary.csv`: one row per image (done, skipped or failed, nuclei, seconds).

An image is one tile of the one writer (writer.py): its core is the whole image, so it keeps every nucleus.  What
happens to each image is its outcome: skipped before anything is read when its outputs are complete (`plan`, unless
`overwrite`), failed when its file cannot be read or its post-processing or writing fails (the others go on), else
done; the run's summary lists them, and `raise_if_failed` makes the run exit with status 1 after a failure.

An image's outputs are complete or absent: they are all written into a hidden staging folder next to the image's
folder and moved into place only when every one of them was written, so a full disk or a crash mid-way leaves the
previous state (and no staging folder: it is removed on failure).  While the files are moved in, a `.incomplete`
flag sits in the image's folder, so a kill between two moves (a mixed old/new set) is not taken for a complete one:
the next run redoes the image.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Hashable, Mapping
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from scripts.core.atomic import require_inside, require_writable, write_csv_rows
from scripts.core.classes import PANNUKE, NucleusClasses
from scripts.core.errors import InferenceError, root_cause
from scripts.core.flags import as_bool
from scripts.model.tiled import Tile
from scripts.workflows.predict.inputs import InputImage
from scripts.workflows.predict.nuclei_writers import overlay_png, write_label_nifti, write_label_tiff
from scripts.workflows.predict.nucleus_record import nucleus_features, write_nuclei_csv, write_nuclei_geojson
from scripts.workflows.predict.tile_nuclei import TileJob, TileNuclei

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = {
    "instances": "_instances.tif",
    "types": "_types.tif",
    "geojson": "_nuclei.geojson",
    "csv": "_nuclei.csv",
    "overlay": "_overlay.png",
}
NIFTI_SUFFIX = "_instances.nii.gz"
INCOMPLETE_FLAG = ".incomplete"  # present in an image's folder while its outputs are being moved in
SUMMARY_FILE = "inference_summary.csv"


@dataclass
class ImageOutcome:
    name: str
    source: str
    status: str  # "done", "skipped" or "failed" ("pending" until then)
    nuclei: int | None = None
    seconds: float | None = None
    detail: str = ""


def _rgb(value: object) -> np.ndarray:
    """(H, W, 3) uint8 from the untouched copy of the input the config keeps next to the network's image."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected the input copy as (H, W, 3) uint8, got {array.shape} {array.dtype}")
    return array


class ImageOutputs:
    """The files listed in the module docstring for every image of the run, and each image's outcome; existing
    outputs are never replaced without `overwrite`.

    Args:
        output_dir: one folder per image goes here (`@output_dir`).
        overwrite: replace an image's existing outputs (`@overwrite`).
        save_nifti: also write the instance map as NIfTI (`@save_nifti`).
        mpp: µm per pixel of the input images, for the µm columns (`@mpp`).
        classes: the model's classes (`@classes`): type names and colours in the GeoJSON, CSV and overlay.
    """

    label_maps = True  # the writer hands each image's label map over with its nuclei

    def __init__(
        self,
        output_dir: str,
        overwrite: bool = False,
        save_nifti: bool = False,
        mpp: float = 0.25,
        classes: NucleusClasses = PANNUKE,
        summary_file: str | None = SUMMARY_FILE,
    ) -> None:
        self.classes = classes
        self.output_dir = require_writable(output_dir, "output_dir")
        self.mpp = float(mpp)
        self.overwrite = as_bool(overwrite, "overwrite")  # --overwrite false must not mean True
        self.save_nifti = as_bool(save_nifti, "save_nifti")
        self.summary_file = summary_file
        self.outcomes: dict[str, ImageOutcome] = {}
        self.started: dict[str, float] = {}
        self.images: dict[str, np.ndarray] = {}  # the input of each image whose nuclei are still to come

    # ------------------------------------------------------------ what is on disk

    def paths(self, name: str) -> dict[str, Path]:
        """Every file written for the image `name`."""
        folder = self.output_dir / name
        paths = {kind: folder / f"{name}{suffix}" for kind, suffix in OUTPUT_SUFFIXES.items()}
        if self.save_nifti:
            paths["nifti"] = folder / f"{name}{NIFTI_SUFFIX}"
        return paths

    def existing(self, name: str) -> list[Path]:
        """Outputs of `name` already on disk."""
        return [p for p in self.paths(name).values() if p.exists()]

    def missing(self, name: str) -> list[Path]:
        """Outputs of `name` not on disk (the NIfTI copy, an option, does not make a set incomplete)."""
        return [p for kind, p in self.paths(name).items() if kind != "nifti" and not p.exists()]

    def complete(self, name: str) -> bool:
        """Every output of `name` is on disk and no move into its folder was interrupted: a run without overwrite
        leaves such an image alone."""
        return not self.missing(name) and not (self.output_dir / name / INCOMPLETE_FLAG).exists()

    # ------------------------------------------------------------ one image's way through the run

    def plan(self, inputs: list[InputImage]) -> list[InputImage]:
        """The inputs (in the run's order) to segment: an image whose outputs are complete is skipped
        unless `overwrite`, before anything is read; an incomplete set (an interrupted run) is redone, with a
        warning.  Every input gets its row in the run's summary, in this order."""
        todo = []
        for item in inputs:
            self.outcomes[item.name] = ImageOutcome(item.name, item.source, "pending")
            existing = self.existing(item.name)
            if existing and not self.overwrite:
                if self.complete(item.name):
                    detail = f"{len(existing)} outputs already in {existing[0].parent}"
                    self.skip(item.name, f"{detail} (pass --overwrite true to replace them)")
                    continue
                missing = ", ".join(p.name for p in self.missing(item.name)) or "an interrupted write"
                logger.warning(f"{item.name}: outputs in {existing[0].parent} are incomplete ({missing}): redoing it")
            todo.append(item)
        return todo

    def skip(self, name: str, detail: str) -> None:
        self._end(name, "skipped", detail=detail)

    def fail(self, name: Hashable, detail: str) -> None:
        """The image failed with `detail` (which names its file); the others go on."""
        self.images.pop(str(name), None)
        self._end(str(name), "failed", detail=detail)

    def tile_failed(self, job: TileJob, error: BaseException) -> None:
        """Its post-processing or writing raised `error`."""
        self.fail(job.key, f"{self.outcomes[job.key].source}: {root_cause(error)}")

    def given_up(self, key: Hashable) -> bool:
        return self.outcomes[key].status == "failed"

    def start(self, data: Mapping[Hashable, object]) -> TileJob | None:
        """The image of a decollated item, whose prediction the writer post-processes next: one tile, the image;
        None for a file that could not be read (the dataset's record says why; it is reported here)."""
        name = str(data["name"])
        if name not in self.outcomes:  # an item of no planned run (a test, a benchmark)
            self.outcomes[name] = ImageOutcome(name, str(data.get("source", name)), "pending")
        self.started[name] = float(data.get("read_at", time.monotonic()))
        if data.get("error"):
            self.fail(name, str(data["error"]))
            return None
        if not self.overwrite and self.complete(name):  # written since the run planned it
            self.fail(name, f"{name}: outputs exist in {self.output_dir / name}; pass --overwrite true")
            return None
        self.images[name] = image = _rgb(data["rgb"])
        height, width = image.shape[:2]
        return TileJob(name, Tile(0, (0, 0, width, height), (0, 0, width, height)), 1.0, self.mpp)

    def add(self, job: TileJob, nuclei: TileNuclei) -> None:
        """Write the image's files (all or none, see the module docstring) and count it done."""
        name = str(job.key)
        image = self.images.pop(name)
        if image.shape[:2] != nuclei.labels.shape:
            raise ValueError(f"{name}: label map {nuclei.labels.shape} differs from the input {image.shape[:2]}")
        self.write(name, image, nuclei)
        self._end(name, "done", nuclei=len(nuclei.table["nucleus_id"]))

    def write(self, name: str, image: np.ndarray, nuclei: TileNuclei) -> list[Path]:
        """The image's files from its input and nuclei, staged and moved into place; their paths."""
        paths = self.paths(name)
        folder = paths["instances"].parent
        require_inside(self.output_dir, folder, InferenceError)
        folder.parent.mkdir(parents=True, exist_ok=True)
        # staging folders left by a killed run (a failed one removes its own)
        for stale in folder.parent.glob(f".{glob.escape(name)}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=folder.parent))
        try:
            staged = {kind: staging / path.name for kind, path in paths.items()}
            inst, table = nuclei.labels, nuclei.table
            inst_types = np.zeros(int(inst.max(initial=0)) + 1, np.uint8)
            inst_types[table["nucleus_id"]] = table["type_id"]
            write_label_tiff(staged["instances"], inst)
            write_label_tiff(staged["types"], inst_types[inst])
            write_nuclei_geojson(staged["geojson"], nucleus_features(table, nuclei.outlines, self.classes))
            write_nuclei_csv(staged["csv"], table)
            overlay_png(staged["overlay"], image, inst, inst_types, classes=self.classes)
            if self.save_nifti:
                write_label_nifti(staged["nifti"], inst)
            folder.mkdir(exist_ok=True)
            flag = folder / INCOMPLETE_FLAG
            require_inside(self.output_dir, flag, InferenceError)  # touch() would create a link's target
            flag.touch()  # a kill between two moves leaves a mixed old/new set: the flag marks it incomplete
            for kind, path in paths.items():  # renames within one file system: no space needed, nothing half-written
                os.replace(staged[kind], path)
            flag.unlink()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return list(paths.values())

    def _end(self, name: str, status: str, nuclei: int | None = None, detail: str = "") -> None:
        outcome = self.outcomes.setdefault(name, ImageOutcome(name, name, status))
        outcome.status, outcome.nuclei, outcome.detail = status, nuclei, detail
        if status == "done":
            outcome.seconds = round(time.monotonic() - self.started.get(name, time.monotonic()), 2)
            logger.info(f"{name}: {nuclei} nuclei in {outcome.seconds:.1f} s")
        elif status == "skipped":
            logger.warning(f"{name}: skipped, {detail}")
        else:
            logger.error(f"{name}: FAILED, {detail}")

    # ------------------------------------------------------------ the run

    def counts(self) -> dict[str, int]:
        return {s: sum(o.status == s for o in self.outcomes.values()) for s in ("done", "skipped", "failed")}

    def finish_run(self) -> None:
        """Log one line per status and every failure again, and write the summary table.  An image still pending
        never reached the writer: it counts as failed, so the run cannot end with status 0 without it."""
        for outcome in list(self.outcomes.values()):
            if outcome.status == "pending":
                self.fail(outcome.name, f"{outcome.source}: not segmented (its prediction never reached the writer)")
        counts = self.counts()
        nuclei = sum(o.nuclei or 0 for o in self.outcomes.values())
        lines = [
            f"inference summary: {len(self.outcomes)} images, {counts['done']} done ({nuclei} nuclei), "
            f"{counts['skipped']} skipped, {counts['failed']} failed; outputs in {self.output_dir}"
        ]
        if counts["skipped"]:
            lines.append(f"  skipped {counts['skipped']} images with outputs on disk: --overwrite true redoes them")
        lines += [f"  failed: {o.detail}" for o in self.outcomes.values() if o.status == "failed"]
        if self.summary_file:
            path = self.output_dir / self.summary_file
            table = self.table()  # a log of this run: replaced by the next run
            write_csv_rows(path, list(table), zip(*table.values(), strict=True), overwrite=True)
            lines.append(f"  per-image table: {path}")
        (logger.error if counts["failed"] else logger.info)("\n".join(lines))

    def table(self) -> dict[str, list]:
        """One column per ImageOutcome field, one row per image; empty cells where a value does not apply."""
        rows = [[_cell(v) for v in astuple(o)] for o in self.outcomes.values()]
        return {f.name: [row[i] for row in rows] for i, f in enumerate(fields(ImageOutcome))}

    def raise_if_failed(self) -> None:
        """Exit with status 1 (no traceback) when any image failed, so that a calling script notices."""
        failed = self.counts()["failed"]
        if failed:
            raise SystemExit(f"{failed} of {len(self.outcomes)} images failed; see the messages above")


def _cell(value: object) -> object:
    """Seconds to 4 decimals; nothing where a value does not apply."""
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else value
