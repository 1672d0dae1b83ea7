"""Inference runs that cannot start say why and how to fix it, before touching any output."""

from __future__ import annotations

import pytest
from bundle_launch import run_bundle

pytestmark = pytest.mark.slow

INFERENCE = ["train.json", "inference.json"]


def test_missing_weights_explain_how_to_get_them(tmp_path):
    """Neither a trained model nor the shipped one (here: pointed at a file that does not exist)."""
    (tmp_path / "images").mkdir()
    absent = tmp_path / "absent" / "model_fp16.pt"
    proc = run_bundle(
        "run",
        INFERENCE,
        tmp_path,
        "--input_dir",
        str(tmp_path / "images"),
        "--pretrained_checkpoint",
        str(absent),
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"no trained weights at {tmp_path / 'models' / 'model.pt'}" in log
    assert f"no shipped pretrained model at {absent}" in log
    assert "Train first" in log and "--checkpoint" in log
    assert not (tmp_path / "eval").exists()


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "slide.svs").write_bytes(b"x")
    proc = run_bundle("run", INFERENCE, tmp_path, "--input_dir", str(tmp_path / "images"), check=False)  # shipped model
    assert proc.returncode != 0
    assert "no images in" in proc.stderr and "slide.svs" in proc.stderr
    assert not (tmp_path / "eval").exists()
