"""The training folds held on the device and served a whole batch at a time.

The CPU path reads and augments one tile per `__getitem__` in DataLoader workers; on a GPU that, not the network,
limits the speed (benchmarks/train_speed.py measures both).  Here each fold's cache is copied to the device once,
chunk by chunk (a PanNuke fold is about 1.4 GB: uint8 image and type map, int32 instance map), and the
DataLoader's list of indices is served by `__getitems__`: one gather, a conversion to float and the batched
augmentation of scripts/data/augment/batch.py.
The batch carries the instance and type maps through the augmentation, and `BatchNucleiTargets` (last in
train_fast.json's chain) builds the training target from them on the device, HV maps included.
Samplers only see indices, so `shuffle=True` and DistributedSampler work unchanged.  Use num_workers=0 (the data is
already where the network is) and `identity_collate` (the batch is already stacked); configs/train_fast.json does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from scripts.data.pannuke.cache import open_fold_cache
from scripts.data.pannuke.datasets import PanNuke, as_fold_list

logger = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


class DeviceTiles(Dataset):
    """All tiles of `folds` on `device`: image (N, 3, H, W) uint8, inst (N, 1, H, W) int32, type (N, 1, H, W) uint8."""

    def __init__(
        self,
        pannuke: PanNuke,
        folds: int | str | Sequence[int],
        device: str | torch.device,
        transform: Callable[[Batch], Batch] | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        chunk_tiles: int = 256,
    ) -> None:
        self.device, self.transform, self.memory_format = torch.device(device), transform, memory_format
        caches = [open_fold_cache(pannuke.cache(fold)) for fold in as_fold_list(folds)]
        self.image = _stack_on_device([c["image"] for c in caches], self.device, chunk_tiles, _rgb_first)
        self.inst = _stack_on_device([c["inst"] for c in caches], self.device, chunk_tiles, _add_channel)
        self.type = _stack_on_device([c["type"] for c in caches], self.device, chunk_tiles, _add_channel)
        size = (self.image.nbytes + self.inst.nbytes + self.type.nbytes) / 2**20
        logger.info(f"folds {as_fold_list(folds)}: {len(self)} tiles held on {self.device} ({size:.0f} MB)")

    def __len__(self) -> int:
        return self.image.shape[0]

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """One batch: float image in 0..1 and float inst and type maps, then the transform (augmentation, targets)."""
        index = torch.as_tensor(indices, dtype=torch.long).to(self.device, non_blocking=True)
        batch = {
            "image": self.image[index].float().div_(255.0),
            "inst": self.inst[index].float(),
            "type": self.type[index].float(),
        }
        if self.transform is not None:
            batch = self.transform(batch)
        batch["image"] = batch["image"].contiguous(memory_format=self.memory_format)
        return batch

    def __getitem__(self, index: int) -> Batch:
        """One tile, as a batch of one without the batch dimension (for code that reads tiles one by one)."""
        return {key: value[0] for key, value in self.__getitems__([index]).items()}


def _stack_on_device(
    arrays: list[np.ndarray], device: torch.device, chunk: int, to_nchw: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Concatenate memory-mapped arrays into one (N, C, H, W) device tensor, copying `chunk` tiles at a time."""
    sample = to_nchw(_as_tensor(arrays[0][:1]))
    out = torch.empty((sum(len(a) for a in arrays), *sample.shape[1:]), dtype=sample.dtype, device=device)
    start = 0
    for array in arrays:
        for offset in range(0, len(array), chunk):
            part = to_nchw(_as_tensor(array[offset : offset + chunk]))
            out[start + offset : start + offset + len(part)] = part.to(device)
        start += len(array)
    return out


def _as_tensor(tiles: np.ndarray) -> torch.Tensor:
    """A writable copy; uint16 instance ids become int32, which every device supports."""
    tiles = np.array(tiles)
    return torch.from_numpy(tiles.astype(np.int32) if tiles.dtype == np.uint16 else tiles)


def _rgb_first(tiles: torch.Tensor) -> torch.Tensor:
    return tiles.permute(0, 3, 1, 2)  # (N, H, W, 3) as cached -> (N, 3, H, W)


def _add_channel(tiles: torch.Tensor) -> torch.Tensor:
    return tiles[:, None]  # (N, H, W) -> (N, 1, H, W)


def identity_collate(batch: Batch) -> Batch:
    """collate_fn for DeviceTiles: `__getitems__` already returns the stacked batch."""
    return batch
