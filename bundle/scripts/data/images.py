"""The one image reader: every H&E image the bundle reads (inference, the converter, slides' regions) comes through
`read_rgb`, and every label image through `read_labels`, so a file means the same thing everywhere.

What `read_rgb` converts and what it refuses, and why:
  RGB, 8-bit                        used as is.
  RGBA                              alpha blended onto white: transparent pixels are empty glass in a slide export.
  palette, CMYK, YCbCr, LAB, HSV    converted to RGB (the colours are all there).
  16-bit RGB (TIFF, PNG, .npy)      scaled to 8 bits over the full 16-bit range (x / 257), as viewers display it.
  float RGB with values 0-255       rounded to 8 bits (PanNuke stores its images so); 0-1 floats, NaN refused.
  grayscale (1 channel, any depth)  refused: the model reads H&E colour, which a gray image no longer has.
  planar (3, H, W) arrays           moved to channels last.
  other dtypes, channel counts,
  multi-plane TIFF stacks           refused, with what was found.
  more than max_pixels pixels       refused before decoding, when a limit is given.
TIFF is read with tifffile (16-bit, BigTIFF, pyramids: level 0), with Pillow as the fallback for compressions
tifffile has no codec for; PNG and JPEG with Pillow; .npy with numpy, never unpickling.  Every refusal is a
`DataError` whose message starts with the file's path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from scripts.core.errors import DataError
from scripts.data.pannuke.files import load_npy

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TIFF_SUFFIXES = (".tif", ".tiff")
WHITE = 255
_GRAY_MODES = ("1", "L", "I", "F", "LA", "La")


def read_rgb(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of one image file, converted as the module docstring says."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return to_rgb8(load_npy(path), path)
    if suffix in TIFF_SUFFIXES:
        return to_rgb8(_read_tiff(path, max_pixels), path)
    return _pillow_rgb(path, max_pixels)


def read_labels(path: str | os.PathLike, what: str = "label image", key: str | None = None) -> np.ndarray | None:
    """(H, W) int64 label map from PNG / TIFF / NPY, or from array `key` of an NPZ (None if that key is absent).

    A palette PNG's indices are its ids.  Colour-coded, fractional or negative labels are refused: ids would be
    guessed otherwise.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                if key not in npz.files:
                    return None
                values = npz[key]
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read {what} ({err})") from err
    elif suffix == ".npy":
        values = load_npy(path)
    elif suffix in TIFF_SUFFIXES:
        values = _read_tiff(path, None)
    else:
        values = _pillow_array(path, None, labels=True)
    return to_label_map(np.asarray(values), path, what)


# ---------------------------------------------------------------- decoding


def _check_size(path: Path, height: int, width: int, max_pixels: int | None) -> None:
    if max_pixels is not None and height * width > max_pixels:
        raise DataError(
            f"{path}: {width} x {height} = {height * width / 1e6:.0f} megapixels is more than max_pixels "
            f"({max_pixels / 1e6:.0f} MP, memory grows with the image): cut it into tiles, or raise --max_pixels "
            "if this machine has the memory (docs/inference.md)"
        )


def _pillow_array(path: Path, max_pixels: int | None, labels: bool = False) -> np.ndarray:
    """Decoded pixels; for images, palette / exotic colour modes as RGB(A); for labels, palette indices as ids."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            _check_size(path, img.height, img.width, max_pixels)
            img.load()  # decode now: a truncated file fails here, not later
            if not labels:
                img = _colour_mode(path, img)
            return np.array(img)  # a writable copy: torch warns about read-only arrays
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: too large to read safely ({err}); crop or tile it first") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"{path}: not a readable image ({err}); is the file complete? re-export or copy it again"
        ) from err


def _colour_mode(path: Path, img):
    mode = img.mode
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode == "PA":
        return img.convert("RGBA")
    if mode in _GRAY_MODES or mode.startswith("I;"):
        raise DataError(
            f"{path}: grayscale image (mode {mode}): the model needs RGB H&E colour, which a gray image does not "
            "have; export the image in colour (or check that a mask did not end up among the images)"
        )
    if mode in ("RGBA", "RGBa"):
        return img.convert("RGBA")
    return img if mode == "RGB" else img.convert("RGB")


def _pillow_rgb(path: Path, max_pixels: int | None) -> np.ndarray:
    return to_rgb8(_pillow_array(path, max_pixels), path)


def _read_tiff(path: Path, max_pixels: int | None) -> np.ndarray:
    """Level 0 of the first series as (H, W[, C]); Pillow when tifffile cannot decode the file."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = dict(zip(series.axes, series.shape, strict=True))
            _check_size(path, shape.get("Y", 0), shape.get("X", 0), max_pixels)
            array, axes = series.asarray(level=0), series.axes
    except DataError:
        raise
    except Exception as tiff_error:  # tifffile raises many types (ValueError, KeyError, codec errors)
        try:
            return _pillow_array(path, max_pixels)
        except DataError as pillow_error:
            pillow_reason = str(pillow_error).removeprefix(f"{path}: ")
            raise DataError(f"{path}: not a readable TIFF (tifffile: {tiff_error}; Pillow: {pillow_reason})") from None
    return _channels_last(array, axes, path)


def _channels_last(array: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """(H, W) or (H, W, C) from tifffile's axes, dropping length-1 axes; a stack of several planes is refused."""
    keep = [i for i, (a, n) in enumerate(zip(axes, array.shape, strict=True)) if n > 1 or a in "YX"]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    channel_axes = [a for a in axes if a not in "YX"]
    if len(channel_axes) > 1 or (channel_axes and channel_axes[0] not in "SC"):
        raise DataError(
            f"{path}: TIFF holds a stack with axes {axes} and shape {array.shape}; save the single RGB image to use"
        )
    if channel_axes:
        array = np.moveaxis(array, axes.index(channel_axes[0]), -1)
    return array


# ---------------------------------------------------------------- conversion rules


def to_rgb8(array: np.ndarray, path: str | os.PathLike = "image") -> np.ndarray:
    """(H, W, 3) uint8 from decoded (H, W[, C]) or planar (C, H, W) pixels, by the rules of the module docstring."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[2] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar TIFF / CHW npy
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 2)):
        raise DataError(
            f"{path}: grayscale image ({array.dtype}, shape {array.shape}): the model needs RGB H&E colour, which "
            "a gray image does not have; export the image in colour (or check that a mask did not end up among "
            "the images)"
        )
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise DataError(f"{path}: expected an (H, W, 3) RGB or (H, W, 4) RGBA image, found shape {array.shape}")
    if array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = _float_to_uint8(array, path)
    elif array.dtype != np.uint8:
        raise DataError(f"{path}: pixel type {array.dtype} is not supported; save the image as 8- or 16-bit RGB")
    return blend_alpha(array) if array.shape[2] == 4 else np.ascontiguousarray(array)


def _float_to_uint8(array: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    if not np.isfinite(array).all():
        raise DataError(f"{path}: float image holds NaN or infinity; save the image as 8-bit RGB")
    low, high = float(array.min(initial=0)), float(array.max(initial=0))
    if low < 0 or high > 255:
        raise DataError(f"{path}: float image with range [{low:g}, {high:g}]; save it with values 0-255 (or as uint8)")
    if 0 < high <= 1:
        raise DataError(f"{path}: float image on a 0-1 scale (max {high:g}); multiply it by 255, or save it as uint8")
    return np.rint(array).astype(np.uint8)


def blend_alpha(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA onto white: a transparent margin becomes the white of empty glass, not black tissue-like ink."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + float(WHITE) * (1.0 - alpha)
    return np.rint(rgb).astype(np.uint8)


def to_label_map(values: np.ndarray, path: str | os.PathLike, what: str) -> np.ndarray:
    """(H, W) int64 label map; colour-coded or fractional masks are refused since ids would be guessed."""
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[..., 0]
    if values.ndim != 2:
        raise DataError(
            f"{path}: {what} must be a single-channel (H, W) label image, got shape {values.shape}"
            " (colour-coded masks are not supported: save one integer id per pixel)"
        )
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            raise DataError(f"{path}: {what} has non-integer values; save integer ids")
    elif not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
        raise DataError(f"{path}: {what} has unsupported dtype {values.dtype}")
    # the range is checked before the cast: a float id of 1e20 would become a negative int64, one of 2**70 any number
    if values.size and values.min() < 0:
        raise DataError(f"{path}: {what} has negative values; ids must be >= 0 (0 = background)")
    if values.size and values.max() >= 2**32:
        raise DataError(f"{path}: {what} has ids >= 2**32; relabel it (e.g. skimage.segmentation.relabel_sequential)")
    return values.astype(np.int64)
