"""Hand-computed checks of the official PanNuke score, plus cross-checks against MONAI and a brute force."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_panoptic_quality

from scripts.workflows.evaluate import pq as pm
from scripts.data.pannuke.format import NUM_TYPES, TYPE_NAMES
from scripts.data.synthetic_nuclei import prediction_like, random_types, synthetic_nuclei

EPS = pm.SQ_EPS


def blank(shape=(32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """An empty (instance map, type map) pair."""
    return np.zeros(shape, np.int32), np.zeros(shape, np.uint8)


def put(inst, types, rows, cols, inst_id, type_id=1) -> None:
    """Paint a rectangle nucleus of one id and one type."""
    inst[rows, cols] = inst_id
    types[rows, cols] = type_id


def random_tile(rng: np.random.Generator, size: int = 64, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A tile of overlapping typed nuclei (a later one may cut an earlier one in pieces) with arbitrary,
    non-contiguous ids."""
    inst = synthetic_nuclei(rng, n, size, radii=(2.0, 7.0), min_distance=0.0, margin=0.0, touching=False)
    ids = np.concatenate([[0], rng.choice(np.arange(1, 10_000), size=n, replace=False)]).astype(np.int32)
    return ids[inst], random_types(rng, inst)


def reference_pq(true: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, float]:
    """Brute force over every instance pair: (tp, fp, fn, iou_sum) with IoU > 0.5 pairing."""
    t_ids, p_ids = [i for i in np.unique(true) if i], [i for i in np.unique(pred) if i]
    pairs = []
    for t in t_ids:
        for p in p_ids:
            inter = np.sum((true == t) & (pred == p))
            iou = inter / np.sum((true == t) | (pred == p))
            if iou > 0.5:
                pairs.append(iou)
    return len(pairs), len(p_ids) - len(pairs), len(t_ids) - len(pairs), float(sum(pairs))


def reference_aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Brute-force AJI: each GT takes its first best-IoU prediction; unused predictions join the union."""
    t_ids, p_ids = [i for i in np.unique(true) if i], [i for i in np.unique(pred) if i]
    inter_total, union_total, used = 0, 0, set()
    for t in t_ids:
        ious = [np.sum((true == t) & (pred == p)) / (np.sum((true == t) | (pred == p)) + pm.AJI_EPS) for p in p_ids]
        if not ious or max(ious) == 0:
            union_total += np.sum(true == t)
            continue
        best = p_ids[int(np.argmax(ious))]
        used.add(best)
        inter_total += np.sum((true == t) & (pred == best))
        union_total += np.sum((true == t) | (pred == best))
    union_total += sum(np.sum(pred == p) for p in p_ids if p not in used)
    return inter_total / union_total


def assert_rows_equal(a: dict, b: dict) -> None:
    """Rows equal key by key, NaN equal to NaN."""
    assert a.keys() == b.keys()
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == pytest.approx(b[key], abs=1e-12), key


def test_both_empty_is_nan_everywhere():
    inst, types = blank()
    row = pm.score_image(inst, types, inst, types)
    assert set(row) == set(pm.ROW_KEYS)
    assert all(math.isnan(v) for v in row.values())
    dq, sq, pq, tp, fp, fn, iou_sum = pm.pq_counts(inst, inst)
    assert math.isnan(pq) and (tp, fp, fn, iou_sum) == (0, 0, 0, 0.0)


def test_empty_gt_with_predictions_is_skipped_by_pq_but_not_by_dice_and_aji():
    inst, types = blank()
    pred, ptypes = blank()
    put(pred, ptypes, slice(2, 6), slice(2, 6), 4, type_id=2)
    row = pm.score_image(inst, types, pred, ptypes)
    # official run.py: no GT nuclei -> bPQ and every class PQ are NaN, so false positives here cost nothing
    assert math.isnan(row["bPQ"]) and math.isnan(row["mPQ"]) and math.isnan(row["PQ_Inflammatory"])
    assert row["Dice"] == 0.0 and row["AJI"] == 0.0
    dq, sq, pq, tp, fp, fn, _ = pm.pq_counts(inst, pred)
    assert (dq, pq, tp, fp, fn) == (0.0, 0.0, 0, 1, 0)


def test_empty_prediction_scores_zero():
    inst, types = blank()
    put(inst, types, slice(2, 6), slice(2, 6), 1, type_id=3)
    pred, ptypes = blank()
    row = pm.score_image(inst, types, pred, ptypes)
    assert row["bPQ"] == 0.0 and row["PQ_Connective"] == 0.0 and row["mPQ"] == 0.0
    assert row["Dice"] == 0.0 and row["AJI"] == 0.0
    assert math.isnan(row["PQ_Neoplastic"])


def test_one_pixel_nuclei():
    inst, types = blank()
    put(inst, types, 2, 2, 7)
    put(inst, types, 10, 10, 8)
    pred, ptypes = blank()
    put(pred, ptypes, 2, 2, 3)  # same pixel: IoU 1
    put(pred, ptypes, 10, 11, 5)  # neighbour pixel: IoU 0
    dq, sq, pq, tp, fp, fn, iou_sum = pm.pq_counts(inst, pred)
    assert (tp, fp, fn, iou_sum) == (1, 1, 1, 1.0)
    assert dq == 0.5 and sq == pytest.approx(1 / (1 + EPS), abs=0) and pq == 0.5 * sq
    assert pm.aji(inst, pred) == pytest.approx(1 / 3)  # one pixel paired; lone GT 8 and pred 5 join the union
    assert pm.binary_dice(inst, pred) == 0.5


def test_class_predicted_but_absent_from_gt_is_nan_not_zero():
    inst, types = blank()
    put(inst, types, slice(0, 5), slice(0, 5), 1, type_id=1)
    pred, ptypes = blank()
    put(pred, ptypes, slice(0, 5), slice(0, 5), 1, type_id=1)
    put(pred, ptypes, slice(10, 15), slice(10, 15), 2, type_id=4)  # a Dead nucleus the GT does not have
    row = pm.score_image(inst, types, pred, ptypes)
    assert math.isnan(row["PQ_Dead"])
    assert row["PQ_Neoplastic"] == pytest.approx(1.0, abs=1e-5)
    assert row["mPQ"] == row["PQ_Neoplastic"]  # nanmean over the one class present
    assert row["bPQ"] == pytest.approx(2 / 3 * 1 / (1 + EPS), abs=1e-12)  # 1 TP, 1 FP


def test_perfect_prediction_with_relabelled_ids():
    inst, types = blank((40, 40))
    for k in range(NUM_TYPES):
        put(inst, types, slice(k * 8, k * 8 + 6), slice(2, 9), 10 + k, type_id=k + 1)
        put(inst, types, slice(k * 8, k * 8 + 6), slice(20, 30), 100 + k, type_id=k + 1)
    pred = np.where(inst > 0, inst * 7 + 3, 0)
    row = pm.score_image(inst, types, pred, types.copy())
    for key in ("bPQ", "bDQ", "bSQ", "mPQ", "Dice", "AJI", *pm.CLASS_KEYS):
        assert row[key] == pytest.approx(1.0, abs=1e-5), key
    assert row["bPQ"] == pytest.approx(10 / (10 + EPS), abs=1e-12)  # the official epsilon, 10 nuclei


@pytest.mark.parametrize(
    ("width", "shift", "iou", "matched"),
    [(20, 5, 0.6, True), (14, 6, 0.4, False), (15, 5, 0.5, False)],  # IoU = (w - s) / (w + s); 0.5 is not > 0.5
)
def test_shifted_instance_with_known_iou(width, shift, iou, matched):
    inst, types = blank((12, 40))
    put(inst, types, slice(0, 10), slice(0, width), 1)
    pred, ptypes = blank((12, 40))
    put(pred, ptypes, slice(0, 10), slice(shift, shift + width), 9)
    dq, sq, pq, tp, fp, fn, iou_sum = pm.pq_counts(inst, pred)
    if matched:
        assert (tp, fp, fn) == (1, 0, 0) and iou_sum == pytest.approx(iou)
        assert sq == pytest.approx(iou / (1 + EPS), abs=1e-12) and pq == sq
    else:
        assert (tp, fp, fn, pq) == (0, 1, 1, 0.0)
    assert pm.aji(inst, pred) == pytest.approx(iou)  # in AJI any overlap pairs
    assert pm.binary_dice(inst, pred) == pytest.approx((width - shift) / width)


def test_split_instance():
    inst, types = blank((12, 24))
    put(inst, types, slice(0, 10), slice(0, 20), 1)  # 200 px
    pred, ptypes = blank((12, 24))
    put(pred, ptypes, slice(0, 10), slice(0, 14), 1)  # 140 px: IoU 0.7
    put(pred, ptypes, slice(0, 10), slice(14, 20), 2)  # 60 px: IoU 0.3
    dq, sq, pq, tp, fp, fn, _ = pm.pq_counts(inst, pred)
    assert (tp, fp, fn) == (1, 1, 0)
    assert pq == pytest.approx(2 / 3 * 0.7 / (1 + EPS), abs=1e-12)
    assert pm.aji(inst, pred) == pytest.approx(140 / 260)  # the unused 60 px piece joins the union
    assert pm.score_image(inst, types, pred, ptypes)["bPQ"] == pytest.approx(pq, abs=1e-12)


def test_merged_instances():
    inst, types = blank((12, 24))
    put(inst, types, slice(0, 10), slice(0, 14), 1)  # 140 px
    put(inst, types, slice(0, 10), slice(14, 20), 2)  # 60 px
    pred, ptypes = blank((12, 24))
    put(pred, ptypes, slice(0, 10), slice(0, 20), 5)  # one 200 px blob
    dq, sq, pq, tp, fp, fn, _ = pm.pq_counts(inst, pred)
    assert (tp, fp, fn) == (1, 0, 1)
    assert pq == pytest.approx(2 / 3 * 0.7 / (1 + EPS), abs=1e-12)
    # both GT take the blob (AJI pairs one-to-many): inter 140 + 60, union 200 + 200
    assert pm.aji(inst, pred) == pytest.approx(0.5)


def test_split_into_halves_matches_nothing():
    inst, types = blank((12, 24))
    put(inst, types, slice(0, 10), slice(0, 20), 1)
    pred, ptypes = blank((12, 24))
    put(pred, ptypes, slice(0, 10), slice(0, 10), 1)
    put(pred, ptypes, slice(0, 10), slice(10, 20), 2)
    assert pm.pq_counts(inst, pred)[3:6] == (0, 2, 1)  # both halves have IoU exactly 0.5


def test_non_contiguous_ids_and_no_background():
    inst = np.array([[5, 5, 70_000, 70_000], [5, 5, 70_000, 70_000]], np.int64)
    same = np.array([[1, 1, 2, 2], [1, 1, 2, 2]], np.int64)
    assert pm.pq_counts(inst, same)[3:6] == (2, 0, 0)  # no 0 anywhere: both instances still count
    rng = np.random.default_rng(3)
    true, _ = random_tile(rng)
    pred, _ = prediction_like(rng, true, np.ones_like(true, np.uint8))
    remap = {v: i for i, v in enumerate(np.unique(pred))}
    contiguous = np.vectorize(remap.get)(pred)
    assert pm.pq_counts(true, pred) == pm.pq_counts(true, contiguous)


def test_type_maps_select_class_instances():
    inst, types = blank((20, 20))
    put(inst, types, slice(0, 5), slice(0, 5), 1, type_id=2)
    put(inst, types, slice(10, 15), slice(10, 15), 2, type_id=5)
    pred, ptypes = inst.copy(), types.copy()
    ptypes[10:15, 10:15] = 3  # right shape, wrong type
    row = pm.score_image(inst, types, pred, ptypes)
    assert row["PQ_Inflammatory"] == pytest.approx(1.0, abs=1e-5)
    assert row["PQ_Epithelial"] == 0.0 and math.isnan(row["PQ_Connective"])
    assert row["mPQ"] == pytest.approx(0.5, abs=1e-5) and row["bPQ"] == pytest.approx(1.0, abs=1e-5)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        pm.pq_counts(np.zeros((4, 4), int), np.zeros((4, 5), int))
    inst, types = blank((4, 4))
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        pm.score_image(inst, types, inst, np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="ids must be >= 0"):
        pm.aji(inst - 1, inst)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_and_monai_per_image(seed):
    rng = np.random.default_rng(seed)
    true, types = random_tile(rng, n=int(rng.integers(6, 16)))
    pred, _ = prediction_like(rng, true, types)
    dq, sq, pq, tp, fp, fn, iou_sum = pm.pq_counts(true, pred)
    ref_tp, ref_fp, ref_fn, ref_sum = reference_pq(true, pred)
    assert (tp, fp, fn) == (ref_tp, ref_fp, ref_fn) and iou_sum == pytest.approx(ref_sum, abs=1e-12)
    assert pm.aji(true, pred) == pytest.approx(reference_aji(true, pred), abs=1e-12)
    # MONAI's per-image function: same pairing; its PQ is iou_sum / (tp + fp/2 + fn/2 + 1e-6)
    conf = compute_panoptic_quality(torch.as_tensor(pred), torch.as_tensor(true), output_confusion_matrix=True)
    assert conf[:3].tolist() == [tp, fp, fn]
    monai_pq = compute_panoptic_quality(torch.as_tensor(pred), torch.as_tensor(true)).item()
    assert pq == pytest.approx(monai_pq, abs=1e-5)
    assert pq > 0.1  # the perturbation keeps most nuclei matched, so the comparison is not 0 == 0


def test_sparse_and_dense_pair_counting_agree(monkeypatch):
    rng = np.random.default_rng(11)
    true, types = random_tile(rng)
    pred, ptypes = prediction_like(rng, true, types)
    dense = pm.score_image(true, types, pred, ptypes)
    monkeypatch.setattr(pm, "_DENSE_PAIRS_MAX", 0)
    assert_rows_equal(pm.score_image(true, types, pred, ptypes), dense)
    # thousands of one-pixel nuclei take the sparse path by default too
    rr, cc = np.mgrid[:64, :64]
    many = np.where((rr + cc) % 2 == 0, rr * 64 + cc + 1, 0)  # 2048 one-pixel nuclei on a checkerboard
    monkeypatch.undo()
    assert pm.pq_counts(many, many * 2)[3:6] == (2048, 0, 0)
    assert pm.pq_counts(many, np.roll(many, 1, axis=1))[3:6] == (0, 2048, 2048)


def make_row(b_pq: float, **class_pq: float) -> dict[str, float]:
    """A score row with the given bPQ and class PQs (others NaN), other binary scores set to bPQ."""
    row = {key: b_pq for key in pm.BINARY_KEYS}
    row.update({f"PQ_{name}": class_pq.get(name, math.nan) for name in TYPE_NAMES})
    row["mPQ"] = pm._nanmean([row[key] for key in pm.CLASS_KEYS])
    return row


def test_aggregation_follows_official_order():
    rows = [
        make_row(1.0, Neoplastic=1.0, Inflammatory=0.0),  # mPQ 0.5
        make_row(0.5, Neoplastic=1.0),  # mPQ 1.0
        make_row(math.nan),  # empty GT: skipped everywhere
        make_row(0.0, Neoplastic=0.0),  # mPQ 0.0
    ]
    agg = pm.aggregate_scores(rows, ["Colon", "Colon", "Colon", "Breast"])
    colon, breast = agg["per_tissue"]["Colon"], agg["per_tissue"]["Breast"]
    assert colon["n_images"] == 3 and colon["bPQ"] == 0.75 and colon["mPQ"] == 0.75
    assert breast["bPQ"] == 0.0 and breast["mPQ"] == 0.0
    # mean over tissues, not images: the image mean would give bPQ 0.5 and mPQ 0.5
    assert agg["overall"]["bPQ"] == 0.375 and agg["overall"]["mPQ"] == 0.375
    # per class: over all images, not tissues (per tissue first would give Neoplastic 0.5)
    assert agg["per_class"]["Neoplastic"] == pytest.approx(2 / 3)
    assert agg["overall"]["PQ_Neoplastic"] == agg["per_class"]["Neoplastic"]
    assert agg["per_class"]["Inflammatory"] == 0.0 and math.isnan(agg["per_class"]["Dead"])
    assert list(agg["per_tissue"]) == ["Breast", "Colon"]


def test_aggregation_skips_a_tissue_with_no_gt_nuclei():
    agg = pm.aggregate_scores([make_row(math.nan), make_row(0.8, Dead=0.8)], ["Testis", "Liver"])
    assert math.isnan(agg["per_tissue"]["Testis"]["bPQ"]) and agg["overall"]["bPQ"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="one tissue per row"):
        pm.aggregate_scores([make_row(1.0)], ["Liver", "Liver"])


def fold(n: int, seed: int = 0):
    """n random (true_inst, true_type, pred_inst, pred_type) images as four lists, one image with an empty GT."""
    rng = np.random.default_rng(seed)
    maps = [[], [], [], []]
    for i in range(n):
        true, types = random_tile(rng, size=48, n=8) if i else blank((48, 48))
        pred, ptypes = prediction_like(rng, true, types)
        for store, item in zip(maps, (true, types, pred, ptypes), strict=True):
            store.append(item)
    return maps


@pytest.mark.parametrize("fork", [True, False])
def test_parallel_rows_equal_serial_rows(monkeypatch, fork):
    maps = fold(10)
    serial = pm.score_images(*maps, workers=1)
    monkeypatch.setattr(pm, "_FORK_OK", fork and pm._FORK_OK)  # False: maps pickled to the workers
    parallel = pm.score_images(*maps, workers=2, chunk_size=3)
    assert len(serial) == len(parallel) == 10
    for a, b in zip(serial, parallel, strict=True):
        assert_rows_equal(a, b)
    assert_rows_equal(serial[4], pm.score_image(*(m[4] for m in maps)))
    with pytest.raises(ValueError, match="as many of each map"):
        pm.score_images(maps[0], maps[1], maps[2], maps[3][:-1])


def test_tables_written_atomically_and_readable(tmp_path):
    maps = fold(6, seed=5)
    rows = pm.score_images(*maps, workers=1)
    tissues = ["Lung", "Lung", "Skin", "Skin", "Skin", "Kidney"]
    agg = pm.write_score_tables(rows, tissues, tmp_path)
    with open(tmp_path / pm.PER_IMAGE_CSV, newline="") as handle:
        image_rows = list(csv.DictReader(handle))
    assert [r["tissue"] for r in image_rows] == tissues
    assert float(image_rows[3]["bPQ"]) == pytest.approx(rows[3]["bPQ"], abs=1e-12)
    assert math.isnan(float(image_rows[0]["bPQ"]))  # image 0 has an empty GT
    with open(tmp_path / pm.PER_TISSUE_CSV, newline="") as handle:
        tissue_rows = {r["tissue"]: r for r in csv.DictReader(handle)}
    assert int(tissue_rows["Skin"]["n_images"]) == 3
    assert float(tissue_rows["Skin"]["mPQ"]) == pytest.approx(agg["per_tissue"]["Skin"]["mPQ"], abs=1e-12)
    saved = json.loads((tmp_path / pm.SCORES_JSON).read_text())
    assert saved["overall"]["bPQ"] == pytest.approx(agg["overall"]["bPQ"], abs=1e-12)
    assert set(saved) == {"overall", "per_tissue", "per_class"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([pm.PER_IMAGE_CSV, pm.PER_TISSUE_CSV, pm.SCORES_JSON])
    # bad input: refused before anything is replaced
    before = (tmp_path / pm.SCORES_JSON).read_text()
    with pytest.raises(ValueError):
        pm.write_score_tables(rows[:2], tissues, tmp_path)
    assert (tmp_path / pm.SCORES_JSON).read_text() == before
    summary = pm.format_summary(agg)
    assert "Skin" in summary and f"{agg['overall']['bPQ']:.4f}" in summary and "Neoplastic" in summary


# ---------------------------------------------------------------- overlapping PanNuke channels


def _overlapping_masks() -> np.ndarray:
    """A Neoplastic nucleus and an Inflammatory one that share a 5x5 corner in PanNuke's raw channels."""
    masks = np.zeros((64, 64, 6))
    masks[10:21, 10:21, 0] = 5
    masks[16:27, 16:27, 1] = 7
    masks[..., 5] = (masks[..., :5].sum(-1) == 0).astype(float)
    return masks


def test_classes_are_scored_on_their_own_raw_channel_like_the_official_code():
    from scripts.data.pannuke.cache import masks_to_instances

    masks = _overlapping_masks()
    true_inst, true_type = masks_to_instances(masks)  # the later channel takes the shared corner
    pred_inst = np.zeros((64, 64), np.int32)
    pred_inst[10:21, 10:21] = 1  # the Neoplastic nucleus exactly as annotated in its channel
    pred_inst[16:27, 16:27][pred_inst[16:27, 16:27] == 0] = 2
    pred_type = np.where(pred_inst == 1, 1, np.where(pred_inst == 2, 2, 0))
    merged = pm.score_image(true_inst, true_type, pred_inst, pred_type)
    raw = pm.score_image(true_inst, true_type, pred_inst, pred_type, true_channels=masks[..., :5])
    # official: channel 0 holds the whole 11x11 nucleus, which the prediction matches exactly
    assert raw["PQ_Neoplastic"] == pytest.approx(1.0)
    assert merged["PQ_Neoplastic"] == pytest.approx(96 / 121)  # the merged map lost the shared corner
    assert raw["bPQ"] == merged["bPQ"]  # binary scores do not depend on the channels
