"""A corpus of bad inputs and faults, each run through the real command a user would type.

Every case asserts: the exit status says failure, the message names the file (or option) at fault, no traceback
wall is printed for an error the bundle expects, no code ran from data, and what earlier runs wrote (weights,
scores, inference outputs) is byte-identical afterwards.  Inputs are generated here; nothing binary is committed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_launch import ENV, run_bundle
from conftest import BUNDLE_ROOT
from pannuke_fixtures import fold_path, rewrite, write_dataset, write_lab_folder
from PIL import Image

pytestmark = pytest.mark.slow

TRAIN, EVALUATE, INFERENCE = ["train.json"], ["train.json", "evaluate.json"], ["train.json", "inference.json"]
SMALL = ("--features", "[8, 8, 16, 32, 64, 8]", "--num_workers", "0")


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A good training, evaluation and inference whose outputs no failing run may touch."""
    work = tmp_path_factory.mktemp("corpus")
    data = write_dataset(work / "data", tiles=(2, 1, 1))
    run_bundle("training", TRAIN, work, "--dataset_dir", str(data), "--epochs", "1", "--batch_size", "2", *SMALL)
    run_bundle("run", EVALUATE, work, "--dataset_dir", str(data), *SMALL)
    images = work / "images"
    images.mkdir()
    Image.fromarray(np.rint(np.load(fold_path(data, 3, "images"))[0]).astype(np.uint8)).save(images / "tile.png")
    run_bundle("run", INFERENCE, work, "--input_dir", str(images), "--output_dir", str(work / "out"), *SMALL)
    kept = {name: _digests(work / name) for name in ("models", "eval", "out")}
    return work, data, kept


def _expect_clean_failure(proc: subprocess.CompletedProcess, *names: str) -> str:
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: " in proc.stderr
    for name in names:
        assert name in log, (name, log[-3000:])
    return log


def _unchanged(earlier) -> None:
    work, _, kept = earlier
    for name, digests in kept.items():  # every file an earlier run wrote is still there, byte for byte
        now = _digests(work / name)
        changed = [path for path, digest in digests.items() if now.get(path) != digest]
        assert not changed, f"{name}: {changed} changed or vanished"


def _copy_data(earlier, tmp_path) -> Path:
    return Path(shutil.copytree(earlier[1], tmp_path / "data"))


# ---------------------------------------------------------------- training on a bad dataset


def _train(earlier, data, *extra):
    work = earlier[0]
    return run_bundle("training", TRAIN, work, "--dataset_dir", str(data), "--epochs", "1", *SMALL, *extra, check=False)


@pytest.mark.parametrize(
    "damage, names",
    [
        ("fractional_masks", ["Fold 3/masks/fold3/masks.npy", "integer instance ids"]),
        ("unit_scale_images", ["Fold 2/images/fold2/images.npy", "0-1 scale"]),
        ("nan_images", ["Fold 1/images/fold1/images.npy", "NaN"]),
        ("truncated_images", ["Fold 1/images/fold1/images.npy", "truncated"]),
        ("missing_fold", ["fold 2 not found"]),
        ("wrong_shape", ["Fold 1/masks/fold1/masks.npy", "expected shape"]),
        ("header_says_float32", ["Fold 2/masks/fold2/masks.npy", "header does not describe its data"]),
        ("huge_ids", ["Fold 1/masks/fold1/masks.npy", "an instance id of"]),
        ("non_utf8_tissue_names", ["Fold 1/images/fold1/types.npy"]),
    ],
)
def test_bad_dataset(earlier, tmp_path, damage, names):
    data = _copy_data(earlier, tmp_path)
    if damage == "fractional_masks":
        rewrite(data, 3, "masks", lambda a: a * 0.5)
    elif damage == "unit_scale_images":
        rewrite(data, 2, "images", lambda a: a / 255.0)
    elif damage == "nan_images":
        rewrite(data, 1, "images", lambda a: np.where(a > 250, np.nan, a))
    elif damage == "truncated_images":
        path = fold_path(data, 1, "images")
        os.truncate(path, path.stat().st_size - 5000)
    elif damage == "missing_fold":
        shutil.rmtree(data / "Fold 2")
    elif damage == "header_says_float32":  # float64 bytes under a float32 header: read as other numbers
        path = fold_path(data, 2, "masks")
        path.write_bytes(path.read_bytes().replace(b"'descr': '<f8'", b"'descr': '<f4'", 1))
    elif damage == "huge_ids":  # an integer-valued float beyond what relabelling can hold
        rewrite(data, 1, "masks", lambda m: np.where(m > 0, 1e20, 0.0))
    elif damage == "non_utf8_tissue_names":
        np.save(fold_path(data, 1, "types"), np.array([b"Colon\xff", b"Breast"]))
    else:
        rewrite(data, 1, "masks", lambda a: a[..., :5])
    _expect_clean_failure(_train(earlier, data), *names)
    _unchanged(earlier)


def test_a_pickled_types_file_never_runs_its_code(earlier, tmp_path):
    data = _copy_data(earlier, tmp_path)
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    np.save(fold_path(data, 1, "types"), np.array([Payload(), Payload()], dtype=object), allow_pickle=True)
    _expect_clean_failure(_train(earlier, data), "Fold 1/images/fold1/types.npy", "never does")
    assert not marker.exists()
    _unchanged(earlier)


@pytest.mark.parametrize(
    "extra, names",
    [
        (("--resume", "maybe"), ["--resume must be true or false"]),
        (("--ckpt_dir", "FILE/models"), ["--ckpt_dir", "cannot be written"]),
        (("--epoch", "1"), ["unknown option --epoch", "did you mean --epochs?"]),
        (("--outputdir", "x"), ["unknown option --outputdir", "did you mean --output_dir?"]),
        (("--type_weights", "[1, 2]"), ["--type_weights needs one weight of at least 0 per nucleus type (5)"]),
        (("--learning_rate", "inf"), ["--learning_rate must be a number above 0"]),
        (("--val_fold", "1"), ["tiles the model learnt from", "--allow_fold_overlap"]),
    ],
)
def test_bad_training_options(earlier, tmp_path, extra, names):
    (tmp_path / "FILE").write_text("a file, not a folder")
    extra = tuple(e.replace("FILE", str(tmp_path / "FILE")) for e in extra)
    _expect_clean_failure(_train(earlier, earlier[1], *extra), *names)
    _unchanged(earlier)


def test_resume_without_a_state_says_so(earlier, tmp_path):
    models = tmp_path / "models"
    proc = _train(earlier, earlier[1], "--resume", "true", "--ckpt_dir", str(models))
    _expect_clean_failure(proc, f"no training state at {models / 'training_state.pt'}")


# ---------------------------------------------------------------- evaluation and inference with bad weights


def _bad_weights(earlier, tmp_path, kind: str) -> Path:
    good = earlier[0] / "models" / "model.pt"
    models = tmp_path / "models"
    models.mkdir()
    path = models / "model.pt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:5000])
    elif kind == "random":
        path.write_bytes(os.urandom(20000))
    elif kind == "nan":
        state = torch.load(good, weights_only=True)
        next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
        torch.save(state, path)
    elif kind == "negative_variance":  # finite, but every output would be NaN: 0 nuclei reported as success
        state = torch.load(good, weights_only=True)
        next(v for k, v in state.items() if k.endswith("running_var")).fill_(-1.0)
        torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "kind, names",
    [
        ("truncated", ["model.pt: not a readable PyTorch checkpoint"]),
        ("random", ["model.pt: not a readable PyTorch checkpoint"]),
        ("nan", ["model.pt:", "NaN or infinity"]),
        ("other_width", ["model.pt was not made for this network", "--features"]),
        ("negative_variance", ["model.pt:", "negative running variance"]),
    ],
)
def test_evaluate_refuses_bad_weights(earlier, tmp_path, kind, names):
    models = _bad_weights(earlier, tmp_path, kind).parent if kind != "other_width" else earlier[0] / "models"
    overrides = ["--dataset_dir", str(earlier[1]), "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "eval")]
    features = "[16, 16, 32, 64, 128, 16]" if kind == "other_width" else SMALL[1]
    proc = run_bundle(
        "run", EVALUATE, earlier[0], *overrides, "--features", features, "--num_workers", "0", check=False
    )
    _expect_clean_failure(proc, *names)
    assert not (tmp_path / "eval" / "metrics.json").exists()
    _unchanged(earlier)


def test_inference_with_random_weights_stops_before_any_output(earlier, tmp_path):
    path = _bad_weights(earlier, tmp_path, "random")
    overrides = ["--input_dir", str(earlier[0] / "images"), "--checkpoint", str(path)]
    proc = run_bundle(
        "run", INFERENCE, earlier[0], *overrides, "--output_dir", str(tmp_path / "out"), *SMALL, check=False
    )
    _expect_clean_failure(proc, "model.pt: not a readable PyTorch checkpoint")
    assert not list((tmp_path / "out").glob("*/*"))
    _unchanged(earlier)


@pytest.mark.parametrize("workflow", ["evaluate", "inference"])
def test_an_unwritable_output_dir_is_found_before_the_work(earlier, tmp_path, workflow):
    (tmp_path / "FILE").write_text("a file")
    out = str(tmp_path / "FILE" / "eval")
    if workflow == "evaluate":
        proc = run_bundle(
            "run", EVALUATE, earlier[0], "--dataset_dir", str(earlier[1]), "--output_dir", out, *SMALL, check=False
        )
    else:
        inputs = str(earlier[0] / "images")
        proc = run_bundle("run", INFERENCE, earlier[0], "--input_dir", inputs, "--output_dir", out, *SMALL, check=False)
    _expect_clean_failure(proc, "--output_dir", "cannot be written")
    _unchanged(earlier)


def test_inference_on_an_empty_folder(earlier, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_bundle("run", INFERENCE, earlier[0], "--input_dir", str(tmp_path / "empty"), *SMALL, check=False)
    _expect_clean_failure(proc, f"no images in {tmp_path / 'empty'}")
    _unchanged(earlier)


def test_one_corrupt_image_fails_alone(earlier, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(earlier[0] / "images", images)
    (images / "broken.png").write_bytes((images / "tile.png").read_bytes()[:300])
    out = tmp_path / "out"
    proc = run_bundle(
        "run", INFERENCE, earlier[0], "--input_dir", str(images), "--output_dir", str(out), *SMALL, check=False
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "broken.png" in log and "1 of 2 images failed" in log
    assert (out / "tile" / "tile_nuclei.geojson").is_file() and not (out / "broken").exists()
    _unchanged(earlier)


def test_names_a_spreadsheet_or_the_file_system_would_misread_stay_harmless(earlier, tmp_path):
    """An image named `...png` (stem `..`, passed as the input itself: a folder listing skips hidden files) wrote
    into the output folder's parent; one named `=1+1.png` reached inference_summary.csv as a formula."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("...png", "=1+1.png"):
        shutil.copy(earlier[0] / "images" / "tile.png", images / name)
    for source, out in ((images, tmp_path / "a" / "out"), (images / "...png", tmp_path / "b" / "out")):
        run_bundle("run", INFERENCE, earlier[0], "--input_dir", str(source), "--output_dir", str(out), *SMALL)
        assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # nothing beside the output folder
    assert (tmp_path / "a" / "out" / "=1+1" / "=1+1_nuclei.geojson").is_file()
    assert (tmp_path / "b" / "out" / "_.." / "_.._nuclei.csv").is_file()
    summary = (tmp_path / "a" / "out" / "inference_summary.csv").read_text()
    assert "\n'=1+1," in summary and "\n=1+1," not in summary
    _unchanged(earlier)


def _infer(earlier, images: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The README's tile inference of `images` into `out` with the corpus's small network; never raises."""
    overrides = ["--input_dir", str(images), "--output_dir", str(out), *SMALL, *extra]
    return run_bundle("run", INFERENCE, earlier[0], *overrides, check=False)


@pytest.mark.parametrize("content", ["[1]", '{"pid": "abc"}'])
def test_a_damaged_output_lock_is_one_line(earlier, tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".outputs.lock").write_text(content)
    proc = _infer(earlier, earlier[0] / "images", out)
    _expect_clean_failure(proc, f"the output folder {out} is in use by another run", "or a damaged lock")
    _unchanged(earlier)


def test_a_link_inside_the_output_folder_is_never_written_through(earlier, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tile_nuclei.csv").write_text("someone else's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tile").symlink_to(outside)
    proc = _infer(earlier, earlier[0] / "images", out, "--overwrite", "true")
    assert proc.returncode == 1 and "tile is a symbolic link out of --output_dir" in proc.stdout + proc.stderr
    assert (outside / "tile_nuclei.csv").read_text() == "someone else's file" and len(list(outside.iterdir())) == 1
    _unchanged(earlier)


# ---------------------------------------------------------------- the converter


def _convert(lab: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "scripts.data.pannuke.convert",
        "--images",
        str(lab / "images"),
        "--masks",
        str(lab / "masks"),
    ]
    cmd += ["--output_dir", str(out), "--fold", "1"]
    return subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.mark.parametrize(
    "damage, names",
    [
        ("grayscale", ["slide00.png", "grayscale"]),
        ("size", ["slide01.npz is 256x300", "same height and width"]),
        ("corrupt", ["slide02.png", "not a readable image"]),
    ],
)
def test_converter_bad_pairs(tmp_path, damage, names):
    lab = write_lab_folder(tmp_path / "lab", images=3)
    if damage == "grayscale":
        Image.fromarray(np.full((256, 300), 128, np.uint8)).save(lab / "images" / "slide00.png")
    elif damage == "size":
        Image.fromarray(np.full((200, 300, 3), 128, np.uint8)).save(lab / "images" / "slide01.png")
    else:
        (lab / "images" / "slide02.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    proc = _convert(lab, out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for name in names:
        assert name in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())
