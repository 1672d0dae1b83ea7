"""Inference end to end through `python -m monai.bundle run` on a folder of mixed, partly broken H&E-like images.

One run covers the sizes and formats (256x256 RGBA PNG, 300x500 JPEG, 1000x1000 TIFF) next to a grayscale PNG, a
truncated JPEG and a text file; the tests then read what it wrote (16-bit and other conversions are covered in
test_inference_data.py).  The model is the bundle's BasicUNet (narrower, for CPU speed) with random features and a
least-squares fitted last layer, which is enough to find nuclei in the synthetic tiles without a training loop.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser
from PIL import Image

from bundle_launch import run_bundle
from conftest import BUNDLE_ROOT
from scripts.data.pannuke.demo_data import make_tile
from scripts.data.pannuke.format import NUM_CLASSES, TILE_SIZE, TYPE_NAMES
from scripts.model.targets import label_map
from scripts.data.pannuke.cache import masks_to_instances

pytestmark = pytest.mark.slow

INFERENCE = ["train.json", "inference.json"]
FEATURES = [16, 16, 32, 32, 64, 32]  # the bundle's BasicUNet, narrower: same code path, a fraction of the CPU time
FEATURE_OVERRIDE = ("--network_def#features", json.dumps(FEATURES), "--target", "boundary")
GOOD = {"alpha": (256, 256), "wide": (300, 500), "large": (1000, 1000)}  # alpha.png is also the 256x256 case
MARGIN = 60  # transparent columns on the right of alpha.png


def he_like(h: int, w: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8 mosaic of the synthetic demo tiles, cropped: nuclei everywhere, at any size."""
    rng = np.random.default_rng(seed)
    rows, cols = -(-h // TILE_SIZE), -(-w // TILE_SIZE)
    rows_of_tiles = [np.concatenate([make_tile(rng)[0] for _ in range(cols)], axis=1) for _ in range(rows)]
    return np.concatenate(rows_of_tiles, axis=0)[:h, :w].astype(np.uint8)


def network_def(features: list[int]) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser["network_def#features"] = features
    parser["target"] = "boundary"  # fitted_model fits the 7 boundary-target classes
    return parser.get_parsed_content("network_def")


def fitted_model(path: Path, features: list[int] = FEATURES) -> Path:
    """State dict of a random-feature BasicUNet whose last 1x1 conv is fitted to demo tiles' labels by least squares."""
    torch.manual_seed(0)
    net = network_def(features).eval()
    seen: dict[str, torch.Tensor] = {}
    net.final_conv.register_forward_hook(lambda module, inputs, output: seen.__setitem__("x", inputs[0]))
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for _ in range(2):
        image, masks = make_tile(rng)
        with torch.no_grad():
            net(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
        xs.append(seen["x"][0].flatten(1).T.numpy())
        ys.append(np.eye(NUM_CLASSES)[label_map(*masks_to_instances(masks)).ravel()])
    x = np.concatenate(xs)
    weights, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], 10 * (np.concatenate(ys) - 0.5), rcond=None)
    with torch.no_grad():
        net.final_conv.weight.copy_(torch.from_numpy(weights[:-1].T).float()[..., None, None])
        net.final_conv.bias.copy_(torch.from_numpy(weights[-1]).float())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def write_inputs(folder: Path) -> dict[str, np.ndarray]:
    """The mixed folder; returns the RGB each good image should be read as."""
    folder.mkdir(parents=True)
    expected = {}
    for seed, (name, (h, w)) in enumerate(GOOD.items()):
        expected[name] = he_like(h, w, seed)
    Image.fromarray(expected["wide"]).save(folder / "wide.jpg", quality=95)
    expected["wide"] = np.asarray(Image.open(folder / "wide.jpg"))  # JPEG is lossy: what the decoder gives back
    tifffile.imwrite(folder / "large.tif", expected["large"], photometric="rgb", compression="zlib")
    rgba = np.dstack([expected["alpha"], np.full(GOOD["alpha"], 255, np.uint8)])
    rgba[:, -MARGIN:, 3] = 0
    expected["alpha"][:, -MARGIN:] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(expected["wide"][..., 0]).save(folder / "gray.png")
    jpeg = folder / "broken.jpg"
    Image.fromarray(expected["wide"]).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:2000])
    (folder / "notes.txt").write_text("scanner log")
    return expected


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("inference")
    expected = write_inputs(work / "images")
    fitted_model(work / "models" / "model.pt")
    proc = run_bundle("run", INFERENCE, work, "--input_dir", str(work / "images"), *FEATURE_OVERRIDE, check=False)
    return work, expected, proc


def outputs(work: Path, name: str) -> Path:
    return work / "eval" / name


def test_bad_files_are_reported_and_the_rest_is_processed(run):
    work, _, proc = run
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "2 of 5 images failed" in proc.stderr
    assert "gray: FAILED" in log and "grayscale" in log
    assert "broken: FAILED" in log and "broken.jpg: not a readable image" in log
    assert "not images: notes.txt" in log
    assert "5 images, 3 done" in log
    with open(work / "eval" / "inference_summary.csv", newline="") as f:
        status = {row["name"]: row["status"] for row in csv.DictReader(f)}
    assert status == {**dict.fromkeys(GOOD, "done"), "gray": "failed", "broken": "failed"}
    assert not outputs(work, "gray").exists() and not outputs(work, "broken").exists()


def test_maps_have_the_input_size(run):
    work, expected, _ = run
    for name, (h, w) in GOOD.items():
        folder = outputs(work, name)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{name}{s}" for s in ("_instances.tif", "_types.tif", "_nuclei.geojson", "_nuclei.csv", "_overlay.png")
        )
        inst = tifffile.imread(folder / f"{name}_instances.tif")
        types = tifffile.imread(folder / f"{name}_types.tif")
        overlay = np.asarray(Image.open(folder / f"{name}_overlay.png"))
        assert inst.shape == types.shape == (h, w) and overlay.shape == (h, w, 3)
        assert inst.dtype == np.uint16
        background = inst == 0  # the overlay only paints nucleus outlines; elsewhere it is the input as read
        np.testing.assert_array_equal(overlay[background], expected[name][background])


def test_geojson_csv_and_label_map_describe_the_same_nuclei(run):
    work, _, _ = run
    total = 0
    for name in GOOD:
        folder = outputs(work, name)
        inst = tifffile.imread(folder / f"{name}_instances.tif")
        types = tifffile.imread(folder / f"{name}_types.tif")
        ids = set(np.unique(inst[inst > 0]).tolist())
        features = json.loads((folder / f"{name}_nuclei.geojson").read_text())["features"]
        with open(folder / f"{name}_nuclei.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {f["properties"]["nucleus_id"] for f in features} == ids == {int(r["nucleus_id"]) for r in rows}
        assert len(features) == len(rows) == len(ids)
        for feature in features:
            ring = feature["geometry"]["coordinates"][0]
            assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) >= 5
            assert feature["properties"]["classification"]["name"] in TYPE_NAMES
        for row in rows:
            nucleus = inst == int(row["nucleus_id"])
            assert float(row["area_px"]) == nucleus.sum()
            rows_at, cols_at = np.nonzero(nucleus)  # centroids on the pixel-edge convention, as slides write them
            assert abs(float(row["x_px"]) - (cols_at.mean() + 0.5)) < 0.01
            assert abs(float(row["y_px"]) - (rows_at.mean() + 0.5)) < 0.01
            assert (types[nucleus] == int(row["type_id"])).all() and row["type"] == TYPE_NAMES[int(row["type_id"]) - 1]
        total += len(ids)
    assert total >= 50, f"the fitted model found only {total} nuclei: the checks above were nearly vacuous"


def test_transparent_margin_is_empty_glass(run):
    work, _, _ = run
    inst = tifffile.imread(outputs(work, "alpha") / "alpha_instances.tif")
    assert inst[:, : -MARGIN - 16].any()
    assert not inst[:, -MARGIN + 16 :].any()
