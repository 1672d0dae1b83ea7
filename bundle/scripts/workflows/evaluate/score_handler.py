"""Score an evaluation run with the official PanNuke protocol while it runs.

MONAI's PanopticQualityMetric pools TP/FP/FN over a batch, which is not the PanNuke number, so this handler scores
each tile as soon as its prediction exists (the instances come from `NucleiInstancesd` in the post-processing) and
keeps only the per-image rows.  At the end it writes the per-image / per-tissue CSVs and the JSON summary, logs the
summary table, puts bPQ, mPQ and every class PQ into `engine.state.metrics` (so MetricsSaver and the JSON writer
pick them up) and into TensorBoard.
"""

from __future__ import annotations

import logging

import numpy as np
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

from scripts.core.classes import PANNUKE, NucleusClasses
from scripts.core.distributed import gather_in_sampler_order, is_main_rank
from scripts.core.atomic import require_writable
from scripts.model.postprocess import as_plane
from scripts.data.pannuke.cache import overlapping_tiles, read_tiles
from scripts.data.pannuke.datasets import PanNuke
from scripts.data.pannuke.files import read_npy_header
from scripts.workflows.evaluate.pq import TISSUE_MEAN_KEYS, class_keys, format_summary, score_image, write_score_tables

logger = logging.getLogger(__name__)


class PanNukeScoreHandler:
    """Per-image PanNuke scores of an evaluator, written and logged when the run completes."""

    def __init__(
        self,
        output_dir: str,
        log_dir: str | None = None,
        pred_inst_key: str = "inst_map",
        pred_type_key: str = "type_map",
        true_inst_key: str = "inst",
        true_type_key: str = "type",
        tissue_key: str = "tissue",
        pannuke: PanNuke | None = None,
        classes: NucleusClasses = PANNUKE,
    ) -> None:
        """
        Args:
            output_dir: where the score tables go.
            log_dir: TensorBoard folder for the headline scores (None: none).
            pannuke: the run's folds (`@pannuke`): tiles whose type channels overlap are then scored per class on
                PanNuke's raw channels, as the official code does.
            classes: the data's classes (`@classes`): one PQ column per class, named after it.
        """
        self.class_names = classes.names
        self.output_dir, self.log_dir = output_dir, log_dir
        if is_main_rank():
            require_writable(output_dir, "output_dir")
        self.pred_keys = (pred_inst_key, pred_type_key)
        self.true_keys = (true_inst_key, true_type_key)
        self.tissue_key = tissue_key
        self.pannuke = pannuke
        self._overlaps: dict[int, set[int]] = {}
        self.rows: list[dict[str, float]] = []
        self.tissues: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.score_batch)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.complete)

    def reset(self, engine: Engine) -> None:
        self.rows, self.tissues = [], []

    def score_batch(self, engine: Engine) -> None:
        for batch_item, output_item in zip(engine.state.batch, engine.state.output, strict=True):
            item = {**batch_item, **output_item}
            missing = [k for k in (*self.pred_keys, *self.true_keys, self.tissue_key) if k not in item]
            if missing:
                raise KeyError(
                    f"PanNukeScoreHandler needs {missing} in each item: add NucleiInstancesd to the post-processing "
                    "and 'inst', 'type' to the dataset keys (see `instances` and `dataset_keys` in configs/train.json)"
                )
            true_inst, true_type = (as_plane(item[k]) for k in self.true_keys)
            pred_inst, pred_type = (as_plane(item[k]) for k in self.pred_keys)
            channels = self._raw_channels(item)
            self.rows.append(score_image(true_inst, true_type, pred_inst, pred_type, channels, self.class_names))
            self.tissues.append(str(item[self.tissue_key]))

    def _raw_channels(self, item: dict) -> np.ndarray | None:
        """PanNuke's (H, W, K) type channels of this tile if two of them overlap somewhere in it, else None."""
        if self.pannuke is None or "fold" not in item or "index" not in item:
            return None
        fold, index = int(item["fold"]), int(item["index"])
        if fold not in self._overlaps:
            self._overlaps[fold] = overlapping_tiles(self.pannuke.cache(fold))
        if index not in self._overlaps[fold]:
            return None
        masks = self.pannuke.files[fold].masks
        return read_tiles(masks, read_npy_header(masks), index, index + 1)[0, ..., :-1]

    def complete(self, engine: Engine) -> None:
        """Score every image of the run; under torchrun all ranks gather their rows and the main rank writes."""
        self.rows, self.tissues = gather_in_sampler_order(self.rows), gather_in_sampler_order(self.tissues)
        if not is_main_rank():
            return
        if not self.rows:
            logger.warning("PanNukeScoreHandler: no images were scored")
            return
        agg = write_score_tables(self.rows, self.tissues, self.output_dir)
        logger.info("\n" + format_summary(agg))
        overall = agg["overall"]
        headline = {key: overall[key] for key in (*TISSUE_MEAN_KEYS, *class_keys(self.class_names))}
        engine.state.metrics.update(headline)
        if self.log_dir:
            self._write_tensorboard(agg, engine.state.epoch)

    def _write_tensorboard(self, agg: dict, step: int) -> None:
        writer = SummaryWriter(log_dir=self.log_dir)
        try:
            for key in (*TISSUE_MEAN_KEYS, *class_keys(self.class_names)):
                writer.add_scalar(f"pannuke/{key}", agg["overall"][key], step)
            for tissue, scores in agg["per_tissue"].items():
                writer.add_scalar(f"pannuke_tissue_bPQ/{tissue}", scores["bPQ"], step)
                writer.add_scalar(f"pannuke_tissue_mPQ/{tissue}", scores["mPQ"], step)
        finally:
            writer.close()
