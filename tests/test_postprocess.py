"""Post-processing: from the network's output (7-class probabilities, or 6 classes + HV maps) to typed nuclei."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from skimage.draw import ellipse

from scripts.data.pannuke.format import BACKGROUND, BOUNDARY, NUM_CLASSES, NUM_TYPES
from scripts.data.synthetic_nuclei import random_types, synthetic_nuclei
from scripts.workflows.evaluate.pq import pq_counts
from scripts.model.postprocess import (
    NucleiInstancesd,
    hv_energy,
    instances_from_hv,
    instances_from_probabilities,
    type_map_from_instances,
)
from scripts.model.targets import hover_maps, label_map


def one_hot_probs(inst: np.ndarray, types: np.ndarray) -> np.ndarray:
    """Ideal network output for a GT instance map: the training target's classes as one-hot probabilities."""
    return np.eye(NUM_CLASSES, dtype=np.float32)[label_map(inst, types)].transpose(2, 0, 1)


def touching_ellipses(seed: int, count: int = 20, size: int = 96) -> np.ndarray:
    """GT-like instance map of touching, convex nuclei (the project's one synthetic-nuclei generator)."""
    return synthetic_nuclei(np.random.default_rng(seed), count, size)


def touching_pairs(inst: np.ndarray) -> int:
    """Number of distinct pairs of instances sharing an edge, to check the fixture really has touching nuclei."""
    pairs = set()
    for a, b in ((inst[:, :-1], inst[:, 1:]), (inst[:-1], inst[1:])):
        edge = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[edge].tolist(), b[edge].tolist(), strict=True)}
    return len(pairs)


def soft_probs(classes: dict[int, float], shape: tuple[int, int]) -> np.ndarray:
    """Probability map with the same class distribution at every pixel (rest on background)."""
    probs = np.zeros((NUM_CLASSES, *shape), dtype=np.float32)
    for cls, p in classes.items():
        probs[cls] = p
    probs[BACKGROUND] = 1.0 - probs.sum(axis=0) + probs[BACKGROUND]
    return probs


def test_two_touching_nuclei_split_by_boundary():
    inst = np.zeros((20, 30), dtype=np.int32)
    inst[4:16, 3:15] = 1
    inst[4:16, 15:27] = 2  # shares an edge with nucleus 1: only the boundary class separates them
    types = np.array([0, 1, 3])[inst]
    out, inst_types, _ = instances_from_probabilities(one_hot_probs(inst, types))
    assert out.max() == 2
    assert {tuple(np.unique(out[inst == i])) for i in (1, 2)} == {(1,), (2,)}
    assert sorted(inst_types[1:].tolist()) == [1, 3]


def test_single_nucleus_type_and_confidence():
    inst = np.zeros((24, 24), dtype=np.int32)
    rr, cc = ellipse(12, 12, 7, 5)
    inst[rr, cc] = 1
    out, inst_types, inst_probs = instances_from_probabilities(one_hot_probs(inst, 5 * inst))
    np.testing.assert_array_equal(out, inst)
    assert out.dtype == np.int32 and inst_types.dtype == np.uint8 and inst_probs.dtype == np.float32
    assert inst_types.tolist() == [0, 5]
    assert inst_probs[1] == pytest.approx(1.0)


def test_tiny_nucleus_without_interior_is_an_instance():
    probs = soft_probs({}, (10, 10))
    probs[:, 4:6, 4:7] = soft_probs({BOUNDARY: 0.6, 4: 0.3}, (2, 3))  # every pixel is boundary, none interior
    out, inst_types, inst_probs = instances_from_probabilities(probs, min_size=1)
    assert out.max() == 1 and (out == 1).sum() == 6
    assert inst_types[1] == 4  # the type still comes from the residual type probability
    assert inst_probs[1] == pytest.approx(1.0)


def test_type_is_a_majority_vote_over_the_instance():
    inst = np.zeros((20, 20), dtype=np.int32)
    inst[5:15, 5:15] = 1
    types = 2 * inst
    types[5:15, 12:15] = 4  # 30% of the nucleus says type 4, 70% says type 2
    probs = one_hot_probs(inst, types)
    probs[2:6, inst > 0] = probs[2:6, inst > 0] * 0.8 + 0.1  # soften, as a network would
    probs /= probs.sum(axis=0, keepdims=True)
    out, inst_types, inst_probs = instances_from_probabilities(probs)
    assert out.max() == 1  # a change of type inside a nucleus must not split it
    assert inst_types[1] == 2
    assert 0.5 < inst_probs[1] < 0.8


def test_foreground_follows_the_seven_class_argmax():
    # background 0.3 beats each type (0.175) though the summed interior is 0.7: a DiceCE-trained network spreads
    # mass like this around nuclei, so the argmax (as in the validation Dice) calls it background
    probs = soft_probs({1: 0.175, 2: 0.175, 3: 0.175, 5: 0.175}, (12, 12))
    out, inst_types, _ = instances_from_probabilities(probs)
    assert not out.any() and inst_types.tolist() == [0]


def test_uncertain_type_still_seeds():
    # the boundary class wins the argmax (0.3), but the two types together (0.45) beat it: a seeded nucleus
    probs = soft_probs({2: 0.225, 4: 0.225, BOUNDARY: 0.3}, (12, 12))
    out, inst_types, _ = instances_from_probabilities(probs)
    assert out.max() == 1 and (out == 1).all()
    assert inst_types[1] in (2, 4)


def test_empty_prediction_has_no_instances():
    out, inst_types, inst_probs = instances_from_probabilities(soft_probs({BOUNDARY: 0.2, 1: 0.3}, (32, 32)))
    assert out.shape == (32, 32) and not out.any()
    assert inst_types.tolist() == [0] and inst_probs.tolist() == [0.0]


def test_small_instances_are_dropped_and_ids_stay_contiguous():
    inst = np.zeros((30, 30), dtype=np.int32)
    inst[2:5, 2:5] = 1  # 9 pixels: under min_size
    inst[10:20, 10:20] = 2
    inst[22:28, 2:8] = 3
    out, inst_types, _ = instances_from_probabilities(one_hot_probs(inst, 3 * (inst > 0)), min_size=10)
    assert not out[inst == 1].any()
    assert sorted(np.unique(out).tolist()) == [0, 1, 2]
    assert inst_types.shape == (3,)
    keep_all, _, _ = instances_from_probabilities(one_hot_probs(inst, 3 * (inst > 0)), min_size=9)
    assert keep_all.max() == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_recovers_touching_ellipses(seed):
    inst = touching_ellipses(seed)
    assert inst.max() == 20 and touching_pairs(inst) >= 5
    types = random_types(np.random.default_rng(seed), inst)
    out, inst_types, _ = instances_from_probabilities(one_hot_probs(inst, types), min_size=10)
    gt_ids = [i for i in range(1, inst.max() + 1) if (inst == i).sum() >= 10]
    assert out.max() == len(gt_ids)
    for i in gt_ids:
        gt = inst == i
        match = np.bincount(out[gt]).argmax()
        iou = (gt & (out == match)).sum() / (gt | (out == match)).sum()
        assert match > 0 and iou > 0.9, f"GT nucleus {i}: IoU {iou:.2f}"
        assert inst_types[match] == types[gt][0]
    np.testing.assert_array_equal(type_map_from_instances(out, inst_types) > 0, out > 0)


def test_type_map_paints_instances():
    inst = np.array([[0, 1, 1], [2, 2, 0]], dtype=np.int32)
    np.testing.assert_array_equal(type_map_from_instances(inst, np.array([0, 4, 1])), [[0, 4, 4], [1, 1, 0]])
    with pytest.raises(ValueError):
        type_map_from_instances(inst, np.array([0, 4]))


def test_transform_on_torch_logits():
    inst = touching_ellipses(3, count=8, size=64)
    probs = one_hot_probs(inst, 2 * (inst > 0))
    logits = MetaTensor(torch.from_numpy(8.0 * probs), meta={"filename_or_obj": "tile_7.png"})
    out = NucleiInstancesd(keys="pred", target="boundary")({"pred": logits, "label": "kept"})
    assert out["label"] == "kept" and out["pred"] is logits
    assert out["inst_map"].shape == (1, 64, 64) and out["inst_map"].dtype == torch.int32
    assert out["type_map"].shape == (1, 64, 64) and out["type_map"].dtype == torch.uint8
    assert out["inst_map"].meta["filename_or_obj"] == "tile_7.png"
    direct, inst_types, _ = instances_from_probabilities(probs)
    np.testing.assert_array_equal(out["inst_map"][0].numpy(), direct)
    assert out["inst_types"].tolist() == inst_types.tolist() and set(inst_types[1:].tolist()) == {2}
    np.testing.assert_array_equal(out["type_map"][0].numpy(), 2 * (direct > 0))
    on_numpy = NucleiInstancesd(keys="pred", target="boundary", softmax=False)({"pred": probs})
    np.testing.assert_array_equal(on_numpy["inst_map"].numpy(), out["inst_map"].numpy())


@pytest.mark.parametrize("shape", [(2, 16, 16), (1, 7, 16, 16), (16, 16)])
def test_wrong_shapes_raise(shape):
    with pytest.raises(ValueError, match="expected"):
        instances_from_probabilities(np.zeros(shape, dtype=np.float32))
    with pytest.raises(ValueError, match="expected|channels"):
        NucleiInstancesd(keys="pred", target="boundary")({"pred": torch.zeros(shape)})


def test_a_prediction_for_the_other_target_names_the_fix():
    with pytest.raises(ValueError, match="--target"):
        NucleiInstancesd(keys="pred", target="hv")({"pred": torch.zeros(3, 16, 16)})


def test_transform_takes_one_key():
    with pytest.raises(ValueError, match="one key"):
        NucleiInstancesd(keys=["pred", "other"])


def test_transform_from_bundle_config():
    from monai.bundle import ConfigParser

    config = {
        "post": {
            "_target_": "scripts.model.postprocess.NucleiInstancesd",
            "keys": "pred",
            "target": "boundary",
            "min_size": 5,
        }
    }
    transform = ConfigParser(config).get_parsed_content("post")
    probs = soft_probs({}, (16, 16))
    probs[:, 4:10, 4:10] = soft_probs({3: 0.9}, (6, 6))
    out = transform({"pred": torch.from_numpy(np.log(probs))})
    assert out["inst_map"].sum() == 36 and out["inst_types"].tolist() == [0, 3]


def test_foreground_made_only_of_specks_gives_no_instances():
    # every candidate is under min_size: the type vote runs on no pixel at all and must not crash
    probs = soft_probs({}, (50, 50))
    probs[0, 10:12, 10:12] = 0
    probs[1, 10:12, 10:12] = 1
    out, inst_types, inst_probs = instances_from_probabilities(probs)
    assert not out.any() and inst_types.tolist() == [0] and inst_probs.tolist() == [0.0]


# ---- the "hv" target: 6-class softmax + horizontal/vertical maps ----


def hv_outputs(inst: np.ndarray, types: np.ndarray, noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ideal (6,H,W) probabilities and (2,H,W) HV maps for a GT instance map, the maps with Gaussian noise."""
    one_hot = np.eye(NUM_TYPES + 1, dtype=np.float32)[np.asarray(types, dtype=np.int64)].transpose(2, 0, 1)
    probs = one_hot * 0.8 + 0.2 / (NUM_TYPES + 1)
    hv = hover_maps(torch.from_numpy(inst.astype(np.int64))[None])[0].numpy()
    return probs, (hv + np.random.default_rng(seed).normal(0.0, noise, hv.shape)).astype(np.float32)


def matched_iou(inst: np.ndarray, out: np.ndarray, i: int) -> tuple[int, float]:
    gt = inst == i
    match = np.bincount(out[gt]).argmax()
    return match, (gt & (out == match)).sum() / (gt | (out == match)).sum()


def test_hv_energy_is_high_between_touching_nuclei_and_low_inside():
    inst = np.zeros((20, 30), dtype=np.int64)
    inst[4:16, 3:15] = 1
    inst[4:16, 15:27] = 2
    _, hv = hv_outputs(inst, inst > 0)
    energy = hv_energy(hv)
    assert energy[10, 14:16].min() > 0.5  # the +1 -> -1 jump at the shared edge
    assert energy[6:14, 5:12].max() < 0.2 and energy[6:14, 18:25].max() < 0.2  # interiors rise slowly


def test_hv_splits_two_touching_nuclei_of_one_type():
    inst = np.zeros((20, 30), dtype=np.int64)
    inst[4:16, 3:15] = 1
    inst[4:16, 15:27] = 2  # same type: only the HV maps can tell them apart
    out, inst_types, _ = instances_from_hv(*hv_outputs(inst, 3 * (inst > 0)))
    assert out.max() == 2 and inst_types[1:].tolist() == [3, 3]
    assert {tuple(np.unique(out[inst == i])) for i in (1, 2)} == {(1,), (2,)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hv_round_trip_recovers_touching_ellipses_with_noisy_maps(seed):
    inst = touching_ellipses(seed)
    types = random_types(np.random.default_rng(seed), inst)
    out, inst_types, _ = instances_from_hv(*hv_outputs(inst, types, noise=0.1, seed=seed))
    gt_ids = [i for i in range(1, inst.max() + 1) if (inst == i).sum() >= 10]
    ious = [matched_iou(inst, out, i)[1] for i in gt_ids]
    assert np.mean(np.array(ious) > 0.5) >= 0.95 and np.median(ious) > 0.85
    for i in gt_ids:
        match, iou = matched_iou(inst, out, i)
        if iou > 0.5:
            assert inst_types[match] == types[inst == i][0]


def test_hv_agrees_with_monai_hovernet_post_processing_on_the_same_outputs():
    """MONAI's marker-controlled watershed (21x21 Sobel, min-max scaling) is the reference; ours must find the same
    nuclei on the same outputs (PQ of one against the other), and both must find the ground truth."""
    from monai.apps.pathology.transforms.post.array import HoVerNetInstanceMapPostProcessing

    reference = HoVerNetInstanceMapPostProcessing(sobel_kernel_size=21, marker_threshold=0.4, marker_radius=2)
    for seed in (0, 1):
        inst = touching_ellipses(seed, count=40, size=160)
        probs, hv = hv_outputs(inst, 2 * (inst > 0), noise=0.1, seed=seed)
        ours, _, _ = instances_from_hv(probs, hv)
        background = probs[0]
        nuclear = torch.from_numpy(np.log(np.stack([background, 1.0 - background])))
        theirs = np.asarray(reference(nuclear, torch.from_numpy(hv))[1])[0]
        assert pq_counts(inst, theirs)[2] > 0.9
        assert pq_counts(inst, ours)[2] > 0.9
        assert pq_counts(theirs, ours)[2] > 0.9


def test_hv_empty_and_wrong_inputs():
    probs, hv = hv_outputs(np.zeros((16, 16), np.int64), np.zeros((16, 16), np.int64))
    out, inst_types, inst_probs = instances_from_hv(probs, hv)
    assert not out.any() and inst_types.tolist() == [0] and inst_probs.tolist() == [0.0]
    with pytest.raises(ValueError, match="HV maps"):
        instances_from_hv(probs, hv[:1])
    with pytest.raises(ValueError, match="same pixels"):
        instances_from_hv(probs, hv[:, :8])


def test_transform_on_hv_logits_keeps_metadata_and_matches_the_function():
    inst = touching_ellipses(3, count=8, size=64)
    probs, hv = hv_outputs(inst, 4 * (inst > 0))
    pred = MetaTensor(torch.from_numpy(np.concatenate([np.log(probs), hv])), meta={"filename_or_obj": "t.png"})
    out = NucleiInstancesd(keys="pred", target="hv")({"pred": pred})
    assert out["inst_map"].meta["filename_or_obj"] == "t.png"
    direct, inst_types, _ = instances_from_hv(probs, hv)
    np.testing.assert_array_equal(out["inst_map"][0].numpy(), direct)
    assert set(out["inst_types"][1:].tolist()) == {4}


def test_unsure_nuclei_are_dropped_by_their_mean_nucleus_probability():
    """Two nuclei in HV output: one the network is sure of (p_background 0.05), one it half-believes (0.4); the
    threshold drops the second only, for both targets, and the ids stay contiguous."""
    inst = np.zeros((64, 64), np.int32)
    inst[10:22, 10:22], inst[40:52, 40:52] = 1, 2
    hv = hover_maps(torch.from_numpy(inst)[None]).numpy()[0]
    probs = np.zeros((NUM_TYPES + 1, 64, 64), np.float32)
    probs[0] = 1.0
    for ident, background in ((1, 0.05), (2, 0.4)):
        probs[0][inst == ident] = background
        probs[1][inst == ident] = 1.0 - background
    kept, _, _ = instances_from_hv(probs, hv, min_nucleus_probability=0.7)
    assert kept.max() == 1 and (kept == 1).sum() == 144 and kept[45, 45] == 0
    both, _, _ = instances_from_hv(probs, hv, min_nucleus_probability=0.0)
    assert both.max() == 2
    boundary = np.concatenate([probs, np.zeros((1, 64, 64), np.float32)])
    kept, _, _ = instances_from_probabilities(boundary, min_nucleus_probability=0.7)
    assert kept.max() == 1 and kept[15, 15] == 1
