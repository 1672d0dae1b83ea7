"""The one image reader: what it converts, what it refuses with the file's name, for every caller alike."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from scripts.core.errors import DataError
from scripts.data.images import blend_alpha, read_labels, read_rgb


def rgb(h: int = 20, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


read = read_rgb


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
    with pytest.raises(DataError, match="grayscale.*needs RGB H&E colour"):
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


def test_tiff_stack_and_unusable_floats_are_refused(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([rgb(), rgb(seed=1)]), photometric="rgb")
    tifffile.imwrite(tmp_path / "unit.tif", rgb().astype(np.float32) / 255, photometric="rgb")
    nan = rgb().astype(np.float32)
    nan[0, 0, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan, photometric="rgb")
    with pytest.raises(DataError, match="stack"):
        read(tmp_path / "stack.tif")
    with pytest.raises(DataError, match="unit.tif: float image on a 0-1 scale.*multiply it by 255"):
        read(tmp_path / "unit.tif")
    with pytest.raises(DataError, match="nan.tif: float image holds NaN"):
        read(tmp_path / "nan.tif")


def test_float_rgb_with_0_255_values_reads_as_pannuke_stores_images(tmp_path):
    tifffile.imwrite(tmp_path / "float.tif", rgb().astype(np.float32), photometric="rgb")
    np.testing.assert_array_equal(read(tmp_path / "float.tif"), rgb())


@pytest.mark.parametrize("name", ["x.png", "x.jpg", "x.tif"])
def test_truncated_or_fake_files_are_unreadable(tmp_path, name):
    good = tmp_path / f"good{name[1:]}"
    Image.fromarray(rgb(200, 200)).save(good)
    (tmp_path / name).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / f"fake{name[1:]}").write_text("not an image")
    for bad in (tmp_path / name, tmp_path / f"fake{name[1:]}"):
        with pytest.raises(DataError, match="not a readable"):
            read(bad)


def test_too_many_pixels_is_refused_before_decoding(tmp_path):
    Image.fromarray(rgb(100, 100)).save(tmp_path / "x.png")
    with pytest.raises(DataError, match="more than max_pixels.*cut it into tiles"):
        read(tmp_path / "x.png", max_pixels=9_999)
    assert read(tmp_path / "x.png", max_pixels=10_000).shape == (100, 100, 3)


def test_every_refusal_names_the_file(tmp_path):
    Image.fromarray(rgb()[..., 0]).save(tmp_path / "gray.png")
    with pytest.raises(DataError, match=r"^.*gray\.png: grayscale"):
        read(tmp_path / "gray.png")


def test_npy_images_are_never_unpickled(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy: not a readable numeric .npy"):
        read(tmp_path / "obj.npy")


def test_an_npy_whose_header_does_not_describe_its_data_is_refused(tmp_path):
    """float64 pixels under a float32 header: numpy reads the first half of the bytes as other numbers, silently."""
    good = tmp_path / "good.npy"
    np.save(good, rgb().astype(np.float64))
    data = good.read_bytes()
    (tmp_path / "relabelled.npy").write_bytes(data.replace(b"'descr': '<f8'", b"'descr': '<f4'"))
    for reader in (read, read_labels):
        with pytest.raises(DataError, match="relabelled.npy: the header promises .* does not describe its data"):
            reader(tmp_path / "relabelled.npy")


@pytest.mark.parametrize("huge", [1e20, 2.0**70, np.iinfo(np.uint64).max])
def test_label_ids_beyond_what_a_label_map_holds_are_refused_not_wrapped(tmp_path, huge):
    """A float id of 1e20 used to become a negative int64 and be blamed as a negative value."""
    labels = np.zeros((8, 8), np.float64 if isinstance(huge, float) else np.uint64)
    labels[2:4, 2:4] = huge
    np.save(tmp_path / "ids.npy", labels)
    with pytest.raises(DataError, match=r"ids.npy: label image has ids >= 2\*\*32"):
        read_labels(tmp_path / "ids.npy")


def test_planar_npy_and_0_255_float_npy_read_like_files(tmp_path):
    np.save(tmp_path / "chw.npy", np.moveaxis(rgb(), -1, 0).astype(np.float64))
    np.testing.assert_array_equal(read(tmp_path / "chw.npy"), rgb())


def test_labels_keep_palette_indices_and_refuse_colour(tmp_path):
    ids = np.zeros((8, 8), np.uint8)
    ids[2:4, 2:4] = 7
    palette = Image.fromarray(ids, mode="P")
    palette.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    palette.save(tmp_path / "ids.png")
    np.testing.assert_array_equal(read_labels(tmp_path / "ids.png"), ids)
    Image.fromarray(rgb(8, 8)).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="colour.png: label image must be a single-channel"):
        read_labels(tmp_path / "colour.png")
    np.savez(tmp_path / "m.npz", inst_map=ids)
    assert read_labels(tmp_path / "m.npz", key="type_map") is None
