"""Find the images a lab wants segmented and read each as (H, W, 3) uint8 RGB, so that one bad file never stops a run.

An input is a folder (its PNG / JPEG / TIFF files, not its subfolders), a single image file, or a PanNuke-format
.npy array of (N, H, W, 3) tiles (e.g. "Fold 3/images/fold3/images.npy"), whose tiles become images
"<stem>_0000", "<stem>_0001", ...

Each file is read by the bundle's one image reader, `scripts.data.images.read_rgb`, whose docstring lists what is
converted (RGBA, palette, 16-bit, planar) and what is refused (grayscale, stacks, other dtypes); images of more than
`max_pixels` pixels are refused before decoding.  Tiles of a .npy are checked by training's rule (NaN, 0-255 scale).
A file that fails becomes an error record (name, source, message, a white stand-in) instead of an exception; the
run reports it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.data import Dataset
from monai.transforms import apply_transform

from scripts.core.errors import DataError, InferenceError
from scripts.core.atomic import safe_name
from scripts.data.images import IMAGE_SUFFIXES, WHITE, read_rgb
from scripts.data.pannuke.cache import check_images
from scripts.data.pannuke.files import read_npy_header

logger = logging.getLogger(__name__)

STAND_IN = 16  # pixels a side of the white image an unreadable file's record carries through the network
DEFAULT_MAX_PIXELS = 60_000_000  # about 7700 x 7700; a few GB of memory on the CPU (docs/inference.md)


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
        raise InferenceError(
            "no input given: pass --input_dir with a folder of PNG/JPEG/TIFF images, one image file, "
            "or a PanNuke images.npy"
        )
    path = Path(input_dir)
    if path.is_dir():
        return _folder_images(path)
    if not path.is_file():
        raise InferenceError(f"--input_dir {path} does not exist: pass a folder of images, an image or a .npy")
    if path.suffix.lower() == ".npy":
        return _npy_tiles(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [InputImage(safe_name(path.stem), path)]
    raise InferenceError(f"{path} is not an image this bundle reads ({', '.join(IMAGE_SUFFIXES)}) nor a .npy")


def _folder_images(folder: Path) -> list[InputImage]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p.name for p in files if p not in images]
    if not images:
        seen = f"; it holds {len(others)} other files ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})"
        raise InferenceError(
            f"no images in {folder}: looked for {', '.join(IMAGE_SUFFIXES)} files (subfolders are not searched)"
            + (seen if others else "")
        )
    if others:
        logger.info(f"ignoring {len(others)} files in {folder} that are not images: {', '.join(others[:10])}")
    return [InputImage(name, p) for name, p in zip(unique_names(images), images, strict=True)]


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Safe file stems (`safe_name`), with the extension added where two files share one (a.png, a.tif -> a_png,
    a_tif); an InferenceError naming both files where two would still write the same outputs (a\\b.png and
    a_b.png, a.png and a.PNG).  Names are compared regardless of case, as macOS and Windows file systems do."""
    stems = [safe_name(p.stem) for p in paths]
    shared = Counter(s.casefold() for s in stems)
    names = [
        s if shared[s.casefold()] == 1 else f"{s}_{p.suffix.lstrip('.').lower()}"
        for s, p in zip(stems, paths, strict=True)
    ]
    first: dict[str, Path] = {}
    for name, path in zip(names, paths, strict=True):
        if name.casefold() in first:
            raise InferenceError(
                f"{path} and {first[name.casefold()]} would both write their outputs as {name}: rename one, or "
                "move it to another folder"
            )
        first[name.casefold()] = path
    return names


def _npy_tiles(path: Path) -> list[InputImage]:
    try:
        header = read_npy_header(path)
    except DataError as e:
        raise InferenceError(str(e)) from e
    if len(header.shape) != 4 or header.shape[-1] != 3 or header.dtype.kind not in "fiu":
        raise InferenceError(
            f"{path}: expected (N, H, W, 3) RGB tiles with values 0-255 like PanNuke's images.npy, "
            f"found shape {header.shape} dtype {header.dtype}"
        )
    if header.shape[0] == 0:
        raise InferenceError(f"{path}: holds no tiles")
    width = max(4, len(str(header.shape[0] - 1)))
    return [InputImage(safe_name(f"{path.stem}_{i:0{width}d}"), path, i) for i in range(header.shape[0])]


# ---------------------------------------------------------------- reading one image


def read_input(item: InputImage, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB of one input; a DataError naming the file if it cannot be used."""
    if item.index is not None:
        return _npy_tile(item.path, item.index)
    return read_rgb(item.path, max_pixels)


def _npy_tile(path: Path, index: int) -> np.ndarray:
    """One tile of a PanNuke-style images.npy, checked by the same rule as training's cache (NaN, 0-255, not 0-1)."""
    tiles = np.load(path, mmap_mode="r", allow_pickle=False)
    tile = np.asarray(tiles[index], dtype=np.float64)
    check_images(tile[None], path, index)
    return np.rint(tile).astype(np.uint8)


# ---------------------------------------------------------------- dataset


class InferenceImages(Dataset):
    """The run's images as dicts {"image": (H, W, 3) uint8, "name", "source", "error", "read_at"}, transformed.

    A file that cannot be read gives a white stand-in image and its message in "error" instead of raising, so the
    run goes on and the outputs report it (as a slide's unreadable tile is); "read_at" (time.monotonic(), one clock
    for the loader's processes) starts the image's time.  With `plan`, the images it says are done already are
    left out before anything is read.

    Args:
        input_dir: a folder of images, one image, or a PanNuke images.npy (`@input_dir`).
        transform: the preprocessing (`@preprocessing`).
        max_pixels: larger images are refused before decoding (`@max_pixels`).
        plan: the images of the run -> those to do (`$@outputs.plan`: skips those with complete outputs).
    """

    def __init__(
        self,
        input_dir: str | os.PathLike,
        transform: Callable | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        plan: Callable[[list[InputImage]], list[InputImage]] | None = None,
    ) -> None:
        self.max_pixels = int(max_pixels)
        inputs = find_inputs(input_dir)
        logger.info(f"{len(inputs)} images to segment from {input_dir}")
        super().__init__(data=plan(inputs) if plan is not None else inputs, transform=transform)

    def _transform(self, index: int) -> dict:
        item: InputImage = self.data[index]
        record = {"name": item.name, "source": item.source, "error": "", "read_at": time.monotonic()}
        try:
            image = read_input(item, self.max_pixels)
        except DataError as e:  # its message starts with the file's path
            image, record["error"] = np.full((STAND_IN, STAND_IN, 3), WHITE, np.uint8), str(e)
        data = {**record, "image": image}
        return apply_transform(self.transform, data) if self.transform is not None else data
