"""Turn PanNuke's 6-channel masks into what the bundle stores and trains on.

Per tile we keep one instance map (contiguous ids over all 5 type channels), one pixel type map (0 = none, 1..5 =
PanNuke channel + 1) and the 7-class label map the network learns: background, the interior of each type, and the
inner one-pixel outline of every nucleus.  The outline class is what lets post-processing split touching nuclei, and
the interiors carry the type, so one softmax head gives the binary mask, the types and the instances.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.segmentation import find_boundaries

from scripts.pannuke_format import BOUNDARY, NUM_TYPES


def masks_to_instances(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 6) PanNuke mask -> (instance map uint16 with ids 1..N, type map uint8 with 0 = none, 1..5).

    PanNuke ids are unique per channel but neither contiguous nor guaranteed unique across channels, so each
    nucleus is keyed by (channel, id) before relabelling.  Where channels overlap, the later channel wins.
    """
    ids = np.rint(masks[..., :NUM_TYPES]).astype(np.int64)
    present = ids > 0
    channel = np.where(present.any(-1), NUM_TYPES - 1 - np.argmax(present[..., ::-1], axis=-1), -1)
    picked = np.take_along_axis(ids, np.maximum(channel, 0)[..., None], axis=-1)[..., 0]
    key = np.where(channel >= 0, (channel + 1) * (int(ids.max()) + 1) + picked, 0)
    inst = np.searchsorted(np.union1d([0], key), key)
    if inst.max() >= np.iinfo(np.uint16).max:
        raise ValueError(f"a tile holds {inst.max()} nuclei, more than the uint16 instance map can store")
    return inst.astype(np.uint16), (channel + 1).astype(np.uint8)


def label_map(inst: np.ndarray, types: np.ndarray) -> np.ndarray:
    """7-class training target: 0 background, 1..5 interior of that type, 6 inner boundary of any nucleus."""
    label = types.astype(np.uint8).copy()
    label[find_boundaries(inst, mode="inner") & (inst > 0)] = BOUNDARY
    return label


def nuclei_mask(label: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Binary nucleus mask of a label map or an argmax prediction: any class but background."""
    return label > 0
