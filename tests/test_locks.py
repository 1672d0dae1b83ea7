"""Run-folder locks: a second training in the same ckpt_dir stops naming the first; a killed run's lock is stale."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from scripts.workflows.engine.checkpointing import LOCK_NAME, TrainingState
from scripts.core.errors import ConfigError
from scripts.core.locks import FolderLock


@pytest.fixture
def other_run():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _hold(path, pid):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "now", "command": "train A"}))


def test_a_second_training_in_the_same_ckpt_dir_stops_naming_the_first(tmp_path, other_run):
    _hold(tmp_path / "models" / LOCK_NAME, other_run.pid)
    network = torch.nn.Linear(2, 1)
    with pytest.raises(ConfigError, match=rf"training folder .*models is in use by another run \(pid {other_run.pid}"):
        TrainingState(tmp_path / "models" / "training_state.pt", {"model": network})
    assert not (tmp_path / "models" / "training_state.pt").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _hold(tmp_path / "x.lock", dead.pid)
    with caplog.at_level("WARNING"):
        lock = FolderLock(tmp_path / "x.lock", "x").acquire()
    assert "stale lock" in caplog.text
    assert json.loads((tmp_path / "x.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "x.lock").exists()


def test_the_same_process_may_take_its_lock_again_and_others_cannot(tmp_path, other_run):
    first = FolderLock(tmp_path / "y.lock", "y").acquire()
    FolderLock(tmp_path / "y.lock", "y").acquire()  # a second workflow in this process
    first.release()
    _hold(tmp_path / "y.lock", other_run.pid)
    assert FolderLock(tmp_path / "y.lock", "y").try_acquire()["pid"] == other_run.pid


@pytest.mark.parametrize(
    "content",
    [
        "[1]",
        json.dumps({"pid": "abc", "host": socket.gethostname()}),
        json.dumps({"pid": 5}),
        json.dumps({"pid": 0, "host": socket.gethostname()}),
        json.dumps({"pid": 2**70, "host": socket.gethostname()}),
        '{"pid": 12',
        "",
        "\x00\xff",
    ],
    ids=["a list", "a pid that is no number", "no host", "pid 0", "a pid beyond any", "cut short", "empty", "binary"],
)
def test_a_damaged_lock_is_one_line_while_fresh_and_taken_over_once_old(tmp_path, caplog, content):
    """A lock file holding anything but what a run writes used to end in an AttributeError or ValueError."""
    path = tmp_path / "z.lock"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"z is in use by another run \(a run whose lock is being written, or a "):
        FolderLock(path, "z").acquire()
    os.utime(path, (1e9, 1e9))  # unchanged for years: no run is writing it
    with caplog.at_level("WARNING"):
        lock = FolderLock(path, "z").acquire()
    assert f"removing the damaged lock {path}" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.parametrize("workflow", ["inference", "evaluate"])
def test_a_second_run_into_the_same_output_folder_stops_naming_the_first(tmp_path, other_run, workflow):
    """Two runs writing one output folder used to mix their files and both report success (tile and slide runs:
    inference_wsi.json inherits inference.json's initialize; two evaluations overwrote each other's scores)."""
    from monai.bundle import ConfigWorkflow

    from conftest import BUNDLE_ROOT
    from scripts.core.errors import bundle_error_in
    from scripts.core.locks import OUTPUT_LOCK

    out = tmp_path / "out"
    _hold(out / OUTPUT_LOCK, other_run.pid)
    (tmp_path / "images").mkdir()
    shipped = str(BUNDLE_ROOT / "models" / "pretrained" / "model_fp16.pt")
    options = {"input_dir": str(tmp_path / "images")} if workflow == "inference" else {"checkpoint": shipped}
    flow = ConfigWorkflow(
        config_file=[str(BUNDLE_ROOT / "configs" / c) for c in ("train.json", f"{workflow}.json")],
        workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT),
        output_dir=str(out),
        ckpt_dir=str(tmp_path / "models"),
        **options,
    )
    with pytest.raises(Exception) as err:
        flow.initialize()
    message = str(bundle_error_in(err.value))
    assert f"the output folder {out} is in use by another run (pid {other_run.pid}" in message
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_LOCK]
