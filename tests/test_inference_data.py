"""Finding and reading a lab's images: what is converted, what is refused, and that a bad file never raises."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scripts.core.errors import DataError, InferenceError
from scripts.workflows.predict.inputs import InferenceImages, InputImage, find_inputs, read_input, unique_names


def rgb(h: int = 20, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def read(path, **kwargs) -> np.ndarray:
    return read_input(InputImage(path.stem, path), **kwargs)


# ---------------------------------------------------------------- finding


def test_folder_lists_images_sorted_and_ignores_the_rest(tmp_path):
    for name in ("b.png", "a.JPG", "c.tiff", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(b"x")
    found = find_inputs(tmp_path)
    assert [i.path.name for i in found] == ["a.JPG", "b.png", "c.tiff"]
    assert [i.name for i in found] == ["a", "b", "c"]


def test_same_stem_gets_the_extension_in_its_name():
    from pathlib import Path

    assert unique_names([Path("x/a.png"), Path("x/a.tif"), Path("x/b.png")]) == ["a_png", "a_tif", "b"]
    # one folder on a file system that ignores case (macOS, Windows): they get their extensions too
    assert unique_names([Path("x/A.png"), Path("x/a.tif")]) == ["A_png", "a_tif"]


@pytest.mark.parametrize("pair", [("a\\b.png", "a_b.png"), ("a.png", "a.PNG")])
def test_two_images_that_would_write_the_same_outputs_are_refused_naming_both(tmp_path, pair):
    """Names were made safe after they were made unique, so two images could share one output folder."""
    for name in pair:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name, format="PNG")
    with pytest.raises(InferenceError, match=f"{tmp_path}/.* and {tmp_path}/.* would both write their outputs as"):
        find_inputs(tmp_path)


def test_empty_folder_says_what_was_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InferenceError, match=r"no images in .*\.png.*readme\.txt"):
        find_inputs(tmp_path)


@pytest.mark.parametrize("given, message", [("", "no input given"), ("/no/such/dir", "does not exist")])
def test_missing_input_is_explained(given, message):
    with pytest.raises(InferenceError, match=message):
        find_inputs(given)


def test_single_file_and_unknown_suffix(tmp_path):
    Image.fromarray(rgb()).save(tmp_path / "one.png")
    (tmp_path / "slide.svs").write_bytes(b"x")
    assert [i.name for i in find_inputs(tmp_path / "one.png")] == ["one"]
    with pytest.raises(InferenceError, match="not an image this bundle reads"):
        find_inputs(tmp_path / "slide.svs")


def test_pannuke_npy_tiles_become_images(tmp_path):
    tiles = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3))  # PanNuke ships float64 0-255
    np.save(tmp_path / "images.npy", tiles)
    found = find_inputs(tmp_path / "images.npy")
    assert [i.name for i in found] == ["images_0000", "images_0001", "images_0002"]
    assert found[2].source.endswith("images.npy[2]")
    np.testing.assert_array_equal(read_input(found[1]), np.rint(tiles[1]).astype(np.uint8))


@pytest.mark.parametrize("scale,match", [(1.0 / 255.0, "a 0-1 scale"), (2.0, "must lie in 0-255")])
def test_npy_tiles_get_the_value_check_training_uses(tmp_path, scale, match):
    """Issue 10, defect 3: a 0-1 scaled images.npy used to be segmented as black tiles."""
    tiles = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)) * scale
    np.save(tmp_path / "images.npy", tiles)
    with pytest.raises(DataError, match=match):
        read_input(find_inputs(tmp_path / "images.npy")[0])


def test_npy_that_is_not_rgb_tiles_is_refused(tmp_path):
    np.save(tmp_path / "masks.npy", np.zeros((2, 16, 16, 6)))
    with pytest.raises(InferenceError, match=r"\(N, H, W, 3\)"):
        find_inputs(tmp_path / "masks.npy")


# ---------------------------------------------------------------- dataset


def test_dataset_turns_a_bad_file_into_an_error_record(tmp_path):
    Image.fromarray(rgb()).save(tmp_path / "a.png")
    Image.fromarray(rgb()[..., 0]).save(tmp_path / "b.png")
    dataset = InferenceImages(tmp_path, transform=lambda d: {**d, "seen": True})
    good, bad = dataset[0], dataset[1]
    assert good["name"] == "a" and good["seen"] and good["image"].shape == (20, 30, 3)
    assert good["error"] == "" and bad["seen"]  # a white stand-in goes through the chain, its message with it
    assert bad["image"].shape == (16, 16, 3) and (bad["image"] == 255).all()
    assert "b.png" in bad["error"] and "grayscale" in bad["error"]


def test_a_black_padding_tile_is_not_taken_for_a_0_1_scale(tmp_path):
    tiles = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3))
    tiles[1] = 0.0  # a zero-padded edge tile, as slide tilers write them
    np.save(tmp_path / "images.npy", tiles)
    assert not read_input(find_inputs(tmp_path / "images.npy")[1]).any()


def test_an_input_named_with_dots_writes_inside_the_output_folder(tmp_path):
    """`...png` has the stem `..`: as an output name it would write into the parent of --output_dir."""
    from pathlib import Path

    from scripts.workflows.slides.reader import slide_name

    image = tmp_path / "...png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image, format="PNG")
    (name,) = [item.name for item in find_inputs(image)]
    out = tmp_path / "out"
    assert (out / name).resolve().parent == out.resolve() and name == "_.."
    assert slide_name(Path("slides/...tif")) == "_.." and slide_name(Path("slides/case.ome.tif")) == "case"
