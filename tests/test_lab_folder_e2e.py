"""A lab's own folder of annotations: converted with --split it trains and evaluates with only --dataset_dir; one
converted fold evaluates with --test_fold; inference needs no fold at all."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bundle_launch import ENV, run_bundle
from conftest import BUNDLE_ROOT
from pannuke_fixtures import write_lab_folder

pytestmark = pytest.mark.slow

TRAIN, EVALUATE = ["train.json"], ["train.json", "evaluate.json"]
SMALL = ["--features", "[8, 8, 16, 32, 64, 8]", "--epochs", "1", "--batch_size", "2"]


def convert(lab, out, *how):
    cmd = [sys.executable, "-m", "scripts.data.pannuke.convert", "--images", str(lab / "images"), "--masks"]
    cmd += [str(lab / "masks"), "--output_dir", str(out), "--tissue", "Colon", *how]
    subprocess.run(cmd, cwd=BUNDLE_ROOT, check=True, capture_output=True, env=ENV, timeout=300)
    return out


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab")
    lab = write_lab_folder(work / "annotations", images=6)
    data = convert(lab, work / "data", "--split", "0.6,0.2,0.2")
    run_bundle("training", TRAIN, work, "--dataset_dir", str(data), *SMALL)
    return work, lab, data


def test_split_folder_trains_and_evaluates_with_only_dataset_dir(lab_run):
    work, _, data = lab_run
    assert (work / "models" / "model.pt").is_file()
    run_bundle("run", EVALUATE, work, "--dataset_dir", str(data), *SMALL[:2])
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics["fold"] == 3 and 0.0 <= metrics["metrics"]["val_bpq"] <= 1.0


def test_one_converted_fold_evaluates_with_test_fold(lab_run, tmp_path):
    work, lab, _ = lab_run
    single = convert(lab, tmp_path / "single", "--fold", "1")
    assert [p.name for p in single.iterdir()] == ["Fold 1"]
    out = tmp_path / "eval"
    run_bundle(
        "run", EVALUATE, work, "--dataset_dir", str(single), "--test_fold", "1", "--output_dir", str(out), *SMALL[:2]
    )
    scores = json.loads((out / "pannuke_scores.json").read_text())
    assert scores["overall"]["n_images"] == 12  # 6 images of 256x300, 2 tiles each
    assert json.loads((out / "metrics.json").read_text())["fold"] == 1


def test_inference_touches_no_fold(lab_run, tmp_path):
    work, lab, _ = lab_run
    out = tmp_path / "out"
    run_bundle(
        "run",
        ["train.json", "inference.json"],
        work,
        "--dataset_dir",
        str(tmp_path / "no_such_dataset"),
        "--input_dir",
        str(lab / "images"),
        "--output_dir",
        str(out),
        "--ckpt_dir",
        str(work / "models"),
        *SMALL[:2],
    )
    assert len(list(out.glob("slide*/slide*_nuclei.geojson"))) == 6
