"""Inference on PanNuke-format tiles (an images.npy), and what a second run does with the outputs of the first."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from monai.bundle import ConfigParser

from bundle_runner import run_bundle
from conftest import BUNDLE_ROOT
from pannuke_fixtures import fold_path, write_dataset

INFERENCE = ["train.json", "inference.json"]
FEATURES = [8, 8, 16, 16, 32, 8]  # narrow BasicUNet: only the files matter here, not the nuclei
SENTINEL = "left by the first run\n"


def random_model(path) -> None:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser["network_def#features"] = FEATURES
    parser["target"] = "boundary"
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)


def statuses(work) -> dict[str, str]:
    with open(work / "eval" / "inference_summary.csv", newline="") as f:
        return {row["name"]: row["status"] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    work = tmp_path_factory.mktemp("rerun")
    images = fold_path(write_dataset(work / "pannuke", tiles=(1, 1, 2)), 3, "images")  # "Fold 3/images/fold3/..."
    random_model(work / "models" / "model.pt")
    args = ("--input_dir", str(images), "--network_def#features", json.dumps(FEATURES), "--target", "boundary")
    proc = run_bundle("run", INFERENCE, work, *args)
    return work, args, proc


def test_pannuke_tiles_are_segmented_one_by_one(first):
    work, _, proc = first
    assert statuses(work) == {"images_0000": "done", "images_0001": "done"}
    assert (work / "eval" / "images_0001" / "images_0001_nuclei.geojson").is_file()
    assert "2 images to segment" in proc.stdout + proc.stderr


def test_second_run_keeps_outputs_unless_told_to_overwrite(first):
    work, args, _ = first
    csv_file = work / "eval" / "images_0000" / "images_0000_nuclei.csv"
    csv_file.write_text(SENTINEL)

    # fire hands `false` over as the string 'false', which a plain bool() would read as "overwrite"
    proc = run_bundle("run", INFERENCE, work, *args, "--overwrite", "false")
    log = proc.stdout + proc.stderr
    assert csv_file.read_text() == SENTINEL
    assert statuses(work) == {"images_0000": "skipped", "images_0001": "skipped"}
    assert "images_0000: skipped, 5 outputs already in" in log and "--overwrite true" in log

    run_bundle("run", INFERENCE, work, *args, "--overwrite", "true", "--save_nifti", "true")
    assert csv_file.read_text().startswith("id,centroid_x,centroid_y")
    assert statuses(work) == {"images_0000": "done", "images_0001": "done"}
    assert (work / "eval" / "images_0000" / "images_0000_instances.nii.gz").is_file()
