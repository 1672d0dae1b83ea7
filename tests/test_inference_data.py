"""Finding and reading a lab's images: what is converted, what is refused, and that a bad file never raises."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from scripts.inference.inputs import (
    InferenceImages,
    InferenceInputError,
    InputImage,
    UnreadableImage,
    blend_alpha,
    find_inputs,
    read_rgb,
    unique_names,
)


def rgb(h: int = 20, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def read(path, **kwargs) -> np.ndarray:
    return read_rgb(InputImage(path.stem, path), **kwargs)


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


def test_empty_folder_says_what_was_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InferenceInputError, match=r"no images in .*\.png.*readme\.txt"):
        find_inputs(tmp_path)


@pytest.mark.parametrize("given, message", [("", "no input given"), ("/no/such/dir", "does not exist")])
def test_missing_input_is_explained(given, message):
    with pytest.raises(InferenceInputError, match=message):
        find_inputs(given)


def test_single_file_and_unknown_suffix(tmp_path):
    Image.fromarray(rgb()).save(tmp_path / "one.png")
    (tmp_path / "slide.svs").write_bytes(b"x")
    assert [i.name for i in find_inputs(tmp_path / "one.png")] == ["one"]
    with pytest.raises(InferenceInputError, match="not an image this bundle reads"):
        find_inputs(tmp_path / "slide.svs")


def test_pannuke_npy_tiles_become_images(tmp_path):
    tiles = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3))  # PanNuke ships float64 0-255
    np.save(tmp_path / "images.npy", tiles)
    found = find_inputs(tmp_path / "images.npy")
    assert [i.name for i in found] == ["images_0000", "images_0001", "images_0002"]
    assert found[2].source.endswith("images.npy[2]")
    np.testing.assert_array_equal(read_rgb(found[1]), np.rint(tiles[1]).astype(np.uint8))


@pytest.mark.parametrize("scale,match", [(1.0 / 255.0, "a 0-1 scale"), (2.0, "must lie in 0-255")])
def test_npy_tiles_get_the_value_check_training_uses(tmp_path, scale, match):
    """Issue 10, defect 3: a 0-1 scaled images.npy used to be segmented as black tiles."""
    tiles = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)) * scale
    np.save(tmp_path / "images.npy", tiles)
    with pytest.raises(UnreadableImage, match=match):
        read_rgb(find_inputs(tmp_path / "images.npy")[0])


def test_npy_that_is_not_rgb_tiles_is_refused(tmp_path):
    np.save(tmp_path / "masks.npy", np.zeros((2, 16, 16, 6)))
    with pytest.raises(InferenceInputError, match=r"\(N, H, W, 3\)"):
        find_inputs(tmp_path / "masks.npy")


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
def test_lossless_rgb_reads_back_exactly(tmp_path, suffix):
    image = rgb()
    path = tmp_path / f"x{suffix}"
    Image.fromarray(image).save(path)
    out = read(path)
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, image)


def test_jpeg_reads_as_rgb(tmp_path):
    Image.fromarray(rgb(64, 48)).save(tmp_path / "x.jpg", quality=95)
    assert read(tmp_path / "x.jpg").shape == (64, 48, 3)


def test_rgba_is_blended_onto_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = 100
    rgba[0, :, 3] = 255  # opaque row
    rgba[1, 0, 3] = 0  # transparent
    rgba[1, 1, 3] = 128  # half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    out = read(tmp_path / "x.png")
    assert out.shape == (2, 3, 3)
    assert (out[0] == 100).all() and (out[1, 0] == 255).all()
    assert (out[1, 1] == round(100 * 128 / 255 + 255 * 127 / 255)).all()
    np.testing.assert_array_equal(blend_alpha(rgba), out)


def test_palette_image_is_converted(tmp_path):
    Image.fromarray(rgb()).convert("P").save(tmp_path / "x.png")
    assert read(tmp_path / "x.png").shape == (20, 30, 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: Image.fromarray(rgb()[..., 0]).save(p / "x.png"),
        lambda p: Image.fromarray(rgb()[..., 0].astype(np.uint16) * 257).save(p / "x.png"),
        lambda p: tifffile.imwrite(p / "x.tif", rgb()[..., 0].astype(np.uint16) * 257),
    ],
    ids=["gray8_png", "gray16_png", "gray16_tiff"],
)
def test_grayscale_is_refused_with_the_reason(tmp_path, make):
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(UnreadableImage, match="grayscale.*needs RGB H&E colour"):
        read(path)


def test_16bit_rgb_tiff_is_scaled_over_the_full_range(tmp_path):
    image = rgb()
    tifffile.imwrite(tmp_path / "x.tif", image.astype(np.uint16) * 257)
    np.testing.assert_array_equal(read(tmp_path / "x.tif"), image)


def test_16bit_rgb_png_is_scaled_too(tmp_path):
    """Pillow cannot write 48-bit PNGs, so this one is assembled by hand (IHDR bit depth 16, colour type 2)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    image = rgb(5, 7)
    rows = b"".join(b"\x00" + (row.astype(np.uint16) * 257).astype(">u2").tobytes() for row in image)
    header = struct.pack(">IIBBBBB", 7, 5, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    (tmp_path / "x.png").write_bytes(png)
    np.testing.assert_array_equal(read(tmp_path / "x.png"), image)


def test_planar_tiff_is_moved_to_channels_last(tmp_path):
    image = rgb()
    tifffile.imwrite(tmp_path / "x.tif", np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read(tmp_path / "x.tif"), image)


def test_tiff_stack_and_float_are_refused(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([rgb(), rgb(seed=1)]), photometric="rgb")
    tifffile.imwrite(tmp_path / "float.tif", rgb().astype(np.float32), photometric="rgb")
    with pytest.raises(UnreadableImage, match="stack"):
        read(tmp_path / "stack.tif")
    with pytest.raises(UnreadableImage, match="float32 is not supported"):
        read(tmp_path / "float.tif")


@pytest.mark.parametrize("name", ["x.png", "x.jpg", "x.tif"])
def test_truncated_or_fake_files_are_unreadable(tmp_path, name):
    good = tmp_path / f"good{name[1:]}"
    Image.fromarray(rgb(200, 200)).save(good)
    (tmp_path / name).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / f"fake{name[1:]}").write_text("not an image")
    for bad in (tmp_path / name, tmp_path / f"fake{name[1:]}"):
        with pytest.raises(UnreadableImage, match="not a readable"):
            read(bad)


def test_too_many_pixels_is_refused_before_decoding(tmp_path):
    Image.fromarray(rgb(100, 100)).save(tmp_path / "x.png")
    with pytest.raises(UnreadableImage, match="more than max_pixels.*cut it into tiles"):
        read(tmp_path / "x.png", max_pixels=9_999)
    assert read(tmp_path / "x.png", max_pixels=10_000).shape == (100, 100, 3)


# ---------------------------------------------------------------- dataset


def test_dataset_turns_a_bad_file_into_an_error_record(tmp_path):
    Image.fromarray(rgb()).save(tmp_path / "a.png")
    Image.fromarray(rgb()[..., 0]).save(tmp_path / "b.png")
    dataset = InferenceImages(tmp_path, transform=lambda d: {**d, "seen": True})
    good, bad = dataset[0], dataset[1]
    assert good["name"] == "a" and good["seen"] and good["image"].shape == (20, 30, 3)
    assert set(bad) == {"name", "source", "error"}
    assert "b.png" in bad["error"] and "grayscale" in bad["error"]


def test_a_black_padding_tile_is_not_taken_for_a_0_1_scale(tmp_path):
    tiles = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3))
    tiles[1] = 0.0  # a zero-padded edge tile, as slide tilers write them
    np.save(tmp_path / "images.npy", tiles)
    assert not read_rgb(find_inputs(tmp_path / "images.npy")[1]).any()
