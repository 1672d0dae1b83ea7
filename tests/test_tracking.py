"""--tracking mlflow: MONAI's bundle tracking records metrics, and the bundle adds its settings and the model."""

from __future__ import annotations

import pytest
from bundle_launch import run_bundle

pytestmark = pytest.mark.slow

mlflow = pytest.importorskip("mlflow")


def test_tracking_mlflow_logs_parameters_metrics_and_the_model(tmp_path):
    proc = run_bundle(
        "training",
        ["train.json", "demo.json"],
        tmp_path,
        "--tracking",
        "mlflow",
        "--epochs",
        "2",
        "--batch_size",
        "4",
        "--features",
        "[8, 8, 16, 32, 64, 8]",
    )
    assert "logged 14 parameters" in proc.stdout + proc.stderr
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("pannuke_nuclei")
    runs = client.search_runs([experiment.experiment_id])
    trained = [r for r in runs if "learning_rate" in r.data.params]
    assert len(trained) == 1
    run = trained[0]
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["target"] == "hv"
    assert "Neoplastic" in run.data.params["classes"]  # the class list a run trained on
    assert run.data.params["max_epochs"] == "2"  # MONAI's own parameters are there too
    assert "train_loss" in run.data.metrics
    history = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(history) >= 2
    validation = [r for r in runs if "val_bpq" in r.data.metrics]
    assert validation, "the validator's metrics are tracked"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert artifacts == {"model/model.pt"}


def test_without_tracking_nothing_is_logged(tmp_path):
    run_bundle(
        "training", ["train.json", "demo.json"], tmp_path, "--epochs", "1", "--features", "[8, 8, 16, 32, 64, 8]"
    )
    assert not (tmp_path / "eval" / "mlruns.db").exists()
