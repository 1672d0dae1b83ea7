"""DICOM whole-slide images: a folder of VL Whole Slide Microscopy files, one per pyramid level.

OpenSlide 4 reads them, given any one file of the folder.  `wsidicom` (pure Python, on pydicom) reads them too, for
installs where OpenSlide's library is missing; `DicomHandle` puts it behind the few OpenSlide calls the bundle makes,
so `reader.Slide` does not care which one opened a slide.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

DICM_OFFSET = 128  # a DICOM file's 128-byte preamble, then b"DICM"
FILES_LOOKED_AT = 64


def is_dicom_file(path: Path) -> bool:
    """A DICOM part-10 file, whatever its name (PACS exports often have no extension)."""
    try:
        with open(path, "rb") as f:
            f.seek(DICM_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files directly in `folder`, sorted; empty when it holds none among its first files."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    if not any(is_dicom_file(p) for p in files[:FILES_LOOKED_AT]):
        return []
    return [p for p in files if is_dicom_file(p)]


class DicomHandle:
    """wsidicom's view of a DICOM slide folder with the OpenSlide attributes the bundle uses: level_dimensions,
    level_downsamples, properties (the µm/px as `wsidicom.mpp-x`), read_region in level-0 coordinates,
    get_best_level_for_downsample and close."""

    def __init__(self, folder: str | os.PathLike):
        import wsidicom

        logging.getLogger("pydicom").setLevel(logging.ERROR)  # its deprecation notes about wsidicom's calls, per file
        self._wsi = wsidicom.WsiDicom.open(Path(folder))
        levels = sorted(self._wsi.levels, key=lambda level: level.level)
        self._levels = [level.level for level in levels]  # wsidicom numbers levels by log2 of the downsample
        self.level_dimensions = tuple((level.size.width, level.size.height) for level in levels)
        width = self.level_dimensions[0][0]
        self.level_downsamples = tuple(width / w for w, _ in self.level_dimensions)
        self.properties = {"wsidicom.mpp-x": str(self._wsi.mpp.width)}  # wsidicom's SizeMm holds µm per pixel

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(height, width, 3) uint8 RGB of `size` pixels of `level` whose corner is `location` in level-0 pixels;
        the region must lie inside the level (`reader.Slide` clips it)."""
        down = self.level_downsamples[level]
        x, y = int(round(location[0] / down)), int(round(location[1] / down))
        return np.asarray(self._wsi.read_region((x, y), self._levels[level], tuple(size)).convert("RGB"))

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level no coarser than `downsample`, as OpenSlide picks it."""
        fine_enough = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return max(fine_enough, key=lambda i: self.level_downsamples[i]) if fine_enough else 0

    def close(self) -> None:
        self._wsi.close()
