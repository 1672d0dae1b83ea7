"""What `--tracking mlflow` records beyond MONAI's default: the run's settings as MLflow parameters, and the model.

MONAI's bundle tracking (`python -m monai.bundle run ... --tracking mlflow`) appends an `MLFlowHandler` to
`train#handlers`: it logs the loss, the learning rate, every validation metric and the executed config, into a local
SQLite store and artifact folder under `output_dir` unless `tracking_uri` is set.  `log_run_to_mlflow`, a step of
train.json's `training`, finds that handler among the trainer's handlers and, when it is there, adds the settings
that matter when comparing runs (learning rate, batch size, target, widths, folds, ...) as parameters when the run
starts, and `model.pt` as an artifact when training ends.  Without `--tracking` it does nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from scripts.core.distributed import is_main_rank

logger = logging.getLogger(__name__)


def _mlflow_handler(handlers: Sequence[Any]) -> Any | None:
    for handler in handlers:
        if type(handler).__name__ == "MLFlowHandler":
            return handler
    return None


def log_run_to_mlflow(
    trainer: Engine, handlers: Sequence[Any], params: Mapping[str, Any], model: str | os.PathLike
) -> bool:
    """Attach parameter and model logging to the trainer's MLflow run, if `--tracking mlflow` added one.

    Args:
        trainer: the training engine (`@train#trainer`).
        handlers: its handlers (`@train#handlers`), where MONAI's tracking put its MLFlowHandler.
        params: the settings to record as MLflow parameters (train.json's `tracking_params`).
        model: the weights to record as an artifact when training completes (`ckpt_dir/model.pt`).

    Returns whether an MLflow run was found.
    """
    mlflow_handler = _mlflow_handler(handlers)
    if mlflow_handler is None or not is_main_rank():
        return False
    run: dict[str, str] = {}

    def started(_: Engine) -> None:  # after MLFlowHandler.start, which was attached first and opened the run
        if mlflow_handler.cur_run is None:
            return
        run["id"] = mlflow_handler.cur_run.info.run_id
        for key, value in params.items():
            mlflow_handler.client.log_param(run["id"], key, str(value))

    def completed(_: Engine) -> None:  # the run may be closed by now; the client still files artifacts under it
        if "id" in run and Path(model).is_file():
            mlflow_handler.client.log_artifact(run["id"], str(model), artifact_path="model")
            logger.info(f"MLflow run {run['id']}: logged {len(params)} parameters and {model}")

    trainer.add_event_handler(Events.STARTED, started)
    trainer.add_event_handler(Events.COMPLETED, completed)
    return True
