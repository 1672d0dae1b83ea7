"""Turn the cached instance and type maps into what the network trains on.

Per tile the cache keeps one instance map (contiguous ids over all type channels) and one pixel type map (0 = none,
1..K = type id, K = the dataset's number of types: PanNuke's 5 or a lab's own).  The training target is built from
those two maps after augmentation, in the config's transform chain (`NucleiTargetsd`) or batched on the device
(`BatchNucleiTargets`), for one of two targets:

- "hv" (default): a K+1-class softmax (background + K types) and HoVer-Net's horizontal and vertical distance maps,
  whose sharp sign changes between touching nuclei are what post-processing splits them at;
- "boundary": a K+2-class softmax (background, the interior of each type, the inner one-pixel outline).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform
from skimage.segmentation import find_boundaries

from scripts.core.errors import ConfigError
from scripts.data.pannuke.format import HV_CHANNELS, NUM_TYPES


def label_map(inst: np.ndarray, types: np.ndarray, num_types: int = NUM_TYPES) -> np.ndarray:
    """The 'boundary' target as a map: 0 background, 1..K interior of that type, K+1 inner boundary of any nucleus."""
    label = types.astype(np.uint8).copy()
    label[find_boundaries(inst, mode="inner") & (inst > 0)] = num_types + 1
    return label


def nuclei_mask(label: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Binary (1, H, W) nucleus mask of a channel-first target (class channel first), instance or class map."""
    return label[:1] > 0


# ---- training targets built after augmentation, in the transform chain (CPU, per tile) or on the device (batch) ----

TARGETS = ("hv", "boundary")
MAX_INSTANCE_IDS = 2**16  # instance ids per tile: the cache's uint16 instance map


def class_count(target: str, num_types: int = NUM_TYPES) -> int:
    """Classes of the softmax part of the output: background + the types, plus the outline class for 'boundary'."""
    check_target(target)
    return num_types + (2 if target == "boundary" else 1)


def output_channels(target: str, num_types: int = NUM_TYPES) -> int:
    """Channels the network predicts: the classes, plus the horizontal and vertical maps for 'hv'.

    Args:
        target: "hv" or "boundary".
        num_types: nucleus types of the dataset (PanNuke's 5, or a lab's own classes).
    """
    return class_count(target, num_types) + (HV_CHANNELS if target == "hv" else 0)


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ConfigError(f"--target must be one of {', '.join(TARGETS)}; got {target!r}")
    return target


def hover_maps(inst: torch.Tensor) -> torch.Tensor:
    """(B, H, W) instance maps -> (B, 2, H, W) horizontal and vertical distance maps, HoVer-Net style.

    Channel 0 is the horizontal (column) and channel 1 the vertical (row) offset of each nucleus pixel from its
    nucleus' centre of mass, each side scaled separately to [-1, 0] and [0, 1] (as MONAI's ComputeHoVerMaps, which
    the tests compare against); background is 0.  Every nucleus of the batch is handled at once with scatter
    reductions into one bin per (tile, id) (no loop over nuclei, no `unique`, no host sync: a GPU batch never waits),
    so the same code serves the CPU transform chain and a whole batch on the GPU.  Ids may be any integers in
    [0, 65536) (the cache stores them as uint16), contiguous or not.
    """
    if inst.ndim != 3:
        raise ValueError(f"hover_maps expects (B, H, W) instance maps, got shape {tuple(inst.shape)}")
    b, h, w = inst.shape
    ids = inst.long()
    if ids.device.type == "cpu" and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < MAX_INSTANCE_IDS:
        raise ValueError(f"instance ids must lie in [0, {MAX_INSTANCE_IDS}), got {int(ids.min())}..{int(ids.max())}")
    index = (ids + torch.arange(b, device=inst.device).view(b, 1, 1) * MAX_INSTANCE_IDS).flatten()
    n = b * MAX_INSTANCE_IDS
    rows = torch.arange(h, device=inst.device, dtype=torch.float32).view(1, h, 1).expand(b, h, w).flatten()
    cols = torch.arange(w, device=inst.device, dtype=torch.float32).view(1, 1, w).expand(b, h, w).flatten()
    count = torch.zeros(n, device=inst.device).index_add_(0, index, torch.ones_like(rows)).clamp_min(1.0)
    maps = []
    for coord in (cols, rows):
        centre = torch.zeros(n, device=inst.device).index_add_(0, index, coord) / count
        offset = coord - centre[index]
        low = torch.zeros(n, device=inst.device).scatter_reduce_(0, index, offset, "amin", include_self=True)
        high = torch.zeros(n, device=inst.device).scatter_reduce_(0, index, offset, "amax", include_self=True)
        scale = torch.where(offset < 0, -low[index], high[index])
        maps.append(torch.where(scale > 0, offset / scale.clamp_min(1e-12), torch.zeros_like(offset)))
    hv = torch.stack(maps, dim=1).view(b, h, w, 2).permute(0, 3, 1, 2)
    return torch.where(ids[:, None] > 0, hv, torch.zeros_like(hv)).contiguous()


def inner_boundary(inst: torch.Tensor) -> torch.Tensor:
    """(B, H, W) instance maps -> bool mask of nucleus pixels with a 4-neighbour of another id (the image edge
    repeats the border), i.e. skimage's find_boundaries(mode="inner") used for the cached label maps."""
    padded = F.pad(inst[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0]
    centre = padded[:, 1:-1, 1:-1]
    differs = torch.zeros_like(centre, dtype=torch.bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[:, dy : dy + inst.shape[1], dx : dx + inst.shape[2]] != centre
    return differs & (inst > 0)


def nuclei_targets(inst: torch.Tensor, types: torch.Tensor, target: str, num_types: int = NUM_TYPES) -> torch.Tensor:
    """(B, H, W) instance and type maps -> (B, C, H, W) float training target.

    'boundary': C = 1, the K+2-class map (background, interior of each type, inner outline = class K+1).
    'hv': C = 3, the K+1-class type map (background + K types) and the horizontal and vertical maps.
    """
    check_target(target)
    classes = types.float()
    if target == "boundary":
        return torch.where(inner_boundary(inst), float(num_types + 1), classes)[:, None]
    return torch.cat([classes[:, None], hover_maps(inst)], dim=1)


class NucleiTargetsd(MapTransform):
    """Build the training target of one tile from its (augmented) instance and type maps.

    Geometric augmentation must run before this transform, on the instance map (with nearest interpolation): an HV
    map cannot be flipped or rotated as an image, its signs and axes would be wrong.  Takes (1, H, W) `inst_key` and
    `type_key` and writes `label_key`, a float tensor of nuclei_targets' channels.

    Args:
        target: "hv" (types + horizontal/vertical maps) or "boundary" (the types and the nucleus outline).
        num_types: the dataset's nucleus types (`@num_types`): the outline class comes after them.
    """

    def __init__(
        self,
        target: str = "hv",
        inst_key: str = "inst",
        type_key: str = "type",
        label_key: str = "label",
        allow_missing_keys: bool = False,
        num_types: int = NUM_TYPES,
    ) -> None:
        super().__init__([inst_key, type_key], allow_missing_keys)
        self.target, self.num_types = check_target(target), num_types
        self.inst_key, self.type_key, self.label_key = inst_key, type_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        inst, types = torch.as_tensor(d[self.inst_key]), torch.as_tensor(d[self.type_key])
        d[self.label_key] = nuclei_targets(
            inst.reshape(1, *inst.shape[-2:]).round().long(),
            types.reshape(1, *types.shape[-2:]).round().long(),
            self.target,
            self.num_types,
        )[0]
        return d


class BatchNucleiTargets:
    """The batched NucleiTargetsd for the device-resident fast path: (B, 1, H, W) inst and type -> label."""

    def __init__(
        self,
        target: str = "hv",
        inst_key: str = "inst",
        type_key: str = "type",
        label_key: str = "label",
        num_types: int = NUM_TYPES,
    ):
        self.target, self.num_types = check_target(target), num_types
        self.inst_key, self.type_key, self.label_key = inst_key, type_key, label_key

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        inst, types = batch[self.inst_key][:, 0].round().long(), batch[self.type_key][:, 0].round().long()
        out[self.label_key] = nuclei_targets(inst, types, self.target, self.num_types)
        return out
