"""Command-line options that name no config id are refused before any work, with the nearest id suggested."""

from __future__ import annotations

import pytest

from conftest import BUNDLE_ROOT
from scripts.engine.cli_flags import check_overrides
from scripts.errors import ConfigError

CONFIGS = BUNDLE_ROOT / "configs"


def argv(configs: list[str], *options: str) -> list[str]:
    files = "[" + ",".join(repr(str(CONFIGS / c)) for c in configs) + "]"
    return ["run", "training", "--config_file", files, *options]


@pytest.mark.parametrize(
    "configs, option, suggestion",
    [
        (["train.json"], "--epoch", "--epochs"),
        (["train.json", "inference.json"], "--outputdir", "--output_dir"),
        (["train.json", "inference.json"], "--tile_size", "--roi_size"),  # a slide option, without inference_wsi.json
    ],
)
def test_a_misspelt_or_misplaced_option_is_refused(configs, option, suggestion):
    with pytest.raises(ConfigError, match=f"unknown option {option}: no id of that name") as err:
        check_overrides(argv(configs, option, "1"))
    assert f"did you mean {suggestion}?" in str(err.value) and ", ".join(configs) in str(err.value)


def test_every_documented_kind_of_option_passes():
    options = ["--epochs", "3", "--instances#energy_threshold=0.1", "--train#dataloader#num_workers", "0"]
    options += ["--tracking", "mlflow", "--tracking_uri", "sqlite:///x.db", "--logging_file", "configs/logging.conf"]
    options += ["--init_checkpoint", "m.pt", "--bundle_root", "."]
    check_overrides(argv(["train.json", "finetune.json"], *options))
    check_overrides(argv(["train.json", "inference.json", "inference_wsi.json"], "--tile_size", "512", "--mpp", "0.5"))


def test_in_process_workflows_are_not_checked_against_this_process_argv():
    check_overrides()  # pytest's own command line is not monai.bundle's: nothing to check, no error
