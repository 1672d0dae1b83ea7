"""train.json's random augmentation applied to a whole batch on its device, each tile with its own random draws.

train.json augments tile by tile in DataLoader workers (MONAI dict transforms on the CPU).  When the training
fold sits on the GPU (scripts/data/pannuke/device_tiles.py) the same augmentations run once per batch: every tile
still gets its own flips, rotation, affine and stain parameters, but a step costs a handful of kernels instead of a
Python loop.
Random numbers come from torch's generator on the batch's device, so `set_determinism` seeds them and a resumed run
restores them.  A tile that does not get a transform is kept with `torch.where` rather than boolean indexing, so
nothing waits for the GPU to report how many tiles were picked.

Each transform takes and returns a dict of (B, C, H, W) tensors: "image" float RGB in 0..1, and map keys ("inst",
"type": float ids) moved with nearest-neighbour interpolation; the training target is built from them afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from scripts.data.augment.stain import jitter_stains


def _keep(picked: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per tile: `new` where picked[b], else `old`."""
    return torch.where(picked.view(-1, *([1] * (old.ndim - 1))), new, old)


def _uniform(low: float, high: float, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, device=device)


class BatchFlipRotate90:
    """Per tile: flip rows, flip columns (each with flip_prob), then rotate by 90, 180 or 270 degrees (rotate_prob).

    The batched RandFlipd(spatial_axis=0) + RandFlipd(spatial_axis=1) + RandRotate90d(max_k=3) of train.json.
    """

    def __init__(self, keys: Sequence[str] = ("image", "label"), flip_prob: float = 0.5, rotate_prob: float = 0.75):
        self.keys, self.flip_prob, self.rotate_prob = tuple(keys), flip_prob, rotate_prob

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = batch[self.keys[0]]
        if first.shape[-1] != first.shape[-2]:
            raise ValueError(f"90-degree rotations of a batch need square tiles, got {tuple(first.shape[-2:])}")
        n, device = first.shape[0], first.device
        flip_rows = torch.rand(n, device=device) < self.flip_prob
        flip_cols = torch.rand(n, device=device) < self.flip_prob
        quarter_turns = torch.randint(1, 4, (n,), device=device) * (torch.rand(n, device=device) < self.rotate_prob)
        out = dict(batch)
        for key in self.keys:
            x = _keep(flip_rows, batch[key].flip(-2), batch[key])
            x = _keep(flip_cols, x.flip(-1), x)
            for k in (1, 2, 3):
                x = _keep(quarter_turns == k, x.rot90(k, (-2, -1)), x)
            out[key] = x
        return out


class BatchAffine:
    """Per tile with probability prob: rotation, per-axis scaling and shear about the centre, one grid for all keys.

    The batched RandAffined of train.json: same ranges (radians; 1 +- scale_range per axis; shear coefficients),
    bilinear for the image, nearest for the instance and type maps, the config's padding at the border.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image", "label"),
        modes: Sequence[str] = ("bilinear", "nearest"),
        prob: float = 0.3,
        rotate_range: float = 0.26,
        scale_range: float = 0.1,
        shear_range: float = 0.05,
        padding_mode: str = "reflection",
    ):
        if len(keys) != len(modes):
            raise ValueError(f"one interpolation mode per key: keys {keys}, modes {modes}")
        self.keys, self.modes, self.prob, self.padding_mode = tuple(keys), tuple(modes), prob, padding_mode
        self.rotate_range, self.scale_range, self.shear_range = rotate_range, scale_range, shear_range

    def matrices(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, 2, 3) affine_grid matrices: rotation @ shear @ scale, no translation."""
        angle = _uniform(-self.rotate_range, self.rotate_range, (n,), device)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shear = torch.eye(2, device=device).repeat(n, 1, 1)
        shear[:, 0, 1], shear[:, 1, 0] = _uniform(-self.shear_range, self.shear_range, (2, n), device)
        scale = torch.diag_embed(_uniform(1 - self.scale_range, 1 + self.scale_range, (n, 2), device))
        return F.pad(rotation @ shear @ scale, (0, 1))

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = batch[self.keys[0]]
        n, device = first.shape[0], first.device
        picked = torch.rand(n, device=device) < self.prob
        grid = F.affine_grid(self.matrices(n, device), [n, 1, *first.shape[-2:]], align_corners=False)
        out = dict(batch)
        for key, mode in zip(self.keys, self.modes, strict=True):
            x = batch[key]
            moved = F.grid_sample(
                x.float(), grid.to(torch.float32), mode=mode, padding_mode=self.padding_mode, align_corners=False
            )
            out[key] = _keep(picked, moved.to(x.dtype), x)
        return out


class BatchStainJitter:
    """Per tile with probability prob: H&E stain jitter with its own scale and shift, the batched RandHEStainJitterd."""

    def __init__(
        self, keys: Sequence[str] = ("image",), prob: float = 0.8, scale_range: float = 0.05, shift_range: float = 0.05
    ):
        self.keys, self.prob = (keys,) if isinstance(keys, str) else tuple(keys), prob
        self.scale_range, self.shift_range = scale_range, shift_range

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        for key in self.keys:
            image = batch[key]
            n, device = image.shape[0], image.device
            picked = torch.rand(n, device=device) < self.prob
            scale = _uniform(1 - self.scale_range, 1 + self.scale_range, (n, 3), device).to(image.dtype)
            shift = _uniform(-self.shift_range, self.shift_range, (n, 3), device).to(image.dtype)
            out[key] = _keep(picked, jitter_stains(image, scale, shift), image)
        return out
