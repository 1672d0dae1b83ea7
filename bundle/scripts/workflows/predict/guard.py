"""Run image inference image by image so that one bad image is reported and skipped, never the end of the run.

`PerImageGuard` is the evaluator's `iteration_update`: for each image it
  - reports an image the dataset could not read (the dataset hands over an "error" record instead of raising),
  - skips an image whose outputs already exist, unless the outputs may be overwritten, before spending network time
    on it; an incomplete set (an interrupted run) is not a result: it is redone, and the log says so,
  - runs MONAI's own evaluator iteration (`SupervisedEvaluator._iteration`: the network on the batch, then the
    events on which MONAI decollates the batch and runs the post-processing, the writer included) and turns any
    exception in it into a failed image, so the rest of the folder is still processed. Calling MONAI's iteration,
    rather than a copy of it, keeps AMP, compile and prepare_batch behaving as MONAI's evaluator does.
Each outcome goes to the run's `ImageOutputs`, which writes the run's summary and sets the exit status.
"""

from __future__ import annotations

import logging

from ignite.engine import Engine

from scripts.core.errors import root_cause
from scripts.workflows.predict.image_outputs import ImageOutputs

logger = logging.getLogger(__name__)


class PerImageGuard:
    """iteration_update: per-image error handling and skip-existing (see the module docstring).

    Args:
        outputs: the run's image outputs (`@outputs`).
    """

    def __init__(self, outputs: ImageOutputs) -> None:
        self.outputs = outputs

    def __call__(self, engine: Engine, batch: dict) -> list:
        if len(batch["name"]) != 1:
            raise ValueError(f"inference runs one image per step (images differ in size); got {len(batch['name'])}")
        name, source = str(batch["name"][0]), str(batch["source"][0])
        outputs = self.outputs
        outputs.begin(name, source)
        if "error" in batch:
            outputs.fail(name, str(batch["error"][0]))
            return []
        existing = outputs.existing(name)
        if existing and not outputs.overwrite:
            if outputs.complete(name):
                folder = existing[0].parent
                outputs.skip(
                    name, f"{len(existing)} outputs already in {folder} (pass --overwrite true to replace them)"
                )
                return []
            missing = ", ".join(p.name for p in outputs.missing(name)) or "an interrupted write"
            logger.warning(f"{name}: outputs in {existing[0].parent} are incomplete ({missing}): redoing the image")
        try:
            return engine._iteration(engine, batch)  # the one MONAI runs without an iteration_update
        except Exception as e:  # noqa: BLE001 - any failure of one image is reported; the others still run
            logger.debug("traceback for %s", source, exc_info=True)
            outputs.fail(name, f"{source}: {root_cause(e)}")
            return []
