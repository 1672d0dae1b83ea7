"""Resuming a killed training run, and checkpoint files that a crash cannot corrupt.

The end-to-end test starts a real training through monai.bundle, kills it with SIGKILL as soon as its first
training state is on disk, resumes it with `--resume true` and compares the outcome with a run that was never
interrupted.  Augmentation, shuffling and dropout are on, with one DataLoader worker as in real training: the worker
seeds, the shuffling and dropout all come from torch's generator, which the training state restores, so the two
runs must end with the same weights.  (With num_workers=0 MONAI seeds the transforms once per process instead, and
a resumed run would replay the first epoch's augmentations.)
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bundle_launch import launch, start
from pannuke_fixtures import write_dataset
from scripts.core.errors import ModelError
from scripts.workflows.engine.checkpointing import BestMetricState, BestModelSaver, TrainingState, atomic_save
from scripts.core.flags import as_bool

pytestmark = pytest.mark.slow

TRAIN = ["train.json"]
EPOCHS = 8
RUN = [
    "--epochs",
    str(EPOCHS),
    "--batch_size",
    "2",
    "--network_def#features",
    "[8, 8, 16, 32, 64, 8]",
    "--train#dataloader#num_workers",
    "1",
]


def wait_for(path: Path, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {path.name} appeared (exit code {proc.poll()})")
        time.sleep(0.02)


def epochs_logged(log: str) -> list[int]:
    return [int(e) for e in re.findall(rf"Epoch: (\d+)/{EPOCHS}, Iter", log)]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_dataset(root / "data", tiles=(4, 2, 1))
    work = root / "killed"
    proc = start("training", TRAIN, work, "--dataset_dir", str(data), *RUN)
    state_file = work / "models" / "training_state.pt"
    try:
        wait_for(state_file, proc)
        proc.kill()  # SIGKILL: no handler, no cleanup, exactly like a crash or a lost node
    finally:
        proc.kill()
        proc.wait()
    killed = torch.load(state_file, weights_only=True)
    model_after_kill = torch.load(work / "models" / "model.pt", weights_only=True)
    log = launch("training", TRAIN, work, "--dataset_dir", str(data), *RUN, "--resume", "true")
    launch("training", TRAIN, root / "uninterrupted", "--dataset_dir", str(data), *RUN)
    return SimpleNamespace(root=root, work=work, proc=proc, killed=killed, model_after_kill=model_after_kill, log=log)


def test_the_first_run_really_was_killed_mid_training(killed_and_resumed):
    run = killed_and_resumed
    assert run.proc.returncode == -9
    saved_epoch = run.killed["trainer"]["iteration"] // run.killed["trainer"]["epoch_length"]
    assert 1 <= saved_epoch < EPOCHS
    assert all(isinstance(v, torch.Tensor) for v in run.model_after_kill.values())  # readable, not half written
    assert not list((run.work / "models").glob(".tmp-*"))  # the atomic writer's temporaries


def test_resumed_run_continues_after_the_saved_epoch_and_finishes(killed_and_resumed):
    run = killed_and_resumed
    saved_epoch = run.killed["trainer"]["iteration"] // run.killed["trainer"]["epoch_length"]
    assert "Restored all variables from" in run.log
    epochs = epochs_logged(run.log)
    assert epochs[0] == saved_epoch + 1 and epochs[-1] == EPOCHS, epochs  # not from epoch 1
    final = torch.load(run.work / "models" / "training_state.pt", weights_only=True)
    assert final["trainer"]["iteration"] == EPOCHS * final["trainer"]["epoch_length"]


def test_resumed_run_ends_where_an_uninterrupted_run_ends(killed_and_resumed):
    """Weights, optimizer, schedule, best metric and the random stream all came back, so the results are identical."""
    run = killed_and_resumed
    resumed, reference = (
        torch.load(run.root / w / "models" / "training_state.pt", weights_only=True)
        for w in ("killed", "uninterrupted")
    )
    for key, value in reference["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert resumed["lr_scheduler"]["last_epoch"] == reference["lr_scheduler"]["last_epoch"] == EPOCHS
    assert resumed["evaluator"] == pytest.approx(reference["evaluator"])
    assert resumed["early_stopping"] == pytest.approx(reference["early_stopping"])
    best = [torch.load(run.root / w / "models" / "model.pt", weights_only=True) for w in ("killed", "uninterrupted")]
    for key, value in best[1].items():  # the best model is the same epoch's weights, never a worse later one
        torch.testing.assert_close(best[0][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_resume_without_a_saved_state_says_so(tmp_path):
    with pytest.raises(ModelError, match="nothing to resume"):
        TrainingState(tmp_path / "training_state.pt", objects={}, resume="true")


@pytest.mark.parametrize(
    "value, expected", [(True, True), ("true", True), ("True", True), ("false", False), ("0", False), (0, False)]
)
def test_command_line_flags(value, expected):
    assert as_bool(value, "resume") is expected


def test_a_flag_that_is_neither_true_nor_false_is_refused():
    with pytest.raises(ValueError, match="--resume must be true or false"):
        as_bool("maybe", "resume")


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(3)}, path)

    def crash_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"w": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind


def test_best_model_follows_the_restored_best_metric(tmp_path):
    """After a resume, an epoch that does not beat the restored best must not replace model.pt."""
    network = torch.nn.Linear(2, 1)
    evaluator = SimpleNamespace(
        state=SimpleNamespace(epoch=5, best_metric=-1, best_metric_epoch=-1, key_metric_name="val_mean_dice")
    )
    BestMetricState(evaluator).load_state_dict({"best_metric": 0.8, "best_metric_epoch": 3})
    saver = BestModelSaver(network, tmp_path / "model.pt")
    saver(evaluator)
    assert not (tmp_path / "model.pt").exists()
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.9, 5  # what MONAI sets on a new best
    saver(evaluator)
    assert torch.load(tmp_path / "model.pt", weights_only=True).keys() == network.state_dict().keys()
