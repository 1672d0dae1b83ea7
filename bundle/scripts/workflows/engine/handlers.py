"""Two small ignite handlers MONAI does not ship: the learning rate in TensorBoard and metrics as a JSON file."""

from __future__ import annotations

from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine
from torch.utils.tensorboard import SummaryWriter

from scripts.core.distributed import is_main_rank
from scripts.core.errors import ModelError
from scripts.core.atomic import write_json


class LearningRateLogger:
    """Write the optimizer's learning rate to TensorBoard after every epoch (scheduled LRs are worth watching).

    Under torchrun only the main rank writes."""

    def __init__(self, optimizer: torch.optim.Optimizer, log_dir: str, tag: str = "learning_rate") -> None:
        self.optimizer, self.log_dir, self.tag = optimizer, log_dir, tag
        self._writer: SummaryWriter | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, lambda _: self._writer and self._writer.flush())

    def __call__(self, engine: Engine) -> None:
        if not is_main_rank():
            return
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        self._writer.add_scalar(self.tag, self.optimizer.param_groups[0]["lr"], engine.state.epoch)


class StopOnNonFiniteLoss:
    """Stop training with an error, at the end of the epoch, if any step's loss was NaN or infinite.

    The check stays on the device during the epoch (no extra synchronisation per step) and runs before validation,
    so a diverged run never saves its weights or a training state as if nothing had happened.  Put it first in
    `train#handlers`.
    """

    def __init__(self, loss_key: str = "loss") -> None:
        self.loss_key = loss_key
        self.bad: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.check)

    def record(self, engine: Engine) -> None:
        loss = from_engine([self.loss_key], first=True)(engine.state.output)
        bad = ~torch.isfinite(torch.as_tensor(loss).detach())
        self.bad = bad if self.bad is None else self.bad | bad

    def check(self, engine: Engine) -> None:
        bad, self.bad = self.bad, None
        if bad is not None and bool(bad.any()):
            raise ModelError(
                f"the training loss became NaN or infinite in epoch {engine.state.epoch}; nothing of this epoch was "
                "saved. Lower --learning_rate, or check the data (a tile with NaN would have been refused)"
            )


class MetricsJSONSaver:
    """At the end of a run, write `engine.state.metrics` to `<output_dir>/<filename>` atomically (main rank only)."""

    def __init__(self, output_dir: str, filename: str = "metrics.json", extra: dict | None = None) -> None:
        self.path = Path(output_dir) / filename
        self.extra = extra or {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_rank():
            return
        numbers = (int, float, torch.Tensor)
        metrics = {k: float(v) if isinstance(v, numbers) else v for k, v in engine.state.metrics.items()}
        write_json(self.path, {**self.extra, "metrics": metrics})


def require_checkpoint(path: str) -> str:
    """Fail early, with the way out, when the weights an evaluation or inference needs are missing."""
    if not Path(path).is_file():
        raise ModelError(
            f"no trained weights at {path}. Train first (python -m monai.bundle run training --config_file "
            f"configs/train.json ...), or copy a model.pt state dict there, or pass --checkpoint /path/to/model.pt."
        )
    return path
