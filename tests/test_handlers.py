"""The bundle's small ignite handlers: a diverged training stops with an error before anything is saved."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from scripts.workflows.engine.handlers import StopOnNonFiniteLoss
from scripts.core.errors import ModelError


def _epoch(handler: StopOnNonFiniteLoss, losses: list[float], epoch: int = 1) -> None:
    engine = SimpleNamespace(state=SimpleNamespace(epoch=epoch, output=None))
    for loss in losses:
        engine.state.output = [{"loss": torch.tensor(loss)}]
        handler.record(engine)
    handler.check(engine)


def test_finite_losses_pass_and_a_nan_stops_the_epoch():
    handler = StopOnNonFiniteLoss()
    _epoch(handler, [0.9, 0.8])
    with pytest.raises(ModelError, match="loss became NaN or infinite in epoch 2.*--learning_rate"):
        _epoch(handler, [0.7, float("nan"), 0.6], epoch=2)
    with pytest.raises(ModelError):
        _epoch(handler, [float("inf")], epoch=3)
    _epoch(handler, [0.5], epoch=4)  # each epoch is judged on its own steps


def test_a_folder_where_model_pt_goes_is_refused_before_the_first_epoch(tmp_path):
    from scripts.workflows.engine.checkpointing import BestModelSaver, TrainingState

    (tmp_path / "model.pt").mkdir()
    (tmp_path / "training_state.pt").mkdir()
    with pytest.raises(ModelError, match="model.pt is a folder, where the training writes a file"):
        BestModelSaver(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(ModelError, match="training_state.pt is a folder, where the training writes a file"):
        TrainingState(tmp_path / "training_state.pt", {})
