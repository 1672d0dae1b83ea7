"""DICOM whole-slide images: a folder of VL Whole Slide Microscopy files, one per pyramid level.

OpenSlide 4 reads them, given any one file of the slide.  `wsidicom` (pure Python, on pydicom) reads them too, for
installs where OpenSlide's library is missing; `DicomHandle` puts it behind the few OpenSlide calls the bundle makes,
so `reader.Slide` does not care which one opened a slide.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from scripts.core.errors import DataError

DICM_OFFSET = 128  # a DICOM file's 128-byte preamble, then b"DICM"
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def is_dicom_file(path: Path) -> bool:
    """A DICOM part-10 file, whatever its name (PACS exports often have no extension)."""
    try:
        with open(path, "rb") as f:
            f.seek(DICM_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def wsi_series(folder: str | os.PathLike, skip_suffixes: tuple[str, ...] = ()) -> dict[str, list[Path]]:
    """The whole-slide DICOM files directly in `folder` by series, {SeriesInstanceUID: sorted files}.  Other DICOM
    files (a DICOMDIR, other modalities) are left out, and so are files with a suffix in `skip_suffixes` (a
    DICOM-TIFF .svs is read as a TIFF)."""
    import pydicom

    series: dict[str, list[Path]] = {}
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() not in skip_suffixes):
        if not is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesInstanceUID"])
            if str(ds.get("SOPClassUID", "")) == WSI_SOP_CLASS:
                series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
        except Exception:  # noqa: BLE001 - a damaged header: not counted here; the readers report the slide
            continue
    return series


def slide_files(folder: Path, skip_suffixes: tuple[str, ...] = ()) -> list[Path]:
    """The files of the one DICOM whole-slide image in `folder`; a DataError naming the folder when it holds none or
    several (each slide needs a folder of its own)."""
    series = wsi_series(folder, skip_suffixes)
    if not series:
        raise DataError(f"{folder}: a folder with no DICOM whole-slide image; pass a slide file or a slide's folder")
    if len(series) > 1:
        raise DataError(
            f"{folder}: holds {len(series)} DICOM slides (series {', '.join(sorted(series))}); "
            "put each slide's files in a folder of its own"
        )
    return next(iter(series.values()))


class DicomHandle:
    """wsidicom's view of a DICOM slide folder with the OpenSlide attributes the bundle uses: level_dimensions,
    level_downsamples, properties (the µm/px as `wsidicom.mpp-x`), read_region in level-0 coordinates,
    get_best_level_for_downsample and close."""

    def __init__(self, files: list[Path]):
        import wsidicom

        logging.getLogger("pydicom").setLevel(logging.ERROR)  # its deprecation notes about wsidicom's calls, per file
        self._wsi = wsidicom.WsiDicom.open(files)
        levels = sorted(self._wsi.levels, key=lambda level: level.level)
        self._levels = [level.level for level in levels]  # wsidicom numbers levels by log2 of the downsample
        self.level_dimensions = tuple((level.size.width, level.size.height) for level in levels)
        width = self.level_dimensions[0][0]
        self.level_downsamples = tuple(width / w for w, _ in self.level_dimensions)
        try:
            self.properties = {"wsidicom.mpp-x": str(self._wsi.mpp.width)}  # wsidicom's SizeMm holds µm per pixel
        except Exception:  # noqa: BLE001 - no pixel spacing recorded: the slide needs --mpp, as with OpenSlide
            self.properties = {}

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(height, width, 3) uint8 RGB of `size` pixels of `level` whose corner is `location` in level-0 pixels;
        the region must lie inside the level (`reader.Slide` clips it)."""
        down = self.level_downsamples[level]
        x, y = int(location[0] / down), int(location[1] / down)  # as OpenSlide and tiffslide convert them
        return np.asarray(self._wsi.read_region((x, y), self._levels[level], tuple(size)).convert("RGB"))

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level no coarser than `downsample`, as OpenSlide picks it."""
        fine_enough = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return max(fine_enough, key=lambda i: self.level_downsamples[i]) if fine_enough else 0

    def close(self) -> None:
        self._wsi.close()
