"""Checkpoints a crash cannot corrupt, and everything a killed training run needs to continue where it stopped.

MONAI's CheckpointSaver writes `model.pt` in place and deletes the previous best before writing the new one, so a
crash at the wrong moment leaves a truncated file or none.  Every file here is written to a temporary file in the
same folder, flushed to disk and renamed over the old one (`scripts.core.atomic`): readers see the old file or the new
one, never half of one.  Contents are tensors and plain Python values only, so `torch.load(weights_only=True)` (what
MONAI's CheckpointLoader uses) reads them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping
from monai.handlers import CheckpointLoader

from scripts.core.flags import as_bool
from scripts.core.classes import NucleusClasses, with_classes
from scripts.model.weights import check_finite, load_into, read_checkpoint
from scripts.core.errors import ModelError
from scripts.core.distributed import is_main_rank
from scripts.core.atomic import atomic_write, require_writable
from scripts.core.locks import FolderLock

logger = logging.getLogger(__name__)

LOCK_NAME = ".training.lock"  # in ckpt_dir while a training runs; removed at exit, stale after a kill


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through the bundle's atomic writer: `path` is always complete or untouched."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)

    atomic_write(path, write)


def unwrap(module: Any) -> Any:
    """The network inside DistributedDataParallel / DataParallel, so saved keys never carry a `module.` prefix."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return module.module if isinstance(module, wrappers) else module


def _require_file_slot(path: Path) -> None:
    """Refuse a folder where a training file goes before the first epoch, not when the first save fails after it."""
    if path.is_dir():
        raise ModelError(
            f"{path} is a folder, where the training writes a file; move it away or choose another --ckpt_dir"
        )


class BestModelSaver:
    """Write the network's weights, as a plain state dict, whenever the evaluator's key metric reaches a new best.

    It follows the evaluator's own bookkeeping (`state.best_metric_epoch`, updated by MONAI before handlers run), which
    TrainingState saves and restores, so a resumed run never replaces a better model with a worse one.  With
    `classes`, the file carries the class names and colours beside the weights, so inference never needs them restated.

    Args:
        network: the trained network (`@network`).
        path: where the best weights go (`@checkpoint_path`).
        classes: the training data's classes (`@classes`).
    """

    def __init__(
        self, network: torch.nn.Module, path: str | os.PathLike, classes: NucleusClasses | None = None
    ) -> None:
        self.network, self.path, self.classes = network, Path(path), classes
        _require_file_slot(self.path)
        if self.path.is_file() and is_main_rank():
            logger.warning(
                f"{self.path} holds an earlier run's weights; this run replaces them at its first best validation "
                "(copy the file elsewhere now to keep it)"
            )

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.best_metric_epoch != engine.state.epoch or not is_main_rank():
            return  # every rank has the same weights under DDP: the main rank writes them
        state = unwrap(self.network).state_dict()
        atomic_save(state if self.classes is None else with_classes(state, self.classes), self.path)
        name = engine.state.key_metric_name
        logger.info(f"epoch {engine.state.epoch}: new best {name} {engine.state.best_metric:.4f}, saved {self.path}")


class BestMetricState:
    """The evaluator's best key metric and its epoch, as a state dict (ignite does not save them with the engine)."""

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        state = self.evaluator.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state: Mapping) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]


class ResumableEarlyStopping:
    """Stop training when the key metric has not improved for `patience` validations, resumably.

    Attach it to the evaluator; `set_trainer` names the engine to stop (train.json's `training` run step calls it).
    It wraps ignite's EarlyStopping, whose counter and best score are a state dict that TrainingState saves, so a
    resumed run keeps counting where the killed one stopped.  Every rank computes the same all-reduced metric, so
    every rank stops at the same epoch.

    Args:
        patience: validations without improvement before training stops.
        score_function: the evaluator's score, higher is better (e.g. monai.handlers.stopping_fn_from_metric).
        min_delta: an increase of at most this much does not count as an improvement.
    """

    def __init__(self, patience: int, score_function: Callable[[Engine], float], min_delta: float = 0.0) -> None:
        self.patience, self.score_function, self.min_delta = int(patience), score_function, float(min_delta)
        self.stopping: EarlyStopping | None = None

    def set_trainer(self, trainer: Engine) -> None:
        self.stopping = EarlyStopping(self.patience, self.score_function, trainer, min_delta=self.min_delta)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _require(self) -> EarlyStopping:
        if self.stopping is None:
            raise RuntimeError("ResumableEarlyStopping has no trainer: call set_trainer() before the trainer runs")
        return self.stopping

    def __call__(self, engine: Engine) -> None:
        self._require()(engine)

    def state_dict(self) -> dict:
        return dict(self._require().state_dict())

    def load_state_dict(self, state: Mapping) -> None:
        self._require().load_state_dict(state)


class RandomState:
    """torch's global random generators (CPU, and this rank's GPU): shuffling, dropout and DataLoader worker seeds."""

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        torch.set_rng_state(state["cpu"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].cpu())


class TrainingState:
    """Everything a killed run needs to continue, in one file rewritten atomically after every epoch.

    Attach it to the trainer after the ValidationHandler, so each save includes that epoch's validation: the
    evaluator's best metric (which BestModelSaver follows) and the early-stopping counter.  The trainer itself is
    added at attach time (a config cannot reference the trainer from its own handler list).  With `resume=True` the
    file is loaded when the trainer starts, by MONAI's CheckpointLoader (weights_only, unwraps DDP, keeps the
    configured max_epochs), and training goes on with the epoch after the saved one.  Every rank loads; rank 0 writes.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        objects: Mapping[str, Any],
        evaluator: Engine | None = None,
        early_stopper: ResumableEarlyStopping | None = None,
        resume: bool | str = False,
        map_location: Any = None,
    ) -> None:
        self.path, self.resume, self.map_location = Path(path), as_bool(resume, "resume"), map_location
        require_writable(self.path.parent, "ckpt_dir")
        _require_file_slot(self.path)
        if is_main_rank():  # one training per ckpt_dir: another would mix its model.pt with this state
            FolderLock(self.path.parent / LOCK_NAME, f"the training folder {self.path.parent}").acquire()
        if self.resume and not self.path.is_file():
            raise ModelError(
                f"--resume true, but there is no training state at {self.path}: nothing to resume. Start without "
                "--resume, or point --ckpt_dir at the models folder of the run to continue."
            )
        if not self.resume and self.path.is_file():
            logger.warning(f"{self.path} holds an earlier run's state; it will be overwritten (--resume true goes on)")
        self.objects: dict[str, Any] = {**objects, "rng": RandomState()}
        if evaluator is not None:
            self.objects["evaluator"] = BestMetricState(evaluator)
        if early_stopper is not None:
            self.objects["early_stopping"] = early_stopper

    def attach(self, engine: Engine) -> None:
        self.objects["trainer"] = engine
        if self.resume:
            self.check_resumable()
            loader = CheckpointLoader(load_path=str(self.path), load_dict=self.objects, map_location=self.map_location)
            loader.attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def check_resumable(self) -> None:
        """Refuse, before training starts, a state that is unreadable, of another kind, NaN, or of another network."""
        state = read_checkpoint(self.path, self.map_location)
        missing = [key for key in self.objects if key not in state]
        if missing:
            raise ModelError(
                f"{self.path} is not a training state this run can resume: it lacks {', '.join(missing)}. It was "
                "written by another version or tool; start without --resume"
            )
        check_finite(state["model"], self.path, "model")
        load_into(self.objects["model"], state["model"], self.path)

    def save(self, engine: Engine) -> None:
        if is_main_rank():
            atomic_save({key: unwrap(obj).state_dict() for key, obj in self.objects.items()}, self.path)
