"""Turn the network's output into nucleus instances with a type each (PanNuke's 5 or a lab's K classes).

Two targets (scripts/model/targets.py), two ways to find instances, one type vote:

- "hv": foreground is the argmax of the K+1-class softmax (background + K types).  Between two touching nuclei the
  horizontal map falls from +1 to -1 along the columns (the vertical map along the rows), so the *negative* Sobel
  derivative of the maps is an edge energy that is ~0 inside a nucleus and ~1 between nuclei.  Markers are the
  foreground pixels of low energy; a watershed over the energy grows them back to the whole foreground.  This is
  HoVer-Net's marker-controlled watershed (MONAI's HoVerNetInstanceMapPostProcessing is the reference the tests
  and benchmarks/postprocess_speed.py compare against) with 3x3 Sobel kernels and a fixed energy threshold instead
  of 21x21 kernels with per-tile min-max scaling, which is what makes it a few milliseconds per tile.
- "boundary": the network predicts, per pixel, background, the interior of each of the K nucleus types, and a
  boundary class (the inner 1-pixel outline of every nucleus).  Touching nuclei are only separated by their
  boundaries, so the interiors are the seeds of the instances and the boundary pixels are handed to the nearest
  interior by a watershed.

For both, the type of a nucleus is decided once per instance, by summing the type probabilities over its pixels,
because per-pixel types are noisy at the edges.

Foreground is where the class argmax is not background, exactly as the validation Dice counts nuclei.  Summing
the type probabilities against the background (1 - p_background > 0.5) would be the Bayes decision for calibrated
probabilities, but a DiceCE-trained network spreads mass over the rare classes: on the demo model that rule almost
doubled the nucleus area (Dice 0.60 against 0.98 for the argmax, bPQ 0.11 against 0.43).  For "boundary", within
the foreground, seeds are the pixels whose summed interior probability beats the boundary's, so an uncertain type
still seeds.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from scripts.model.head import split_output
from scripts.data.pannuke.format import BACKGROUND, HV_CHANNELS
from scripts.model.targets import check_target

__all__ = ["instances_from_probabilities", "instances_from_hv", "type_map_from_instances", "NucleiInstancesd"]

# 3x3 structuring elements: 4-connectivity (edge neighbours) and 8-connectivity (edge and corner neighbours)
_CONNECTIVITY = {1: ndi.generate_binary_structure(2, 1), 2: ndi.generate_binary_structure(2, 2)}


def _check_probs(probs: np.ndarray, channels: int, what: str = "probabilities", at_least: bool = False) -> np.ndarray:
    """Reject anything but one decollated (C,H,W) map early, with a message that says what was expected.

    `at_least`: `channels` is the minimum (class probabilities: background, at least one type, [boundary]).
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(
            f"expected {what} of shape (C, H, W), got shape {probs.shape}; "
            "post-processing works on one decollated item, not a batch"
        )
    if probs.shape[0] < channels if at_least else probs.shape[0] != channels:
        wanted = f"at least {channels}" if at_least else str(channels)
        raise ValueError(f"expected {wanted} channels of {what}, got {probs.shape[0]}")
    return probs.astype(np.float32, copy=False)


def _argmax_is_not_background(probs: np.ndarray) -> np.ndarray:
    """argmax over classes != background, as the validation Dice counts nuclei (ties go to background, as argmax's
    first index does), without argmax: one max over the other classes reads the (C,H,W) array once, where argmax
    builds an index array."""
    return probs[BACKGROUND] < probs[BACKGROUND + 1 :].max(axis=0)


def _foreground_box(foreground: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box of the foreground, so that the costly steps skip empty margins; None when there is none."""
    rows = np.flatnonzero(foreground.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(foreground.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _grow_seeds(interior: np.ndarray, seeds: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Label every foreground pixel: seeds flood the boundary pixels, seedless components become instances.

    The flood goes from the most interior-like pixels outwards, so a contested boundary pixel goes to the nucleus
    whose interior it resembles most; with equal values it is a geodesic nearest-seed assignment.  Growth uses
    4-connectivity because a neighbour's interior can touch a nucleus' outline at a corner, which would make the
    two seeds tie for that pixel; the seedless components use 8-connectivity because an inner outline is only
    8-connected at its corners.
    """
    flood = (255.0 * (1.0 - interior)).astype(np.uint8)  # quantised: ties fall back to distance from the seed
    labels = watershed(flood, seeds, mask=foreground, connectivity=1)
    leftover = foreground & (labels == 0)
    if leftover.any():
        extra, _ = ndi.label(leftover, structure=_CONNECTIVITY[2])
        labels[leftover] = extra[leftover] + seeds.max()
    return labels


def _keep(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The instances whose `keep` entry is True (index = id; entry 0 ignored), renumbered 1..N in one look-up."""
    keep = keep.copy()
    keep[0] = False
    lookup = np.zeros(keep.size, dtype=np.int32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lookup[labels]


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Remove instances under min_size pixels and renumber the rest 1..N."""
    return _keep(labels, np.bincount(labels.ravel()) >= min_size)


def _drop_unsure(labels: np.ndarray, nucleus_prob: np.ndarray, min_prob: float) -> np.ndarray:
    """Remove instances whose mean nucleus probability (1 - p_background over their pixels) is under min_prob, and
    renumber the rest 1..N: a texture the network half-believes is a nucleus, not a nucleus it is sure of."""
    if min_prob <= 0 or not labels.any():
        return labels
    sizes = np.bincount(labels.ravel())
    mean = np.bincount(labels.ravel(), weights=nucleus_prob.ravel(), minlength=sizes.size) / np.maximum(sizes, 1)
    return _keep(labels, (mean >= min_prob) & (sizes > 0))


def _vote_types(inst: np.ndarray, type_probs: np.ndarray, num_instances: int) -> tuple[np.ndarray, np.ndarray]:
    """Type of each instance = argmax of its summed type probabilities, for all instances in one bincount.

    The confidence is the chosen type's share of the instance's type-probability mass, sum_pixels p_t /
    sum_pixels sum_k p_k, i.e. a mean of per-pixel type shares weighted by how nuclear each pixel is, so boundary
    pixels (low type mass) count less.  It lies in [1/K, 1]; an instance with no type mass at all (only possible
    with exactly one-hot inputs, e.g. a nucleus predicted as boundary only) gets type 1 and confidence 0.
    """
    inside = inst > 0
    ids = inst[inside].astype(np.int64)
    num_types = type_probs.shape[0]
    weights = type_probs[:, inside].astype(np.float64)  # (K, M)
    flat = (ids[None, :] * num_types + np.arange(num_types)[:, None]).ravel()
    sums = np.bincount(flat, weights=weights.ravel(), minlength=(num_instances + 1) * num_types)
    sums = sums.reshape(num_instances + 1, num_types)
    chosen = sums.argmax(axis=1)
    total = sums.sum(axis=1)
    share = np.divide(sums[np.arange(num_instances + 1), chosen], total, out=np.zeros(total.shape), where=total > 0)
    inst_types = (chosen + 1).astype(np.uint8)
    inst_types[0] = 0
    inst_probs = share.astype(np.float32)
    inst_probs[0] = 0.0
    return inst_types, inst_probs


def instances_from_probabilities(
    probs: np.ndarray, min_size: int = 10, seed_connectivity: int = 1, min_nucleus_probability: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the (K+2,H,W) softmax of one tile into typed nucleus instances.

    Args:
        probs: per-pixel class probabilities (background, K type interiors, boundary), summing to 1 over axis 0.
        min_size: instances with fewer pixels are dropped (noise specks); 0 or 1 keeps everything.
        seed_connectivity: 1 (4-neighbours, default) or 2 (8-neighbours) for the interior seeds; 4-connectivity
            keeps two nuclei apart when a noisy boundary lets their interiors touch only at a corner.
        min_nucleus_probability: instances whose mean 1 - p_background is lower are dropped (0 keeps all).

    Returns:
        inst: (H,W) int32, instances numbered 1..N, 0 = background.
        inst_types: (N+1,) uint8, inst_types[i] in 1..K is the type id of instance i (entry 0 is 0).
        inst_probs: (N+1,) float32, the chosen type's share of instance i's type probability (entry 0 is 0).
    """
    probs = _check_probs(probs, 3, at_least=True)
    if seed_connectivity not in _CONNECTIVITY:
        raise ValueError(f"seed_connectivity must be 1 or 2, got {seed_connectivity}")
    boundary = probs.shape[0] - 1  # the last class
    type_probs = probs[1:boundary]  # interior of type t is class t
    interior = type_probs.sum(axis=0)
    foreground = _argmax_is_not_background(probs)
    inst = np.zeros(probs.shape[1:], dtype=np.int32)
    box = _foreground_box(foreground)
    if box is None:
        return inst, np.zeros(1, np.uint8), np.zeros(1, np.float32)
    interior, foreground = interior[box], foreground[box]
    seeds, _ = ndi.label(foreground & (interior >= probs[boundary][box]), structure=_CONNECTIVITY[seed_connectivity])
    inst[box] = _drop_small(_grow_seeds(interior, seeds, foreground), min_size)
    inst[box] = _drop_unsure(inst[box], 1.0 - probs[0][box], min_nucleus_probability)
    num_instances = int(inst[box].max())
    inst_types, inst_probs = _vote_types(inst[box], type_probs[(slice(None), *box)], num_instances)
    return inst, inst_types, inst_probs


def hv_energy(hv: np.ndarray) -> np.ndarray:
    """(2,H,W) horizontal/vertical maps -> (H,W) edge energy: how fast either map falls, per pixel, clipped to [0, 1].

    Inside a nucleus of radius r the maps rise by about 1/r per pixel; between touching nuclei they fall by about 1
    per pixel.  The 3x3 Sobel response divided by 8 is the smoothed central difference in map units per pixel.
    """
    falls_h = -ndi.sobel(hv[0], axis=1) / 8.0
    falls_v = -ndi.sobel(hv[1], axis=0) / 8.0
    return np.clip(np.maximum(falls_h, falls_v), 0.0, 1.0)


def instances_from_hv(
    probs: np.ndarray,
    hv: np.ndarray,
    min_size: int = 10,
    energy_threshold: float = 0.02,
    marker_min_size: int = 4,
    min_nucleus_probability: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split one tile's K+1-class softmax and HV maps into typed nucleus instances.

    Args:
        probs: (K+1,H,W) probabilities (background, K types), summing to 1 over axis 0.
        hv: (2,H,W) predicted horizontal and vertical maps.
        min_size: instances with fewer pixels are dropped (noise specks).
        energy_threshold: foreground pixels whose HV edge energy (hv_energy) is below this are marker pixels;
            higher keeps more of each nucleus as its marker, lower splits more readily.
        marker_min_size: markers with fewer pixels are ignored (their pixels join a neighbour).
        min_nucleus_probability: instances whose mean 1 - p_background is lower are dropped (0 keeps all).

    Returns:
        inst, inst_types, inst_probs as instances_from_probabilities.
    """
    probs = _check_probs(probs, 2, at_least=True)
    hv = _check_probs(hv, HV_CHANNELS, "HV maps")
    if probs.shape[1:] != hv.shape[1:]:
        raise ValueError(f"probabilities {probs.shape} and HV maps {hv.shape} must cover the same pixels")
    foreground = _argmax_is_not_background(probs)
    inst = np.zeros(probs.shape[1:], dtype=np.int32)
    box = _foreground_box(foreground)
    if box is None:
        return inst, np.zeros(1, np.uint8), np.zeros(1, np.float32)
    grown = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)  # the Sobel needs the neighbours
    foreground = foreground[grown]
    # the loss trains the maps inside nuclei only: the background's values are noise, read as 0 (HoVer-Net's target)
    energy = hv_energy(np.where(foreground, hv[(slice(None), *grown)], 0.0))
    markers, _ = ndi.label(foreground & (energy < energy_threshold), structure=_CONNECTIVITY[1])
    markers = _drop_small(markers, marker_min_size)
    inst[grown] = _drop_small(_grow_seeds(1.0 - energy, markers, foreground), min_size)
    inst[grown] = _drop_unsure(inst[grown], 1.0 - probs[0][grown], min_nucleus_probability)
    num_instances = int(inst[grown].max())
    inst_types, inst_probs = _vote_types(inst[grown], probs[(slice(1, None), *grown)], num_instances)
    return inst, inst_types, inst_probs


def type_map_from_instances(inst: np.ndarray, inst_types: np.ndarray) -> np.ndarray:
    """Paint each instance with its type (0 = background), the per-pixel map PanNuke-style metrics expect."""
    inst_types = np.asarray(inst_types, dtype=np.uint8)
    if inst_types.size == 0 or inst_types[0] != 0:
        raise ValueError("inst_types must have an entry 0 equal to 0 for the background")
    if inst.size and int(inst.max()) >= inst_types.size:
        raise ValueError(f"instance id {int(inst.max())} has no type: inst_types has {inst_types.size} entries")
    return inst_types[inst]


def as_plane(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """The (H, W) numpy map of a decollated (1, H, W) or (H, W) instance or type map, on the CPU."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim < 2 or int(np.prod(array.shape[:-2])) != 1:
        raise ValueError(f"expected one (1, H, W) or (H, W) map, got shape {array.shape}")
    return array.reshape(array.shape[-2:])


def _to_probabilities(logits: torch.Tensor, softmax: bool) -> np.ndarray:
    """Bring a (C,H,W) logits/probability tensor to a numpy float32 probability map on the CPU."""
    logits = logits.detach().float()
    return (torch.softmax(logits, dim=0) if softmax else logits).cpu().numpy()


class NucleiInstancesd(MapTransform):
    """MONAI post transform: nucleus instances and types from one decollated (C,H,W) prediction.

    The prediction is the network output for `target` (scripts/model/head.split_output): class logits (or
    probabilities with softmax=False), followed by the HV maps for "hv".

    Adds to the dictionary:
        inst_map: (1,H,W) torch.int32, instances 1..N (0 = background);
        type_map: (1,H,W) torch.uint8, type id 1..K of each nucleus pixel (0 = background);
        inst_types: (N+1,) numpy uint8, type per instance id; inst_probs: (N+1,) numpy float32, its confidence.
    The maps are torch tensors (MetaTensors carrying the prediction's metadata when the prediction is one) so that
    they flow through later MONAI transforms and savers like the prediction does; they live on the CPU, where
    the post-processing ran.  Output key names are parameters; a single input key is accepted since the outputs
    of several would overwrite each other.

    Args:
        target: "hv" or "boundary" (`@target`).
        min_size: instances with fewer pixels (at the model's 0.25 µm/px) are dropped.
        energy_threshold: HV edge energy under which a pixel is a marker ("hv"); lower splits more readily.
        min_nucleus_probability: instances whose mean 1 - p_background is lower are dropped (0 keeps all).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        target: str = "hv",
        softmax: bool = True,
        min_size: int = 10,
        seed_connectivity: int = 1,
        energy_threshold: float = 0.02,
        marker_min_size: int = 4,
        min_nucleus_probability: float = 0.0,
        inst_key: str = "inst_map",
        type_key: str = "type_map",
        inst_types_key: str = "inst_types",
        inst_probs_key: str = "inst_probs",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"NucleiInstancesd takes exactly one key, got {self.keys}")
        self.target = check_target(target)
        self.softmax = softmax
        self.min_size = min_size
        self.seed_connectivity = seed_connectivity
        self.energy_threshold, self.marker_min_size = energy_threshold, marker_min_size
        self.min_nucleus_probability = float(min_nucleus_probability)
        self.out_keys = (inst_key, type_key, inst_types_key, inst_probs_key)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            inst, inst_types, inst_probs = self.instances(pred)
            type_map = type_map_from_instances(inst, inst_types)
            inst_key, type_key, types_key, probs_key = self.out_keys
            d[inst_key] = _like_prediction(inst[None], pred)
            d[type_key] = _like_prediction(type_map[None], pred)
            d[types_key] = inst_types
            d[probs_key] = inst_probs
        return d

    def instances(self, pred: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inst, inst_types, inst_probs) of one prediction, by the method of its target."""
        pred = torch.as_tensor(pred.as_tensor() if isinstance(pred, MetaTensor) else pred)
        if pred.ndim != 3:
            raise ValueError(f"expected one decollated (C, H, W) prediction, got shape {tuple(pred.shape)}")
        logits, hv = split_output(pred, self.target)
        probs = _to_probabilities(logits, self.softmax)
        if hv is None:
            return instances_from_probabilities(
                probs, self.min_size, self.seed_connectivity, self.min_nucleus_probability
            )
        hv_maps = hv.detach().float().cpu().numpy()
        return instances_from_hv(
            probs, hv_maps, self.min_size, self.energy_threshold, self.marker_min_size, self.min_nucleus_probability
        )


def _like_prediction(array: np.ndarray, pred: object) -> torch.Tensor:
    """Wrap a (1,H,W) map as a tensor, keeping the prediction's metadata (affine, filename) when it has some."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if isinstance(pred, MetaTensor):
        out = MetaTensor(tensor)
        out.copy_meta_from(pred, copy_attr=True)
        return out
    return tensor
