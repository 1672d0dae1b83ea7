"""The shipped pretrained model: small, half precision, loads weights-only into the configured network, is what
inference uses when nothing was trained, and is never touched by a training run."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from bundle_launch import ENV
from conftest import BUNDLE_ROOT
from scripts.core.errors import ModelError
from scripts.data.pannuke.demo_data import make_tile
from scripts.workflows.engine.pretrained import export_half_precision, trained_or_shipped

SHIPPED = BUNDLE_ROOT / "models" / "pretrained" / "model_fp16.pt"


def configured_network(*configs: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / c) for c in configs])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    return parser.get_parsed_content("network_def")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_model_is_small_half_precision_and_loads_weights_only():
    assert SHIPPED.is_file(), "the pretrained model must ship with the bundle"
    assert SHIPPED.stat().st_size <= 5 * 2**20
    state = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    net = configured_network("train.json", "inference.json")
    net.load_state_dict(state)  # strict: same architecture and output channels as the default config
    net.eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 8, 64, 64) and torch.isfinite(out).all()


def test_provenance_and_licence_are_documented():
    readme = (SHIPPED.parent / "README.md").read_text()
    assert "CC BY-NC-SA 4.0" in readme and "CoNSeP" in readme and "MoNuSeg" in readme and "bPQ" in readme
    meta = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
    assert "CC BY-NC-SA 4.0" in meta["pretrained_model"]["license"]
    assert meta["pretrained_model"]["file"] == "models/pretrained/model_fp16.pt"
    assert 0.0 < meta["pretrained_model"]["test_scores"]["bPQ"] < 1.0
    assert f"**{meta['pretrained_model']['test_scores']['bPQ']:.3f}**" in readme  # one figure, in both places


def test_trained_model_wins_over_the_shipped_one(tmp_path):
    shipped, trained = tmp_path / "shipped.pt", tmp_path / "models" / "model.pt"
    with pytest.raises(ModelError, match="no trained weights"):
        trained_or_shipped(trained, shipped)
    torch.save({"w": torch.ones(1)}, shipped)
    assert trained_or_shipped(trained, shipped) == str(shipped)
    trained.parent.mkdir()
    torch.save({"w": torch.ones(1)}, trained)
    assert trained_or_shipped(trained, shipped) == str(trained)


def test_export_half_precision_keeps_integer_buffers(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    out = export_half_precision(tmp_path / "model.pt", tmp_path / "half.pt")
    state = torch.load(out, weights_only=True)
    assert state["0.weight"].dtype == torch.float16 and state["1.num_batches_tracked"].dtype == torch.int64
    with pytest.raises(ValueError, match="plain state dict"):
        torch.save({"model": net.state_dict()}, tmp_path / "nested.pt")
        export_half_precision(tmp_path / "nested.pt", tmp_path / "x.pt")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda state: state["1.running_var"].fill_(-1.0), "negative running variance"),
        (lambda state: state["0.weight"].fill_(float("nan")), "NaN or infinity"),
        (lambda state: state["0.weight"].mul_(1e6), "beyond float16's range"),
    ],
    ids=["impossible statistics", "diverged", "beyond float16"],
)
def test_export_half_precision_never_ships_weights_inference_would_refuse_or_infinity(tmp_path, damage, message):
    state = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).state_dict()
    damage(state)
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ModelError, match=f"model.pt: .*{message}"):
        export_half_precision(tmp_path / "model.pt", tmp_path / "half.pt")
    assert not (tmp_path / "half.pt").exists()


def test_trained_weights_are_ignored_by_git():
    if not (BUNDLE_ROOT.parent / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["bundle/models/model.pt", "bundle/models/training_state.pt", "bundle/models/demo/model.pt"]
    proc = subprocess.run(["git", "check-ignore", *paths], cwd=BUNDLE_ROOT.parent, capture_output=True, text=True)
    assert proc.stdout.split() == paths
    tracked = subprocess.run(
        ["git", "ls-files", "bundle/models"], cwd=BUNDLE_ROOT.parent, capture_output=True, text=True
    )
    assert "bundle/models/pretrained/model_fp16.pt" in tracked.stdout.split()


def run_in(bundle: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args, "--num_workers", "0"]
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_fresh_bundle_segments_with_the_shipped_model_and_training_leaves_it_untouched(tmp_path):
    """The README's order on a fresh clone: inference first (no training), then a training run beside it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(
        BUNDLE_ROOT,
        bundle,
        ignore=shutil.ignore_patterns(
            "demo_data", "cache", "eval", "runs", "__pycache__", "model.pt", "training_state.pt"
        ),
    )
    shipped = bundle / "models" / "pretrained" / "model_fp16.pt"
    before = sha256(shipped)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(make_tile(np.random.default_rng(3))[0].astype(np.uint8)).save(images / "tile.png")
    inference = ["--config_file", "['configs/train.json','configs/inference.json']", "--input_dir", str(images)]
    log = run_in(bundle, *inference, "--output_dir", str(tmp_path / "out"))
    assert "using the shipped pretrained model" in log
    features = json.loads((tmp_path / "out" / "tile" / "tile_nuclei.geojson").read_text())["features"]
    assert len(features) >= 5  # the synthetic tile has 22 nuclei
    run_in(bundle, "training", "--config_file", "['configs/train.json','configs/demo.json']", "--epochs", "1")  # README
    assert (bundle / "models" / "demo" / "model.pt").is_file()  # a model of synthetic tiles, kept apart
    assert sha256(shipped) == before
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["README.md", "model_fp16.pt"]
    log = run_in(bundle, *inference, "--output_dir", str(tmp_path / "out2"))
    assert "using the shipped pretrained model" in log  # the demo did not replace it for real images
    (bundle / "models" / "demo" / "model.pt").rename(bundle / "models" / "model.pt")  # what a real training writes
    log = run_in(bundle, *inference, "--output_dir", str(tmp_path / "out3"))
    assert "using the trained model" in log


SHARED = BUNDLE_ROOT.parents[1] / "shared" / "data" / "nucls"


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data (real annotated H&E tiles)")
@pytest.mark.slow
def test_shipped_model_finds_real_nuclei_on_tiles_it_never_saw(tmp_path):
    """Inference as a user runs it, on real NuCLS tiles (a test set of the shipped model), scored against their
    annotations: far from perfect (a CPU-trained model), but clearly segmenting nuclei."""
    from scripts.workflows.evaluate.pq import pq_counts

    images = tmp_path / "images"
    images.mkdir()
    names = ["test_1", "test_2", "test_3"]
    for name in names:
        shutil.copy(SHARED / "images" / f"{name}.png", images)
    run_in(
        BUNDLE_ROOT,
        "--config_file",
        "['configs/train.json','configs/inference.json']",
        "--input_dir",
        str(images),
        "--output_dir",
        str(tmp_path / "out"),
        "--ckpt_dir",
        str(tmp_path / "no_training"),
    )
    import tifffile

    pq = []
    for name in names:
        predicted = tifffile.imread(tmp_path / "out" / name / f"{name}_instances.tif")
        pq.append(pq_counts(np.load(SHARED / "labels" / f"{name}.npz")["inst_map"], predicted)[2])
    assert np.mean(pq) > 0.3, pq
