"""Which parts of a slide hold tissue, from a low-resolution view, so that glass is never read at full resolution.

Otsu's threshold on the saturation of the thumbnail separates stained tissue from glass (white or grey, both
unsaturated); small specks are removed and small holes filled.  A user's own mask image (any size; non-zero =
tissue) replaces it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects

from scripts.core.errors import DataError
from scripts.data.images import read_labels

MIN_SATURATION = 0.05  # below this nothing is tissue, whatever Otsu says (an all-glass thumbnail)


def tissue_mask(thumbnail: np.ndarray, min_fraction: float = 1e-4) -> np.ndarray:
    """(H, W) bool tissue mask of an RGB thumbnail.

    Args:
        thumbnail: (H, W, 3) uint8.
        min_fraction: specks smaller than this fraction of the thumbnail are dropped.
    """
    saturation = rgb2hsv(thumbnail)[..., 1]
    level = threshold_otsu(saturation) if np.ptp(saturation) > 0 else 1.0
    mask = saturation > max(level, MIN_SATURATION)
    min_size = max(1, int(min_fraction * mask.size))
    mask = remove_small_objects(mask, max_size=min_size)
    return ndimage.binary_fill_holes(mask)


def mask_from_file(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """A user's tissue mask (non-zero = tissue) resized to `shape` (H, W); a mask of another aspect ratio than the
    slide is refused, as stretching it would put the tissue in the wrong place."""
    labels = read_labels(path, "tissue mask") > 0
    (h, w), (height, width) = labels.shape[:2], shape
    slack = 0.02 + 1.0 / min(h, w, height, width)  # sizes are whole pixels: a small mask rounds its ratio
    if abs(np.log((w / h) / (width / height))) > slack:
        raise DataError(
            f"{path}: a tissue mask of {w} x {h} px for a slide of aspect {width} x {height}: it would be stretched; "
            "save the mask with the slide's aspect ratio (any size)"
        )
    image = Image.fromarray(labels.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(image) > 0
