"""The multi-GPU overlays, run for real by torchrun with 2 CPU processes (gloo), against a single-process run.

What can be compared exactly: data-parallel training with 2 ranks x batch 1 computes the same step as 1 process x
batch 2 when every sample's forward pass is independent of the others in its batch and the loss is a mean over
samples.  The bundle's batch norm breaks the first condition (each rank normalises with its own batch statistics),
so these runs switch to instance norm, turn dropout and random augmentation off, keep the sample order (no
shuffling: rank 0 takes tile 0, rank 1 tile 1, the single process both) and use SGD with momentum (Adam divides
by the gradient's running scale, which turns float rounding noise in near-zero gradients into full-size steps).
DDP averages the ranks' gradients, so weights and momentum buffers must agree to float rounding (measured: weights
within 1e-5, relative; taking the tiles in another order moves them by ~1e-2).  The validation fold has 3 tiles,
split 2 + 1 over the ranks, so its metrics only match if every rank's results are gathered.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from monai.bundle import ConfigParser

from bundle_launch import launch, rank_logs
from conftest import BUNDLE_ROOT
from pannuke_fixtures import write_dataset
from scripts.workflows.evaluate.pq import PER_IMAGE_CSV

pytestmark = pytest.mark.slow

TRAIN, MULTI_TRAIN = ["train.json"], ["train.json", "multi_gpu_train.json"]
EVALUATE, MULTI_EVALUATE = ["train.json", "evaluate.json"], ["train.json", "evaluate.json", "multi_gpu_evaluate.json"]
SMALL_NETWORK = ["--network_def#features", "[8, 8, 16, 32, 64, 8]", "--network_def#norm", "instance"]
SMALL_EXACT_RUN = [
    *SMALL_NETWORK,
    "--epochs",
    "2",
    "--learning_rate",
    "0.05",
    "--val_interval",
    "1",
    "--network_def#dropout",
    "0.0",
    "--train#preprocessing#transforms",
    "$@train#preprocessing_transforms + [@train#targets]",
    "--optimizer#_target_",
    "torch.optim.SGD",
    "--optimizer#momentum",
    "0.9",
    "--validate#dataloader#batch_size",
    "1",
    # equal class weights: a weighted cross-entropy divides by the summed weights of the pixels it sees, so with
    # type weights each rank normalises over its own tiles and 2 x 1 tile differs from 1 x 2 by ~1e-4 by design
    "--type_weights",
    "[1, 1, 1, 1, 1]",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_gpu")
    data = write_dataset(root / "data", tiles=(2, 3, 1))
    common = ["--dataset_dir", str(data), *SMALL_EXACT_RUN]
    single, multi = root / "single", root / "multi"
    # command-line values go through python-fire: `False` arrives as a bool, `false` as a (truthy) string
    launch("training", TRAIN, single, *common, "--batch_size", "2", "--train#dataloader#shuffle", "False")
    launch("training", MULTI_TRAIN, multi, *common, "--batch_size", "1", "--train#sampler#shuffle", "False", ranks=2)
    return single, multi, data, rank_logs(multi, 2)


def load_state(work: Path) -> dict:
    return torch.load(work / "models" / "training_state.pt", weights_only=True)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def test_two_ranks_train_like_one_process_with_the_whole_batch(runs):
    single, multi, _, _ = runs
    one, two = load_state(single), load_state(multi)
    assert one["trainer"]["iteration"] == two["trainer"]["iteration"] == 2  # 2 epochs of 1 step (2 tiles)
    assert one["model"].keys() == two["model"].keys()
    worst = max(relative_difference(one["model"][k], two["model"][k]) for k in one["model"])
    assert worst < 1e-4, f"weights differ by {worst:.2e} (float rounding is ~1e-5; a different sample order ~1e-2)"
    momentum = [
        torch.cat([s["momentum_buffer"].flatten() for s in state["optimizer"]["state"].values()])
        for state in (one, two)
    ]
    assert momentum[0].norm() > 1.0  # the gradients were large: the comparison means something
    assert relative_difference(*momentum) < 1e-3
    # the validation metric covers all 3 tiles of the fold on both runs (2 + 1 tiles on the two ranks)
    assert one["evaluator"]["best_metric_epoch"] == two["evaluator"]["best_metric_epoch"]
    assert one["evaluator"]["best_metric"] == pytest.approx(two["evaluator"]["best_metric"], rel=1e-4)
    assert one["early_stopping"]["counter"] == two["early_stopping"]["counter"]


def test_only_rank_zero_writes(runs):
    single, multi, _, logs = runs
    assert sorted(p.name for p in (multi / "models").iterdir()) == ["model.pt", "training_state.pt"]
    state = torch.load(multi / "models" / "model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state)  # a plain state dict, not the DDP wrapper's
    events = sorted(p.name for p in (multi / "eval").iterdir())
    assert len(events) == len(list((single / "eval").iterdir()))  # one set of TensorBoard files, not one per rank
    assert "new best val_bpq" in logs[0] and "Epoch: 2/2" in logs[0]
    assert "Traceback" not in logs[1] and "saved" not in logs[1]
    # the fold cache was written once, by rank 0, and renamed into place: no half-built folders left
    assert sorted(p.name[:5] for p in (multi / "cache").iterdir()) == ["fold1", "fold2", "fold3"]
    assert logs[0].count("converting") == 3 and "converting" not in logs[1]


def test_sharded_evaluation_scores_the_whole_fold(runs, tmp_path):
    """Score the single-process model on its validation fold with 2 ranks: it must reproduce that run's best metric."""
    single, _, data, _ = runs
    (tmp_path / "models").mkdir()
    shutil.copy(single / "models" / "model.pt", tmp_path / "models" / "model.pt")
    best = load_state(single)["evaluator"]["best_metric"]  # val_bpq of these weights over fold 2, one process
    launch(
        "run",
        MULTI_EVALUATE,
        tmp_path,
        "--dataset_dir",
        str(data),
        "--test_fold",
        "2",
        "--batch_size",
        "1",
        *SMALL_NETWORK,
        ranks=2,
    )
    logs = rank_logs(tmp_path, 2)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["val_bpq"] == pytest.approx(best, rel=1e-5)
    assert {"bPQ", "mPQ"} <= metrics.keys()
    # the PanNuke per-image table holds the 3 tiles once each, in dataset order (2 + 1 tiles scored on two ranks)
    table = (tmp_path / "eval" / PER_IMAGE_CSV).read_text().splitlines()
    assert [row.split(",")[1] for row in table[1:]] == ["Breast", "Colon", "Lung"], table
    assert "PQ" in logs[0] and "Traceback" not in logs[1]


def overlay_handlers(configs: list[str], section: str, rank: int) -> tuple[set[str], set[str]]:
    """(handler targets kept on `rank`, targets disabled there), evaluating each `_disabled_` flag as that rank."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / c) for c in configs])
    parser.parse()
    kept, disabled = set(), set()
    with (
        mock.patch("torch.distributed.is_initialized", return_value=True),
        mock.patch("torch.distributed.get_rank", return_value=rank),
    ):
        for i, item in enumerate(parser[section]):
            if isinstance(item, str):  # a reference, such as @validate#early_stopper
                target = parser[item[1:]]["_target_"]
            else:
                target = item["_target_"]
            has_flag = isinstance(item, dict) and "_disabled_" in item
            off = has_flag and parser.get_parsed_content(f"{section}#{i}#_disabled_")
            (disabled if off else kept).add(target.rsplit(".", 1)[-1])
    return kept, disabled


@pytest.mark.parametrize("train", [TRAIN, MULTI_TRAIN])
def test_side_effect_handlers_run_on_rank_zero_only(train):
    """Named, not positional: train.json's `secondary_rank` switches MONAI's loggers off on ranks > 0, and the
    bundle's own handlers check the rank themselves, so the multi-GPU overlays never touch a handler list."""
    kept, disabled = overlay_handlers(train, "train#handlers", rank=1)
    assert kept == {
        "StopOnNonFiniteLoss",
        "LrScheduleHandler",
        "ValidationHandler",
        "LearningRateLogger",
        "TrainingState",
    }
    assert disabled == {"StatsHandler", "TensorBoardStatsHandler"}
    kept, disabled = overlay_handlers(train, "validate#handlers", rank=1)
    assert kept == {"ResumableEarlyStopping", "BestModelSaver"}  # the same gathered metric on every rank
    assert disabled == {"StatsHandler", "TensorBoardStatsHandler", "TensorBoardImageHandler"}
    assert overlay_handlers(train, "validate#handlers", rank=0)[1] == set()
    evaluate = EVALUATE if train == TRAIN else MULTI_EVALUATE
    kept, disabled = overlay_handlers(evaluate, "validate#handlers", rank=1)
    # the PanNuke scorer and MetricsSaver gather across ranks (collective calls), so every rank runs them
    assert kept == {"WeightsLoader", "PanNukeScoreHandler", "MetricsSaver", "MetricsJSONSaver"}
    assert disabled == {"StatsHandler"}


def test_overlays_name_what_they_change():
    overlays = ("multi_gpu_train.json", "multi_gpu_evaluate.json", "evaluate.json", "train_fast.json", "demo.json")
    for name in (*overlays, "inference_wsi.json", "multi_gpu_inference.json"):
        keys = json.loads((BUNDLE_ROOT / "configs" / name).read_text())
        positional = [k for k in keys if any(part.isdigit() for part in k.split("#"))]
        assert not positional, f"{name} changes list positions: {positional}"
    for name in ("multi_gpu_train.json", "multi_gpu_evaluate.json", "multi_gpu_inference.json"):
        keys = json.loads((BUNDLE_ROOT / "configs" / name).read_text())
        assert "initialize" not in keys and "join_ranks" in keys, f"{name} restates the start-up steps"


def test_own_handlers_write_nothing_on_a_secondary_rank(tmp_path):
    from types import SimpleNamespace

    import torch

    from scripts.workflows.engine.checkpointing import BestModelSaver
    from scripts.workflows.engine.handlers import LearningRateLogger, MetricsJSONSaver

    state = {"epoch": 1, "best_metric_epoch": 1, "best_metric": 0.5, "key_metric_name": "val_bpq"}
    engine = SimpleNamespace(state=SimpleNamespace(**state, metrics={"val_bpq": 0.5}))
    network = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    handlers = [
        BestModelSaver(network, tmp_path / "model.pt"),
        LearningRateLogger(optimizer, str(tmp_path / "tb")),
        MetricsJSONSaver(str(tmp_path)),
    ]
    with (
        mock.patch("torch.distributed.is_initialized", return_value=True),
        mock.patch("torch.distributed.get_rank", return_value=1),
    ):
        for handler in handlers:
            handler(engine)
    assert not list(tmp_path.iterdir())
    for handler in handlers[::2]:  # and in a single process they do write
        handler(engine)
    assert {p.name for p in tmp_path.iterdir()} == {"model.pt", "metrics.json"}


def test_outside_torchrun_the_overlay_says_how_to_start_it():
    from scripts.core.distributed import init_distributed
    from scripts.core.errors import ConfigError

    outside = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with mock.patch.dict(os.environ, outside, clear=True), pytest.raises(ConfigError, match="started by torchrun"):
        init_distributed()
