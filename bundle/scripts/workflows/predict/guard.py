"""Run inference image by image so that one bad image is reported and skipped, never the end of the run.

`PerImageGuard` is the evaluator's `iteration_update`: for each image it
  - reports an image the dataset could not read (the dataset hands over an "error" record instead of raising),
  - skips an image whose outputs already exist, unless the writer may overwrite, before spending network time on it;
    an incomplete set (an interrupted run) is not a result: it is redone, and the log says so,
  - runs MONAI's own evaluator iteration (`SupervisedEvaluator._iteration`: the network on the batch, then the
    events on which MONAI decollates the batch and runs the post-processing, writing included) and turns any
    exception in it into a failed image, so the rest of the folder is still processed. Calling MONAI's iteration,
    rather than a copy of it, keeps AMP, compile and prepare_batch behaving as MONAI's evaluator does.
As a handler it logs a summary when the run completes and writes it to `<output_dir>/inference_summary.csv`;
`raise_if_failed()` (the config's last run step) then exits with status 1 when any image failed, for scripts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import astuple, dataclass, fields

from ignite.engine import Engine, Events

from scripts.workflows.predict.writer import NucleiOutputsWriterd
from scripts.core.atomic import write_csv_rows

logger = logging.getLogger(__name__)

SUMMARY_FILE = "inference_summary.csv"


@dataclass
class ImageOutcome:
    name: str
    source: str
    status: str  # "done", "skipped" or "failed"
    nuclei: int | None = None
    seconds: float | None = None
    detail: str = ""


def root_cause(error: BaseException) -> str:
    """The innermost exception as "Type: message": MONAI wraps a failing transform's error in 'applying transform'."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


class PerImageGuard:
    """iteration_update + handler: per-image error handling, skip-existing and the run summary."""

    def __init__(self, writer: NucleiOutputsWriterd, summary_file: str | None = SUMMARY_FILE) -> None:
        self.writer = writer
        self.summary_file = summary_file
        self.outcomes: list[ImageOutcome] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.outcomes.clear())
        engine.add_event_handler(Events.COMPLETED, self.summarise)

    def __call__(self, engine: Engine, batch: dict) -> list:
        if len(batch["name"]) != 1:
            raise ValueError(f"inference runs one image per step (images differ in size); got {len(batch['name'])}")
        name, source = str(batch["name"][0]), str(batch["source"][0])
        if "error" in batch:
            return self._record(ImageOutcome(name, source, "failed", detail=str(batch["error"][0])))
        existing = self.writer.existing(name)
        if existing and not self.writer.overwrite:
            if self.writer.complete(name):
                folder = existing[0].parent
                detail = f"{len(existing)} outputs already in {folder} (pass --overwrite true to replace them)"
                return self._record(ImageOutcome(name, source, "skipped", detail=detail))
            missing = ", ".join(p.name for p in self.writer.missing(name)) or "an interrupted write"
            logger.warning(f"{name}: outputs in {existing[0].parent} are incomplete ({missing}): redoing the image")
        start = time.perf_counter()
        try:
            output = engine._iteration(engine, batch)  # the one MONAI runs without an iteration_update
        except Exception as e:  # noqa: BLE001 - any failure of one image is reported; the others still run
            logger.debug("traceback for %s", source, exc_info=True)
            return self._record(ImageOutcome(name, source, "failed", detail=f"{source}: {root_cause(e)}"))
        item = output[0] if isinstance(output, list) else output
        seconds = time.perf_counter() - start
        self._record(ImageOutcome(name, source, "done", int(item["num_nuclei"]), round(seconds, 2)))
        return output

    def _record(self, outcome: ImageOutcome) -> list:
        self.outcomes.append(outcome)
        if outcome.status == "done":
            logger.info(f"{outcome.name}: {outcome.nuclei} nuclei in {outcome.seconds:.1f} s")
        elif outcome.status == "skipped":
            logger.warning(f"{outcome.name}: skipped, {outcome.detail}")
        else:
            logger.error(f"{outcome.name}: FAILED, {outcome.detail}")
        return []

    def counts(self) -> dict[str, int]:
        return {s: sum(o.status == s for o in self.outcomes) for s in ("done", "skipped", "failed")}

    def summarise(self, engine: Engine | None = None) -> None:
        """Log one line per status and every failure again, and write the summary table."""
        counts = self.counts()
        nuclei = sum(o.nuclei or 0 for o in self.outcomes)
        lines = [
            f"inference summary: {len(self.outcomes)} images, {counts['done']} done ({nuclei} nuclei), "
            f"{counts['skipped']} skipped, {counts['failed']} failed; outputs in {self.writer.output_dir}"
        ]
        if counts["skipped"]:
            lines.append(f"  skipped {counts['skipped']} images with outputs on disk: --overwrite true redoes them")
        lines += [f"  failed: {o.detail}" for o in self.outcomes if o.status == "failed"]
        if self.summary_file:
            path = self.writer.output_dir / self.summary_file
            table = self.table()  # a log of this run: replaced by the next run
            write_csv_rows(path, list(table), zip(*table.values(), strict=True), overwrite=True)
            lines.append(f"  per-image table: {path}")
        (logger.error if counts["failed"] else logger.info)("\n".join(lines))

    def table(self) -> dict[str, list]:
        """One column per ImageOutcome field, one row per image; empty cells where a value does not apply."""
        rows = [[_cell(v) for v in astuple(o)] for o in self.outcomes]
        return {f.name: [row[i] for row in rows] for i, f in enumerate(fields(ImageOutcome))}

    def raise_if_failed(self) -> None:
        """Exit with status 1 (no traceback) when any image failed, so that a calling script notices."""
        failed = self.counts()["failed"]
        if failed:
            raise SystemExit(f"{failed} of {len(self.outcomes)} images failed; see the messages above")


def _cell(value: object) -> object:
    """Seconds to 4 decimals; nothing where a value does not apply."""
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else value
