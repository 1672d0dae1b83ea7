"""Open a whole slide and read regions of it at the model's scale.

OpenSlide (the pip-installable `openslide-bin` + `openslide-python`) reads SVS, NDPI, MRXS, SCN, Philips TIFF and
generic tiled TIFF, and DICOM (a folder of one file per level); `tiffslide` (tifffile + zarr, no system library)
reads pyramidal TIFF and OME-TIFF, whose sub-resolutions OpenSlide does not see, and every TIFF where OpenSlide is not
installed; `wsidicom` reads DICOM where OpenSlide is not installed.  When two open a slide the one that sees more
pyramid levels is used.  All three answer the same few calls (wsidicom through `dicom.DicomHandle`), so the rest of
the bundle does not care which one opened a slide.  The model works at about 0.25 µm/px (40x): `Slide.read` takes a
region in model pixels, reads it from the pyramid level nearest to that scale (never a coarser one when a finer
exists) and resamples it, so a 20x slide is upsampled rather than fed at the wrong scale.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.core.errors import DataError
from scripts.core.atomic import safe_name
from scripts.data.images import WHITE, blend_alpha
from scripts.workflows.slides.dicom import DicomHandle, is_dicom_file, slide_files, wsi_series

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
MPP_RANGE = (0.05, 5.0)  # µm/px of any brightfield scan, 200x to 2x
THUMB_CHUNK = 4096  # pixels of a pyramid level read at once for the thumbnail
RESAMPLE = Image.Resampling.BILINEAR  # onto the model's grid: PIL widens its support when it shrinks
MPP_KEYS = ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP", "wsidicom.mpp-x")


def _readers(path: Path):
    """(name, opener) for each reader that may read `path`: OpenSlide, then the pure-Python reader of its format."""
    dicom = slide_files(path, SLIDE_SUFFIXES) if path.is_dir() else []
    try:
        import openslide

        yield "openslide", lambda: openslide.OpenSlide(str(dicom[0] if dicom else path))  # DICOM: any one file
    except ImportError:  # openslide-bin not installed: the pure-Python readers alone
        pass
    if path.is_dir():
        yield "wsidicom", lambda: DicomHandle(dicom)
    else:
        import tiffslide

        yield "tiffslide", lambda: tiffslide.TiffSlide(str(path))


MULTI_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.btf")


def slide_name(path: Path) -> str:
    """What a slide's outputs are named after: the file's stem (without `.ome` of an OME-TIFF), or a DICOM
    slide's folder name."""
    if path.is_dir():
        return safe_name(path.name)
    lower = path.name.lower()
    suffix = next((s for s in MULTI_SUFFIXES if lower.endswith(s)), path.suffix)
    return safe_name(path.name[: len(path.name) - len(suffix)] if suffix else path.name)


@dataclass
class Slide:
    """An open slide, its µm/px, and how the model's pixels map onto its pyramid.

    Args:
        path: the slide file, or a DICOM slide's folder.
        mpp: µm per pixel of level 0, from the metadata or `--mpp`.
        target_mpp: the model's scale (0.25 µm/px).
    """

    path: Path
    _handle: object | None
    backend: str
    mpp: float
    target_mpp: float = 0.25

    @property
    def handle(self) -> object:
        """The open slide; reopened with the same reader after `close` (a run over many slides keeps few open)."""
        if self._handle is None:
            self._handle = dict(_readers(self.path))[self.backend]()
        return self._handle

    @property
    def scale(self) -> float:
        """Level-0 pixels per model pixel (1 at 40x, 0.5 at 20x)."""
        return self.target_mpp / self.mpp

    @property
    def model_size(self) -> tuple[int, int]:
        """(width, height) of the whole slide in model pixels."""
        w, h = self.handle.level_dimensions[0]
        return int(math.floor(w / self.scale)), int(math.floor(h / self.scale))

    def level_for_model(self) -> int:
        """The pyramid level read for the model: the coarsest one still at least as fine as the model's scale."""
        downsamples = list(self.handle.level_downsamples)
        fine_enough = [i for i, d in enumerate(downsamples) if d <= self.scale * 1.01]
        return max(fine_enough, key=lambda i: downsamples[i]) if fine_enough else 0

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 RGB of the model-pixel region at (x, y); outside the slide is white."""
        level = self.level_for_model()
        down = float(self.handle.level_downsamples[level])
        step = self.scale / down  # level pixels per model pixel
        if abs(step - 1) < 1e-6:  # the level is at the model's scale: read the pixels as they are
            return self._read_level(level, x, y, width, height)
        # the exact box in level pixels, read with a border for the filter, then resampled onto the model's grid:
        # every tile samples the slide at the same points as one read of the whole slide would
        fx0, fy0, fx1, fy1 = x * step, y * step, (x + width) * step, (y + height) * step
        pad = int(math.ceil(step)) + 1
        ix0, iy0 = int(math.floor(fx0)) - pad, int(math.floor(fy0)) - pad
        lw, lh = int(math.ceil(fx1)) + pad - ix0, int(math.ceil(fy1)) + pad - iy0
        box = (fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0)
        region = Image.fromarray(self._read_level(level, ix0, iy0, lw, lh))
        return np.ascontiguousarray(np.asarray(region.resize((width, height), RESAMPLE, box=box)))

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 RGB of a region in `level`'s pixels, white where it leaves the slide (readers
        disagree there: OpenSlide gives transparent pixels, tiffslide black ones)."""
        lw, lh = self.handle.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, lw), min(y + height, lh)
        rgb = np.full((height, width, 3), WHITE, np.uint8)
        if x1 > x0 and y1 > y0:
            down = float(self.handle.level_downsamples[level])
            # the readers take level-0 coordinates and truncate them back to the level's: round up, or a level whose
            # downsample is a shade over an integer (50,001 px halved to 25,000) would start a pixel early
            location = (int(math.ceil(x0 * down)), int(math.ceil(y0 * down)))
            region = np.asarray(self.handle.read_region(location, level, (x1 - x0, y1 - y0)))
            rgb[y0 - y : y1 - y, x0 - x : x1 - x] = blend_alpha(region) if region.shape[-1] == 4 else region[..., :3]
        return rgb

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """A low-resolution RGB view from the coarsest level, and its model pixels per thumbnail pixel."""
        mw, mh = self.model_size
        factor = max(mw, mh) / max_side if max(mw, mh) > max_side else 1.0
        level = self.handle.get_best_level_for_downsample(factor * self.scale)
        lw, lh = self.handle.level_dimensions[level]
        tw, th = max(1, int(round(mw / factor))), max(1, int(round(mh / factor)))
        thumb = Image.new("RGB", (tw, th), (255, 255, 255))
        sx, sy = tw / lw, th / lh  # thumbnail pixels per pixel of the level read
        for y in range(0, lh, THUMB_CHUNK):  # chunk by chunk: a slide with a shallow pyramid never sits in memory
            for x in range(0, lw, THUMB_CHUNK):
                w, h = min(THUMB_CHUNK, lw - x), min(THUMB_CHUNK, lh - y)
                rgb = self._read_level(level, x, y, w, h)
                box = (int(round(x * sx)), int(round(y * sy)), int(round((x + w) * sx)), int(round((y + h) * sy)))
                size = (max(1, box[2] - box[0]), max(1, box[3] - box[1]))
                thumb.paste(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR), box[:2])
        return np.asarray(thumb), mw / tw

    def describe(self) -> str:
        """One line for the log: size, scale, reader and the level read."""
        w, h = self.handle.level_dimensions[0]
        return (
            f"{self.path.name}: {w} x {h} px at {self.mpp:.4f} µm/px ({self.backend}); reading level "
            f"{self.level_for_model()} for the model's {self.target_mpp} µm/px"
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def slide_mpp(handle: object) -> float | None:
    for key in MPP_KEYS:
        value = handle.properties.get(key)
        try:
            mpp = float(value)
        except (TypeError, ValueError):
            continue
        if mpp > 0 and math.isfinite(mpp):
            return mpp
    return None


def open_slide(
    path: str | os.PathLike, mpp: float | None = None, target_mpp: float = 0.25, backend: str | None = None
) -> Slide:
    """Open `path` with the readers that read it (the one seeing more levels wins); a DataError naming the slide
    and the fix otherwise.

    Args:
        path: the slide, or a DICOM slide's folder.
        mpp: µm/px of level 0 for a slide without that metadata (`--mpp`); it also overrides wrong metadata.
        target_mpp: the model's scale.
        backend: only this reader (a slide reopened in a worker with the reader that planned it).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such slide")
    errors, opened = [], []
    for name, opener in _readers(path):
        if backend is not None and name != backend:
            continue
        try:
            handle = opener()
            _ = handle.level_dimensions[0], list(handle.level_downsamples)  # a file with no image fails here
            opened.append((name, handle))
        except Exception as err:  # noqa: BLE001 - each backend raises its own types for files it cannot read
            errors.append(f"{name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    if not opened:
        raise DataError(f"{path}: not a slide this bundle can read ({'; '.join(errors)}); is the file complete?")
    # the reader that sees the whole pyramid wins (OpenSlide reads an OME-TIFF's level 0 only), OpenSlide on a tie
    name, handle = max(opened, key=lambda item: (len(item[1].level_downsamples), item[0] == "openslide"))
    for other, unused in opened:
        if other != name:
            unused.close()
    found = slide_mpp(handle)
    if found is not None and not MPP_RANGE[0] <= found <= MPP_RANGE[1]:
        logger.warning(f"{path}: its metadata says {found:g} µm/px, which no microscope slide has; ignoring it")
        found = None
    if mpp is not None and not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        handle.close()
        raise DataError(f"{path}: --mpp {mpp:g} is not a microscope scale; pass µm per pixel, e.g. 0.25 for 40x")
    if mpp is None and found is None:
        handle.close()
        raise DataError(f"{path}: the slide does not say its µm per pixel; pass --mpp (0.25 for 40x, 0.5 for 20x)")
    if mpp is not None and found is not None and abs(found - mpp) / found > 0.05:
        logger.warning(f"{path}: --mpp {mpp} overrides the slide's own {found:.4f} µm/px")
    return Slide(path, handle, name, float(mpp if mpp is not None else found), float(target_mpp))


def find_slides(input_dir: str | os.PathLike) -> list[Path]:
    """One slide, or the slides of a folder.  A DICOM slide is a folder of whole-slide DICOM files: `input_dir`
    itself (beside any slide files in it), the folder of a DICOM file given as `input_dir`, or a subfolder."""
    path = Path(input_dir) if str(input_dir) else None
    if path is None or not path.exists():
        raise DataError(f"--input_dir {input_dir!r} does not exist: pass a slide file or a folder of slides")
    path = path.resolve()  # a slide's name is never empty ("." or a DICOM file in the current folder)
    if path.is_file():
        return [path.parent if path.suffix.lower() not in SLIDE_SUFFIXES and is_dicom_file(path) else path]
    entries = sorted(path.iterdir())
    slides = [path] if wsi_series(path, SLIDE_SUFFIXES) else []
    slides += [p for p in entries if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES]
    slides += [p for p in entries if p.is_dir() and wsi_series(p, SLIDE_SUFFIXES)]
    if not slides:
        raise DataError(f"no slides in {path}: looked for {', '.join(SLIDE_SUFFIXES)} files and folders of DICOM files")
    return sorted(slides)
