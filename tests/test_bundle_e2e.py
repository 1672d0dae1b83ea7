"""The real configs, end to end through monai.bundle, on a few generated PanNuke-format tiles."""

import hashlib
import json

import pytest
import torch

from bundle_launch import run_bundle
from pannuke_fixtures import rewrite, write_dataset

pytestmark = pytest.mark.slow

TRAIN = ["train.json"]
EVALUATE = ["train.json", "evaluate.json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("bundle")
    data = write_dataset(work / "data", tiles=(4, 2, 2), layout="kaggle")
    proc = run_bundle("training", TRAIN, work, "--dataset_dir", str(data), "--epochs", "1", "--batch_size", "2")
    return work, data, proc


def test_training_writes_a_plain_state_dict(trained):
    work, _, proc = trained
    state = torch.load(work / "models" / "model.pt", weights_only=True)
    assert "model.0.conv.0.conv.weight" in "".join(state) or any(k.endswith("weight") for k in state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    log = proc.stdout + proc.stderr
    assert "val_bpq" in log and "val_mean_dice" in log and "kaggle layout" in log
    assert any(p.name.startswith("events.out.tfevents") for p in (work / "eval").iterdir())


def test_evaluate_writes_metrics(trained):
    work, data, _ = trained
    run_bundle("run", EVALUATE, work, "--dataset_dir", str(data))
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics["fold"] == 3
    assert set(metrics["metrics"]) >= {"val_bpq", "val_mean_dice", "val_pixel_accuracy", "val_loss"}
    assert 0.0 <= metrics["metrics"]["val_pixel_accuracy"] <= 1.0
    assert (work / "eval" / "metrics.csv").read_text().startswith("val_bpq,")
    # the official PanNuke score of the test fold, per tissue and per class
    scores = json.loads((work / "eval" / "pannuke_scores.json").read_text())
    assert scores["overall"]["n_images"] == 2
    assert set(scores["per_class"]) == {"Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial"}
    assert set(scores["per_tissue"]) <= {"Breast", "Colon"}
    assert "bPQ" in metrics["metrics"] and "PQ_Neoplastic" in metrics["metrics"]
    assert (work / "eval" / "pannuke_scores_per_tissue.csv").is_file()


def test_evaluate_without_weights_explains(trained, tmp_path):
    _, data, _ = trained
    proc = run_bundle("run", EVALUATE, tmp_path, "--dataset_dir", str(data), check=False)
    assert proc.returncode != 0
    assert "no trained weights at" in proc.stderr + proc.stdout


def test_bad_dataset_fails_before_touching_the_model(trained, tmp_path):
    work, data, _ = trained
    model = work / "models" / "model.pt"
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    bad = write_dataset(tmp_path / "bad", tiles=(2, 1, 1))
    rewrite(bad, 3, "masks", lambda a: a * 0.5)
    proc = run_bundle("training", TRAIN, work, "--dataset_dir", str(bad), "--epochs", "1", check=False)
    assert proc.returncode != 0
    assert "Fold 3/masks/fold3/masks.npy" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr and "error: " in proc.stderr  # one readable line, no traceback wall
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before


def test_default_run_id_trains_too(tmp_path):
    data = write_dataset(tmp_path / "data", tiles=(2, 1, 1))
    run_bundle(
        "run",
        TRAIN,
        tmp_path,
        "--dataset_dir",
        str(data),
        "--epochs",
        "1",
        "--batch_size",
        "2",
        "--train_folds",
        "[1]",
        "--val_fold",
        "2",
        "--test_fold",
        "3",
    )
    assert (tmp_path / "models" / "model.pt").is_file()
