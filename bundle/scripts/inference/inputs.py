"""Find the images a lab wants segmented and read each as (H, W, 3) uint8 RGB, so that one bad file never stops a run.

An input is a folder (its PNG / JPEG / TIFF files, not its subfolders), a single image file, or a PanNuke-format
.npy array of (N, H, W, 3) tiles (e.g. "Fold 3/images/fold3/images.npy"), whose tiles become images
"<stem>_0000", "<stem>_0001", ...

What is converted and what is refused, and why:
  RGB, 8-bit                       used as is.
  RGBA                             alpha blended onto white: transparent pixels are empty glass in a slide export.
  palette, CMYK, YCbCr             converted to RGB (the colours are all there).
  16-bit RGB (TIFF, PNG)           scaled to 8 bits over the full 16-bit range (x / 257), as viewers display it.
  grayscale (1 channel, any depth) refused: the model reads H&E colour, which a gray image no longer has.
  other dtypes, channel counts,
  multi-plane TIFF stacks          refused, with what was found.
  more than max_pixels pixels      refused before decoding: crop or tile the image first (memory grows ~linearly).
A file that fails becomes an error record (name, source, message) instead of an exception; the run reports it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.data import Dataset
from monai.transforms import apply_transform

from scripts.pannuke.cache import check_images
from scripts.pannuke.files import PanNukeFormatError, read_npy_header

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TIFF_SUFFIXES = (".tif", ".tiff")
DEFAULT_MAX_PIXELS = 60_000_000  # about 7700 x 7700; a few GB of memory on the CPU (docs/inference.md)


class InferenceInputError(ValueError):
    """The input as a whole cannot be used (no images, wrong path); the message names the path and the fix."""


class UnreadableImage(ValueError):
    """One image cannot be used; the run reports it and goes on with the others."""


@dataclass(frozen=True)
class InputImage:
    """One image of the run: `name` is unique in the run and names its outputs; `index` is set for .npy tiles."""

    name: str
    path: Path
    index: int | None = None

    @property
    def source(self) -> str:
        return str(self.path) if self.index is None else f"{self.path}[{self.index}]"


# ---------------------------------------------------------------- finding inputs


def find_inputs(input_dir: str | os.PathLike) -> list[InputImage]:
    """Every image the run will process, in a stable (sorted) order, with unique output names."""
    if not str(input_dir):
        raise InferenceInputError(
            "no input given: pass --input_dir with a folder of PNG/JPEG/TIFF images, one image file, "
            "or a PanNuke images.npy"
        )
    path = Path(input_dir)
    if path.is_dir():
        return _folder_images(path)
    if not path.is_file():
        raise InferenceInputError(f"--input_dir {path} does not exist: pass a folder of images, an image or a .npy")
    if path.suffix.lower() == ".npy":
        return _npy_tiles(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [InputImage(path.stem, path)]
    raise InferenceInputError(f"{path} is not an image this bundle reads ({', '.join(IMAGE_SUFFIXES)}) nor a .npy")


def _folder_images(folder: Path) -> list[InputImage]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p.name for p in files if p not in images]
    if not images:
        seen = f"; it holds {len(others)} other files ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})"
        raise InferenceInputError(
            f"no images in {folder}: looked for {', '.join(IMAGE_SUFFIXES)} files (subfolders are not searched)"
            + (seen if others else "")
        )
    if others:
        logger.info(f"ignoring {len(others)} files in {folder} that are not images: {', '.join(others[:10])}")
    return [InputImage(name, p) for name, p in zip(unique_names(images), images, strict=True)]


def unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems, with the extension added where two files share a stem (a.png, a.tif -> a_png, a_tif)."""
    stems = Counter(p.stem for p in paths)
    return [p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p in paths]


def _npy_tiles(path: Path) -> list[InputImage]:
    try:
        header = read_npy_header(path)
    except PanNukeFormatError as e:
        raise InferenceInputError(str(e)) from e
    if len(header.shape) != 4 or header.shape[-1] != 3 or header.dtype.kind not in "fiu":
        raise InferenceInputError(
            f"{path}: expected (N, H, W, 3) RGB tiles with values 0-255 like PanNuke's images.npy, "
            f"found shape {header.shape} dtype {header.dtype}"
        )
    if header.shape[0] == 0:
        raise InferenceInputError(f"{path}: holds no tiles")
    width = max(4, len(str(header.shape[0] - 1)))
    return [InputImage(f"{path.stem}_{i:0{width}d}", path, i) for i in range(header.shape[0])]


# ---------------------------------------------------------------- reading one image


def read_rgb(item: InputImage, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB of one input, converted as the module docstring says; UnreadableImage if it cannot be."""
    if item.index is not None:
        return _npy_tile(item.path, item.index)
    if item.path.suffix.lower() in TIFF_SUFFIXES:
        return _read_tiff(item.path, max_pixels)
    return _read_pillow(item.path, max_pixels)


def _npy_tile(path: Path, index: int) -> np.ndarray:
    """One tile of a PanNuke-style images.npy, checked by the same rule as training's cache (NaN, 0-255, not 0-1)."""
    tiles = np.load(path, mmap_mode="r", allow_pickle=False)
    tile = np.asarray(tiles[index], dtype=np.float64)
    try:
        check_images(tile[None], path, index)
    except PanNukeFormatError as e:
        raise UnreadableImage(str(e)) from e
    return np.rint(tile).astype(np.uint8)


def _read_pillow(path: Path, max_pixels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            _check_size(img.height, img.width, max_pixels)
            img.load()  # decode now: a truncated file fails here, not later
            return _pillow_to_rgb(img)
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"too large to read safely ({e}); crop or tile it first") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UnreadableImage(f"not a readable image ({e}); is the file complete? re-export or copy it again") from e


def _pillow_to_rgb(img) -> np.ndarray:
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("1", "L", "I", "F", "LA", "La") or mode.startswith("I;"):
        raise UnreadableImage(
            f"grayscale image (mode {mode}): the model needs RGB H&E colour, which a gray image does not have; "
            "export the image in colour"
        )
    if mode in ("RGBA", "RGBa"):
        return blend_alpha(np.asarray(img.convert("RGBA")))
    if mode != "RGB":
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV: colour-preserving conversions
    return np.array(img, dtype=np.uint8)  # a writable copy: torch warns about read-only arrays


def _read_tiff(path: Path, max_pixels: int) -> np.ndarray:
    """tifffile first (16-bit, BigTIFF, pyramids: level 0); Pillow for compressions tifffile has no codec for."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = dict(zip(series.axes, series.shape, strict=True))
            _check_size(shape.get("Y", 0), shape.get("X", 0), max_pixels)
            array, axes = series.asarray(level=0), series.axes
    except UnreadableImage:
        raise
    except Exception as tiff_error:  # tifffile raises many types (ValueError, KeyError, codec errors)
        try:
            return _read_pillow(path, max_pixels)
        except UnreadableImage as pillow_error:
            raise UnreadableImage(f"not a readable TIFF (tifffile: {tiff_error}; Pillow: {pillow_error})") from None
    return to_rgb8(_channels_last(array, axes))


def _channels_last(array: np.ndarray, axes: str) -> np.ndarray:
    """(H, W) or (H, W, C) from tifffile's axes, dropping length-1 axes; a stack of several planes is refused."""
    keep = [i for i, (a, n) in enumerate(zip(axes, array.shape, strict=True)) if n > 1 or a in "YX"]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    channel_axes = [a for a in axes if a not in "YX"]
    if len(channel_axes) > 1 or (channel_axes and channel_axes[0] not in "SC"):
        raise UnreadableImage(
            f"TIFF holds a stack with axes {axes} and shape {array.shape}; save the single RGB image to segment"
        )
    if channel_axes:
        array = np.moveaxis(array, axes.index(channel_axes[0]), -1)
    return array


def to_rgb8(array: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from a decoded (H, W[, C]) array: alpha blended, 16-bit scaled, gray and others refused."""
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 2)):
        raise UnreadableImage(
            f"grayscale image ({array.dtype}, shape {array.shape}): the model needs RGB H&E colour, which a gray "
            "image does not have; export the image in colour"
        )
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise UnreadableImage(f"expected an RGB or RGBA image, found shape {array.shape}")
    if array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise UnreadableImage(f"pixel type {array.dtype} is not supported; save the image as 8- or 16-bit RGB")
    return blend_alpha(array) if array.shape[2] == 4 else np.ascontiguousarray(array)


def blend_alpha(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA onto white: a transparent margin becomes the white of empty glass, not black tissue-like ink."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.rint(rgb).astype(np.uint8)


def _check_size(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise UnreadableImage(
            f"{width} x {height} = {height * width / 1e6:.0f} megapixels is more than max_pixels "
            f"({max_pixels / 1e6:.0f} MP, memory grows with the image): cut it into tiles, or raise --max_pixels "
            "if this machine has the memory (docs/inference.md)"
        )


# ---------------------------------------------------------------- dataset


class InferenceImages(Dataset):
    """The run's images as dicts {"image": (H, W, 3) uint8, "name", "source"}, transformed; a file that cannot be
    read gives {"name", "source", "error"} instead of raising, so that the engine can report it and go on."""

    def __init__(
        self, input_dir: str | os.PathLike, transform: Callable | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.max_pixels = int(max_pixels)
        inputs = find_inputs(input_dir)
        logger.info(f"{len(inputs)} images to segment from {input_dir}")
        super().__init__(data=inputs, transform=transform)

    def _transform(self, index: int) -> dict:
        item: InputImage = self.data[index]
        record = {"name": item.name, "source": item.source}
        try:
            image = read_rgb(item, self.max_pixels)
        except UnreadableImage as e:
            return {**record, "error": f"{item.source}: {e}"}
        data = {**record, "image": image}
        return apply_transform(self.transform, data) if self.transform is not None else data
