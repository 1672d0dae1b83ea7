"""What the network's output channels mean, and the loss that trains them.

One BasicUNet predicts everything in one forward pass: the first `class_count(target)` channels are softmax logits
(background + K types, plus the outline class for the "boundary" target), and for the "hv" target the last two
channels are the horizontal and vertical distance maps.  `split_output` is the one place that knows this layout;
the loss, validation metrics, post-processing and test-time augmentation all go through it.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.losses import DiceCELoss
from monai.transforms import MapTransform

from scripts.core.errors import ConfigError
from scripts.core.flags import is_number
from scripts.data.pannuke.cache import open_fold_cache
from scripts.data.pannuke.datasets import PanNuke, as_fold_list
from scripts.data.pannuke.format import HV_CHANNELS, NUM_TYPES
from scripts.model.targets import check_target, class_count, output_channels

logger = logging.getLogger(__name__)


def split_output(pred: torch.Tensor, target: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, H, W) or (C, H, W) network output -> (class logits, HV maps or None), split along the channel axis.

    The number of types follows from C: C = K + 3 for "hv" (background, K types, 2 maps), K + 2 for "boundary".
    """
    axis = pred.ndim - 3
    fewest = output_channels(target, 1)
    if pred.shape[axis] < fewest:
        raise ValueError(
            f"the network output has {pred.shape[axis]} channels, the {target!r} target needs at least {fewest}: "
            "the checkpoint or network_def was made for the other target (set --target to match)"
        )
    classes = pred.shape[axis] - (HV_CHANNELS if target == "hv" else 0)
    logits = pred.narrow(axis, 0, classes)
    return logits, (pred.narrow(axis, classes, HV_CHANNELS) if target == "hv" else None)


class NucleiLoss(torch.nn.Module):
    """DiceCE on the classes, plus (for "hv") MSE and gradient MSE of the HV maps inside nuclei.

    The label is the tensor `NucleiTargetsd` builds: channel 0 the class index, channels 1-2 the HV maps for "hv".
    The gradient term compares 5x5 Sobel derivatives (horizontal map along columns, vertical along rows), as in
    HoVer-Net and MONAI's HoVerNetLoss; it is what makes the maps change sign sharply between touching nuclei.  Both
    HV terms count nucleus pixels only (HoVer-Net takes the plain MSE over the whole tile, with 0 as the background
    target); post-processing reads the maps inside the predicted foreground only.

    Args:
        target: "hv" or "boundary", as in NucleiTargetsd.
        class_weights: optional DiceCE weight per class (length class_count(target, num_types)).
        num_types: the dataset's nucleus types (`@num_types`).
        hv_mse_weight: weight of the MSE between predicted and true HV maps, inside nuclei.
        hv_gradient_weight: weight of the MSE between their Sobel gradients, inside nuclei.
    """

    def __init__(
        self,
        target: str = "hv",
        class_weights: torch.Tensor | list[float] | None = None,
        hv_mse_weight: float = 2.0,
        hv_gradient_weight: float = 1.0,
        num_types: int = NUM_TYPES,
    ) -> None:
        super().__init__()
        self.target = check_target(target)
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        classes = class_count(target, num_types)
        if weight is not None and weight.numel() != classes:
            raise ValueError(f"class_weights needs {classes} values for {target!r}, got {weight.numel()}")
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
        self.hv_mse_weight, self.hv_gradient_weight = hv_mse_weight, hv_gradient_weight
        derivative = torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0]) / 8.0  # slope 1 per pixel -> 1
        smoothing = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
        # 5x5 Sobel kernels as HoVer-Net's gradient loss: d/d(column) for the horizontal map, d/d(row) for the vertical
        kernels = torch.stack([torch.outer(smoothing, derivative), torch.outer(derivative, smoothing)])[:, None]
        self.register_buffer("sobel", kernels, persistent=False)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits, hv = split_output(pred, self.target)
        loss = self.dice_ce(logits, label[:, :1])
        if hv is None:
            return loss
        hv, true_hv = hv.float(), label[:, 1:].float()
        inside = (label[:, :1] > 0).float()
        mse = _mean_inside((hv - true_hv) ** 2, inside)
        gradient = _mean_inside((self.hv_gradients(hv) - self.hv_gradients(true_hv)) ** 2, inside)
        return loss + self.hv_mse_weight * mse + self.hv_gradient_weight * gradient

    def hv_gradients(self, hv: torch.Tensor) -> torch.Tensor:
        """d(horizontal)/d(column) and d(vertical)/d(row), (B, 2, H, W)."""
        with torch.autocast(device_type=hv.device.type, enabled=False):  # float32 even inside an AMP step
            padded = F.pad(hv.float(), (2, 2, 2, 2), mode="replicate")
            return F.conv2d(padded, self.sobel.to(hv.device), groups=HV_CHANNELS)


def _mean_inside(error: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Mean of (B, 2, H, W) errors over each tile's nucleus pixels, then over tiles (a tile without nuclei adds 0).

    Per tile, not pooled over the batch, so that N GPUs with B/N tiles each average to the same gradient as one
    process with B tiles (DDP averages per-rank losses).
    """
    per_tile = (inside * error).sum(dim=(1, 2, 3)) / (2 * inside.sum(dim=(1, 2, 3)).clamp_min(1.0))
    return per_tile.mean()


def check_type_weights(type_weights: Sequence[float] | None, num_types: int) -> None:
    """Refuse type weights that are not one number of at least 0 per type (None: not given, balanced or equal).

    Args:
        type_weights: `@type_weights`, as the user gave it.
        num_types: the dataset's nucleus types (`@num_types`).
    """
    if type_weights is None:
        return
    ok = isinstance(type_weights, list | tuple) and all(is_number(w) and w >= 0 for w in type_weights)
    if not ok or len(type_weights) != num_types:
        raise ConfigError(
            f"--type_weights needs one weight of at least 0 per nucleus type ({num_types}), got {type_weights!r}; "
            "leave it unset for weights balanced on the training nuclei"
        )


def loss_class_weights(
    target: str, type_weights: Sequence[float] | None, boundary_weight: float = 1.0, num_types: int = NUM_TYPES
) -> list[float]:
    """DiceCE class weights: 1 for background, one per type, and `boundary_weight` for the outline class.

    Args:
        target: "hv" or "boundary".
        type_weights: one weight per type (`@loss_type_weights`); None weighs the types equally (evaluate.json
            does, so that scoring a test fold never needs the training folds the weights are counted on).
        boundary_weight: the outline class's weight (boundary target only).
        num_types: the dataset's nucleus types (`@num_types`).
    """
    check_type_weights(type_weights, num_types)
    type_weights = [1.0] * num_types if type_weights is None else list(type_weights)
    weights = [1.0, *map(float, type_weights)]
    return weights + [float(boundary_weight)] if check_target(target) == "boundary" else weights


def training_type_weights(
    given: Sequence[float] | None, pannuke: PanNuke, folds: int | str | Sequence[int]
) -> Sequence[float]:
    """The type weights of a training: `--type_weights` where given, else `balanced_type_weights` on its folds.

    Args:
        given: `@type_weights` (None: not given).
        pannuke: the run's checked folds (`@pannuke`).
        folds: the training folds (`@train_folds`).
    """
    if given is not None:  # checked by the option checks, and again by loss_class_weights, which uses them
        return given
    return balanced_type_weights(pannuke, folds)


class ClassPredictiond(MapTransform):
    """Add the argmax class map (1, H, W) of one decollated prediction's class logits, for pixel metrics and panels.

    Args:
        target: "hv" or "boundary": which channels of the prediction are class logits.
    """

    def __init__(self, keys: KeysCollection = "pred", target: str = "hv", output_key: str = "pred_class") -> None:
        super().__init__(keys)
        self.target, self.output_key = check_target(target), output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            logits, _ = split_output(torch.as_tensor(d[key]), self.target)
            d[self.output_key] = logits.argmax(dim=0, keepdim=True)
        return d


def balanced_type_weights(pannuke: PanNuke, folds: int | str | Sequence[int], power: float = 0.5) -> list[float]:
    """DiceCE weights that lift the rare types: (count of the commonest type / count of type t) ** power.

    Nuclei are counted per type over the training folds' caches (a nucleus counts once per tile).  A type with no
    nucleus at all gets 1.0 (there is nothing to lift).  power 0.5 (inverse square root of the frequency) lifts a
    type 100x rarer than the commonest by 10x.

    Args:
        pannuke: the run's checked folds (`@pannuke`).
        folds: the training folds (`@train_folds`).
        power: 0 gives equal weights, 1 inverse frequency.
    """
    num_types = pannuke.classes.num_types
    counts = np.zeros(num_types + 1, dtype=np.int64)
    for fold in as_fold_list(folds):
        cache = open_fold_cache(pannuke.cache(fold))
        for start in range(0, len(cache["inst"]), 64):
            inst = np.asarray(cache["inst"][start : start + 64], dtype=np.int64)
            types = np.asarray(cache["type"][start : start + 64], dtype=np.int64)
            tile = np.arange(len(inst)).reshape(-1, 1, 1)
            nuclei = np.unique(((tile * 2**16 + inst) * (num_types + 1) + types)[inst > 0])
            counts += np.bincount(nuclei % (num_types + 1), minlength=num_types + 1)
    present = counts[1:]
    weights = np.where(present > 0, (present.max() / np.maximum(present, 1)) ** power, 1.0)
    logger.info(
        f"nuclei per type in folds {as_fold_list(folds)}: {present.tolist()} -> type weights "
        f"{np.round(weights, 2).tolist()}"
    )
    return [round(float(w), 3) for w in weights]
