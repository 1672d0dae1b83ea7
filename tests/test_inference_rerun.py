"""Inference on PanNuke-format tiles (an images.npy), and what a second run does with the outputs of the first."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from monai.bundle import ConfigParser

from bundle_launch import run_bundle
from conftest import BUNDLE_ROOT
from pannuke_fixtures import fold_path, write_dataset

pytestmark = pytest.mark.slow

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
    assert csv_file.read_text().startswith("nucleus_id,x_px,y_px,x_um,y_um")
    assert statuses(work) == {"images_0000": "done", "images_0001": "done"}
    assert (work / "eval" / "images_0000" / "images_0000_instances.nii.gz").is_file()


def test_an_incomplete_set_from_an_interrupted_run_is_redone(first):
    """Issue 10, defect 2: a set with a file missing used to be 'skipped, 4 outputs already', exit 0, forever."""
    work, args, _ = first
    run_bundle("run", INFERENCE, work, *args, "--overwrite", "true")  # both images complete
    overlay = work / "eval" / "images_0001" / "images_0001_overlay.png"
    overlay.unlink()  # what a full disk or a kill between two files used to leave
    proc = run_bundle("run", INFERENCE, work, *args)
    assert statuses(work) == {"images_0000": "skipped", "images_0001": "done"}
    assert overlay.is_file()
    assert "images_0001: outputs in" in proc.stdout + proc.stderr and "incomplete" in proc.stdout + proc.stderr


def one_nucleus_tile():
    """A 32² tile with one nucleus: its instance map, and a function writing a map's nuclei through `outputs`, as
    the writer hands a post-processed image to them."""
    import numpy as np

    from scripts.core.classes import PANNUKE
    from scripts.workflows.predict.nucleus_record import nucleus_outlines, nucleus_table
    from scripts.workflows.predict.tile_nuclei import TileNuclei

    inst = np.zeros((32, 32), np.int32)
    inst[4:12, 4:12] = 1

    def write(outputs, labels=inst):
        job = outputs.start({"name": "tile", "rgb": np.full((32, 32, 3), 200, np.uint8)})
        types, probs = np.array([0, 2], np.uint8), np.array([0.0, 0.9], np.float32)
        table = nucleus_table(labels, types, probs, PANNUKE)
        outputs.add(job, TileNuclei(table, nucleus_outlines(labels, table["nucleus_id"]), labels))

    return inst, write


def test_a_failed_write_leaves_the_outputs_complete_or_absent(tmp_path, monkeypatch):
    import errno
    import os

    import numpy as np

    import scripts.workflows.predict.image_outputs as writer_module
    from scripts.workflows.predict.image_outputs import ImageOutputs

    inst, write = one_nucleus_tile()
    writer = ImageOutputs(output_dir=str(tmp_path), overwrite=True)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "overlay_png", disk_full)  # the 5th of 5 files fails
    with pytest.raises(OSError, match="No space"):
        write(writer)
    assert not writer.existing("tile")  # absent: nothing half-done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tile"] or not any(tmp_path.iterdir())
    assert not list(tmp_path.glob(".tile.partial-*"))  # no staging folder left
    monkeypatch.undo()
    write(writer)
    assert writer.complete("tile")
    first = {p.name: p.read_bytes() for p in writer.existing("tile")}
    monkeypatch.setattr(writer_module, "overlay_png", disk_full)
    moved = np.roll(inst, 9, axis=1)
    with pytest.raises(OSError):
        write(writer, moved)  # an overwrite with other nuclei that fails keeps the complete set it would have replaced
    assert {p.name: p.read_bytes() for p in writer.existing("tile")} == first
    # a kill between two moves of an overwrite leaves a mixed set: flagged, so it is not taken for complete
    monkeypatch.undo()
    moves = []

    def killed_after_two(src, dst):
        if os.path.dirname(dst) == str(tmp_path / "tile"):  # the moves into place, not the staged writes
            if len(moves) == 2:
                raise KeyboardInterrupt  # stands for SIGKILL: nothing after this point runs
            moves.append(dst)
        os.rename(src, dst)

    monkeypatch.setattr(writer_module.os, "replace", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        write(writer, moved)
    monkeypatch.undo()
    assert len(moves) == 2 and not writer.missing("tile") and not writer.complete("tile")


def test_a_link_inside_the_output_folder_is_never_written_through(tmp_path):
    from scripts.core.errors import InferenceError
    from scripts.workflows.predict.image_outputs import ImageOutputs

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tile_nuclei.csv").write_text("someone else's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tile").symlink_to(outside)  # a link where the image's folder goes
    _, write = one_nucleus_tile()
    with pytest.raises(InferenceError, match="tile is a symbolic link out of --output_dir"):
        write(ImageOutputs(output_dir=str(out), overwrite=True))
    assert sorted(p.name for p in outside.iterdir()) == ["tile_nuclei.csv"]
    assert (outside / "tile_nuclei.csv").read_text() == "someone else's file"
    assert sorted(p.name for p in out.iterdir()) == ["tile"]  # no staging folder left beside it


def test_a_link_where_the_incomplete_flag_goes_is_never_followed(tmp_path):
    """The flag marking a move in progress was touched through a link, creating the link's target outside."""
    from scripts.core.errors import InferenceError
    from scripts.workflows.predict.image_outputs import INCOMPLETE_FLAG, ImageOutputs

    out = tmp_path / "out"
    (out / "tile").mkdir(parents=True)
    (out / "tile" / INCOMPLETE_FLAG).symlink_to(tmp_path / "created_outside")
    _, write = one_nucleus_tile()
    with pytest.raises(InferenceError, match=f"{INCOMPLETE_FLAG} is a symbolic link out of --output_dir"):
        write(ImageOutputs(output_dir=str(out), overwrite=True))
    assert not (tmp_path / "created_outside").exists()
