"""Command-line options that name no config id are refused before any work, with the nearest id suggested."""

from __future__ import annotations

import pytest
import torch

from conftest import BUNDLE_ROOT
from scripts.core.flags import check_overrides
from scripts.core.errors import ConfigError

CONFIGS = BUNDLE_ROOT / "configs"
WSI = ["train.json", "inference.json", "inference_wsi.json"]


def initialize_error(configs: list[str], workflow_type: str = "infer", **overrides) -> str:
    """The message a workflow's initialize stops with (it must stop), as monai.bundle would show it."""
    from monai.bundle import ConfigWorkflow

    from scripts.core.errors import bundle_error_in

    flow = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in configs],
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE_ROOT),
        **overrides,
    )
    with pytest.raises(Exception) as err:
        flow.initialize()
    return str(bundle_error_in(err.value))


def argv(configs: list[str], *options: str) -> list[str]:
    files = "[" + ",".join(repr(str(CONFIGS / c)) for c in configs) + "]"
    return ["run", "training", "--config_file", files, *options]


@pytest.mark.parametrize(
    "configs, option, suggestion",
    [
        (["train.json"], "--epoch", "--epochs"),
        (["train.json"], "--optimiser#lr", "--optimizer"),  # a new key is fine only under an existing component
        (["train.json", "inference.json"], "--outputdir", "--output_dir"),
        (["train.json", "inference.json"], "--tiles_per_batch", ""),  # a slide option without inference_wsi.json
    ],
)
def test_a_misspelt_or_misplaced_option_is_refused(configs, option, suggestion):
    with pytest.raises(ConfigError, match=f"unknown option {option}: no id of that name") as err:
        check_overrides(argv(configs, option, "1"))
    assert ", ".join(configs) in str(err.value)
    assert (f"did you mean {suggestion}?" in str(err.value)) if suggestion else "did you mean" not in str(err.value)


def test_every_documented_kind_of_option_passes():
    options = ["--epochs", "3", "--instances#energy_threshold=0.1", "--train#dataloader#num_workers", "0"]
    options += ["--tracking", "mlflow", "--tracking_uri", "sqlite:///x.db", "--logging_file", "configs/logging.conf"]
    options += ["--init_checkpoint", "m.pt", "--bundle_root", ".", "--optimizer#momentum", "0.9"]  # a new argument
    check_overrides(argv(["train.json", "finetune.json"], *options))
    check_overrides(argv(["train.json", "inference.json", "inference_wsi.json"], "--tile_size", "512", "--mpp", "0.5"))


def test_in_process_workflows_are_not_checked_against_this_process_argv():
    check_overrides()  # pytest's own command line is not monai.bundle's: nothing to check, no error


@pytest.mark.parametrize(
    "kind, name, value",
    [
        ("positive_ints", "epochs", 0),
        ("positive_ints", "batch_size", -2),
        ("positive_ints", "epochs", 2.5),
        ("positive_ints", "val_interval", "1"),
        ("positive_ints", "tile_size", True),
        ("non_negative_ints", "num_workers", -1),
        ("positive_numbers", "learning_rate", "1e-3x"),
        ("positive_numbers", "mpp", 0.0),
        ("positive_numbers", "learning_rate", float("nan")),
        ("positive_numbers", "learning_rate", float("inf")),
        ("non_negative_numbers", "polygon_tolerance", -1),
        ("non_negative_numbers", "hv_mse_weight", "abc"),
        ("non_negative_ints", "seed", "abc"),
        ("devices", "stitch_device", "gpu"),
        ("devices", "device", "cpux"),
        ("unet_features", "features", [16, 16]),
        ("unet_features", "features", [16, 16, 32, 64, 128, 0]),
    ],
)
def test_values_that_cannot_work_are_one_line_naming_the_option(kind, name, value):
    from scripts.core.flags import check_values

    with pytest.raises(ConfigError, match=f"^--{name} must be "):
        check_values(**{kind: {name: value}})
    check_values(positive_ints={"epochs": 3}, non_negative_ints={"num_workers": 0}, positive_numbers={"mpp": None})
    check_values(
        non_negative_numbers={"polygon_tolerance": 0},
        devices={"device": "cpu", "stitch_device": torch.device("cpu")},
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_where_there_is_no_gpu_is_refused():
    from scripts.core.flags import check_values

    with pytest.raises(ConfigError, match="^--device cuda: no CUDA GPU is visible on this machine; use cpu$"):
        check_values(devices={"device": "cuda"})


def test_inference_with_an_impossible_window_stops_before_any_work(tmp_path):
    """The values the inferer would only fail on image by image (every image reported failed) stop the run first,
    here, under torchrun's overlay and in evaluation alike."""
    cases = [
        (["train.json", "inference.json"], {"tile_size": 0}, "--tile_size must be a whole number of at least 1"),
        (["train.json", "inference.json"], {"tile_margin": 2000}, "--tile_margin must be from 0 to --tile_size"),
        (["train.json", "inference.json", "multi_gpu_inference.json"], {"stitch_device": "gpu"}, "--stitch_device"),
        (["train.json", "evaluate.json"], {"device": "gpu"}, "--device must be a torch device"),
        (["train.json", "inference.json"], {"features": [16, 16]}, "--features must be six whole numbers"),
        (["train.json"], {"boundary_weight": -1}, "--boundary_weight must be a number of at least 0"),
        (["train.json"], {"seed": "abc"}, "--seed must be a whole number of at least 0"),
        (WSI, {"postprocess_workers": "abc"}, "--postprocess_workers must be a whole number of at least 0"),
        (WSI, {"tile_margin": -1}, "--tile_margin must be a whole number of at least 0"),
    ]
    for configs, override, message in cases:
        where = {"input_dir": str(tmp_path), "output_dir": str(tmp_path / "out"), "ckpt_dir": str(tmp_path / "models")}
        assert message in initialize_error(configs, **where, **override), (configs, override)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"type_weights": [1, 2]}, "--type_weights needs one weight of at least 0 per nucleus type (5), got [1, 2]"),
        ({"type_weights": "[1,1,1,1,x]"}, "--type_weights needs one weight of at least 0 per nucleus type (5)"),
        ({"target": "hover"}, "--target must be one of"),
        ({"learning_rate": float("inf")}, "--learning_rate must be a number above 0, got inf"),
    ],
)
def test_a_training_with_impossible_loss_settings_stops_before_building_its_cache(tmp_path, override, message):
    """Wrong type weights or target used to be found only when the loss was built, after every fold's cache (minutes
    on PanNuke); the folds' caches must not even be started."""
    from pannuke_fixtures import write_dataset

    data = write_dataset(tmp_path / "data", tiles=(2, 1, 1))
    where = {"dataset_dir": str(data), "ckpt_dir": str(tmp_path / "models"), "cache_dir": str(tmp_path / "cache")}
    assert message in initialize_error(["train.json"], "train", **where, **override)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "models").exists()


def test_a_training_with_zero_epochs_stops_before_any_work(tmp_path):
    where = {"dataset_dir": str(tmp_path / "absent"), "ckpt_dir": str(tmp_path / "models")}
    message = initialize_error(["train.json"], "train", **where, epochs=0)
    assert message == "--epochs must be a whole number of at least 1, got 0"
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    "train, val, test, shared",
    [([3], 2, 3, "test fold 3"), ([1, 2], 2, 3, "validation fold 2"), ([[1], 3], 2, 3, "test fold 3"), (2, 2, 3, "2")],
)
def test_training_on_the_fold_that_scores_it_is_refused(train, val, test, shared):
    from scripts.core.flags import check_folds

    with pytest.raises(ConfigError, match=f"^--train_folds .* includes the .*{shared}.*--allow_fold_overlap true"):
        check_folds(train, val, test)
    check_folds(train, val, test, allow_overlap="true")
    check_folds([1], 2, 3)


def test_a_training_on_its_test_fold_stops_before_any_work(tmp_path):
    where = {"dataset_dir": str(tmp_path / "absent"), "ckpt_dir": str(tmp_path / "models")}
    for configs in (["train.json"], ["train.json", "multi_gpu_train.json"]):
        message = initialize_error(configs, "train", **where, train_folds=[1, 3])
        assert "--train_folds [1, 3] includes the test fold 3" in message, configs
        assert not (tmp_path / "models").exists()
