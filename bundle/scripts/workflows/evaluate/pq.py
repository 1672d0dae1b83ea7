"""The official PanNuke score (bPQ, mPQ, per-class PQ) plus binary DQ, SQ, Dice and AJI, per image and per fold.

The protocol follows TissueImageAnalytics/PanNuke-metrics `run.py` + `utils.get_fast_pq`, which the PanNuke paper
and most later work report:

* PQ of one image: GT and predicted instances pair when IoU > 0.5 (strictly; such pairs are unique), then
  DQ = TP / (TP + FP/2 + FN/2), SQ = sum of paired IoU / (TP + 1e-6) and PQ = DQ * SQ.  The 1e-6 is the official
  one, so a perfect prediction of n nuclei scores n / (n + 1e-6), not exactly 1.
* bPQ: all nuclei as one class.  PQ_<type>: only that type's instances.  A score whose GT has no nuclei (of that
  type) is NaN and skipped, whatever was predicted: false positives on an empty GT are never penalised.
* mPQ of an image = nanmean of its five PQ_<type>; per tissue, nanmean over its images of mPQ and of bPQ; the
  fold's mPQ and bPQ = nanmean over tissues.  The fold's PQ_<type> = nanmean over all images, not over tissues.

Dice (pixel foreground) and AJI (HoVer-Net `get_fast_aji`, one-to-many pairing) are not part of the official script;
they use their standard per-image definitions (0 when the GT is empty but the prediction is not, NaN when both are)
and are aggregated like bPQ.  MONAI's PanopticQualityMetric pools TP/FP/FN over a batch, which is a different
number; `monai.metrics.compute_panoptic_quality` on one image agrees with `pq_counts` (to ~1e-6).

Images are given as this bundle represents nuclei: an instance map (0 = background, any other ids) and a pixel type
map (1..NUM_TYPES).  A type's instance map is the instance map restricted to pixels of that type, so post-processing
should give each instance a single type.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from scripts.core.atomic import csv_text, json_text, write_text
from scripts.data.pannuke.format import TYPE_NAMES

MATCH_IOU = 0.5
# official get_fast_pq divides the IoU sum by (tp + 1e-6); kept so our numbers equal the published script's
SQ_EPS = 1.0e-6
# HoVer-Net get_fast_aji picks each GT's partner by inter / (union + 1e-6); kept so ties resolve the same way
AJI_EPS = 1.0e-6
# dense pair-count matrices up to this many cells; sparser beyond, so thousands of tiny nuclei stay cheap
_DENSE_PAIRS_MAX = 1 << 20
# fewest images a worker process gets, so that start-up and result passing stay small next to the scoring itself
MIN_CHUNK = 32
# forked workers inherit the fold's maps without pickling, which would cost about as much as scoring them; where
# fork does not exist, chunks of maps are pickled to the workers instead
_FORK_OK = "fork" in multiprocessing.get_all_start_methods()

BINARY_KEYS: tuple[str, ...] = ("bPQ", "bDQ", "bSQ", "Dice", "AJI")


def class_keys(names: Sequence[str] = TYPE_NAMES) -> tuple[str, ...]:
    """The per-class PQ columns of a dataset's classes (PanNuke's five by default)."""
    return tuple(f"PQ_{name}" for name in names)


def row_keys(names: Sequence[str] = TYPE_NAMES) -> tuple[str, ...]:
    """Every per-image score column, in table order."""
    return (*BINARY_KEYS, *class_keys(names), "mPQ")


CLASS_KEYS: tuple[str, ...] = class_keys()
ROW_KEYS: tuple[str, ...] = row_keys()
# aggregated over tissues (nanmean per tissue, then nanmean over tissues), as the official bPQ and mPQ are
TISSUE_MEAN_KEYS: tuple[str, ...] = ("bPQ", "mPQ", "bDQ", "bSQ", "Dice", "AJI")

PER_IMAGE_CSV = "pannuke_scores_per_image.csv"
PER_TISSUE_CSV = "pannuke_scores_per_tissue.csv"
SCORES_JSON = "pannuke_scores.json"


def _check_same_shape(**arrays: np.ndarray) -> None:
    """Raise a ValueError naming every shape, since a silent broadcast would score the wrong pixels."""
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"maps must have the same shape, got {listed}")
    for name, a in arrays.items():
        if np.ndim(a) != 2:
            raise ValueError(f"{name} must be a 2D (H, W) map, got shape {np.shape(a)}")


def _contiguous(inst: np.ndarray) -> tuple[np.ndarray, int]:
    """Map arbitrary instance ids to 1..n in id order (0 stays background), like the official remap_label."""
    ids, inverse = np.unique(inst.ravel(), return_inverse=True)
    if ids.size and ids[0] < 0:
        raise ValueError(f"instance ids must be >= 0 (0 = background), got {ids[0]}")
    if ids.size and ids[0] == 0:
        return inverse.astype(np.int64), ids.size - 1
    return inverse.astype(np.int64) + 1, ids.size


def _pair_overlaps(t: np.ndarray, p: np.ndarray, n_t: int, n_p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (true index, pred index, intersection) for every overlapping pair, all in one pass over the pixels."""
    both = (t > 0) & (p > 0)
    key = t[both] * (n_p + 1) + p[both]
    if (n_t + 1) * (n_p + 1) <= _DENSE_PAIRS_MAX:
        counts = np.bincount(key, minlength=(n_t + 1) * (n_p + 1))
        key = np.flatnonzero(counts)
        inter = counts[key]
    else:
        key, inter = np.unique(key, return_counts=True)
    return key // (n_p + 1), key % (n_p + 1), inter.astype(np.float64)


PQCounts = tuple[float, float, float, int, int, int, float]


def _pq_from_indices(t: np.ndarray, p: np.ndarray, n_t: int, n_p: int) -> PQCounts:
    """PQ on contiguous index maps; instances with no pixel here (another type) simply do not count."""
    area_t = np.bincount(t, minlength=n_t + 1)
    area_p = np.bincount(p, minlength=n_p + 1)
    ti, pi, inter = _pair_overlaps(t, p, n_t, n_p)
    iou = inter / (area_t[ti] + area_p[pi] - inter)
    paired = iou[iou > MATCH_IOU]
    tp = int(paired.size)
    fn = int(np.count_nonzero(area_t[1:])) - tp
    fp = int(np.count_nonzero(area_p[1:])) - tp
    iou_sum = float(paired.sum())
    if tp + fp + fn == 0:
        return math.nan, math.nan, math.nan, 0, 0, 0, 0.0
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / (tp + SQ_EPS)
    return dq, sq, dq * sq, tp, fp, fn, iou_sum


def pq_counts(true_inst: np.ndarray, pred_inst: np.ndarray) -> PQCounts:
    """(dq, sq, pq, tp, fp, fn, iou_sum) of one image, as official get_fast_pq; NaN scores when both are empty.

    With an empty GT but predictions this gives dq = pq = 0; `score_image` reports NaN there, as the official script
    never scores an empty GT.
    """
    true_inst, pred_inst = np.asarray(true_inst), np.asarray(pred_inst)
    _check_same_shape(true_inst=true_inst, pred_inst=pred_inst)
    t, n_t = _contiguous(true_inst)
    p, n_p = _contiguous(pred_inst)
    return _pq_from_indices(t, p, n_t, n_p)


def _aji_from_indices(t: np.ndarray, p: np.ndarray, n_t: int, n_p: int) -> float:
    """AJI as HoVer-Net get_fast_aji: each GT takes its best-IoU prediction, which may serve several GTs."""
    area_t = np.bincount(t, minlength=n_t + 1).astype(np.float64)
    area_p = np.bincount(p, minlength=n_p + 1).astype(np.float64)
    ti, pi, inter = _pair_overlaps(t, p, n_t, n_p)
    union = area_t[ti] + area_p[pi] - inter
    iou = inter / (union + AJI_EPS)
    # best partner per GT: highest IoU, lowest pred id on ties (np.argmax's choice in the official code)
    order = np.lexsort((pi, -iou, ti))
    first = np.ones(order.size, dtype=bool)
    first[1:] = ti[order][1:] != ti[order][:-1]
    best = order[first]
    used_pred = np.zeros(n_p + 1, dtype=bool)
    used_pred[pi[best]] = True
    paired_true = np.zeros(n_t + 1, dtype=bool)
    paired_true[ti[best]] = True
    overall_inter = inter[best].sum()
    overall_union = union[best].sum() + area_t[1:][~paired_true[1:]].sum() + area_p[1:][~used_pred[1:]].sum()
    return float(overall_inter / overall_union) if overall_union > 0 else math.nan


def aji(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Aggregated Jaccard Index of one image; 0 if the GT is empty but not the prediction, NaN if both are."""
    true_inst, pred_inst = np.asarray(true_inst), np.asarray(pred_inst)
    _check_same_shape(true_inst=true_inst, pred_inst=pred_inst)
    t, n_t = _contiguous(true_inst)
    p, n_p = _contiguous(pred_inst)
    return _aji_from_indices(t, p, n_t, n_p)


def binary_dice(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Dice of the nucleus foreground (HoVer-Net get_dice_1); NaN when neither map has a nucleus pixel."""
    true_inst, pred_inst = np.asarray(true_inst), np.asarray(pred_inst)
    _check_same_shape(true_inst=true_inst, pred_inst=pred_inst)
    t, q = true_inst > 0, pred_inst > 0
    denom = int(t.sum()) + int(q.sum())
    return 2.0 * int((t & q).sum()) / denom if denom else math.nan


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
    """np.nanmean without the 'Mean of empty slice' warning: all-NaN (or nothing) gives NaN, as official."""
    arr = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(arr)) if arr.size else math.nan


def score_image(
    true_inst: np.ndarray,
    true_type: np.ndarray,
    pred_inst: np.ndarray,
    pred_type: np.ndarray,
    true_channels: np.ndarray | None = None,
    class_names: Sequence[str] = TYPE_NAMES,
) -> dict[str, float]:
    """Every per-image score of the protocol, from the bundle's (instance map, type map) pairs.

    `true_channels`, PanNuke's raw (H, W, K) per-type instance maps, makes each class be scored on its own channel
    as the official code does; it matters only where two channels label one pixel (the instance map keeps one).
    `class_names` name the type ids 1..K (the per-class columns `PQ_<name>`).
    """
    arrays = {"true_inst": true_inst, "true_type": true_type, "pred_inst": pred_inst, "pred_type": pred_type}
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    _check_same_shape(**arrays)
    # only pixels where either map has a nucleus matter to every score: drop the rest once, for speed
    fg = (arrays["true_inst"] != 0) | (arrays["pred_inst"] != 0)
    t, n_t = _contiguous(arrays["true_inst"][fg])
    p, n_p = _contiguous(arrays["pred_inst"][fg])
    tt, pt = arrays["true_type"][fg], arrays["pred_type"][fg]

    row: dict[str, float] = {}
    if n_t == 0:  # official: an image without GT nuclei has no bPQ, whatever was predicted
        row.update(bPQ=math.nan, bDQ=math.nan, bSQ=math.nan)
    else:
        dq, sq, pq, *_ = _pq_from_indices(t, p, n_t, n_p)
        row.update(bPQ=pq, bDQ=dq, bSQ=sq)
    n_true_px, n_pred_px = int(np.count_nonzero(t)), int(np.count_nonzero(p))
    overlap_px = int(np.count_nonzero((t > 0) & (p > 0)))
    row["Dice"] = 2.0 * overlap_px / (n_true_px + n_pred_px) if n_true_px + n_pred_px else math.nan
    row["AJI"] = _aji_from_indices(t, p, n_t, n_p)
    keys = class_keys(class_names)
    for c, key in enumerate(keys, start=1):
        if true_channels is not None:
            row[key] = _class_pq_on_channel(np.asarray(true_channels)[..., c - 1], arrays, c)
            continue
        t_c = np.where(tt == c, t, 0)
        row[key] = _pq_from_indices(t_c, np.where(pt == c, p, 0), n_t, n_p)[2] if t_c.any() else math.nan
    row["mPQ"] = _nanmean([row[key] for key in keys])
    return row


def _class_pq_on_channel(channel: np.ndarray, arrays: dict[str, np.ndarray], c: int) -> float:
    """PQ of class c with its own raw PanNuke channel as the truth (NaN if the channel is empty)."""
    pred_c = np.where(arrays["pred_type"] == c, arrays["pred_inst"], 0)
    fg = (channel > 0) | (pred_c > 0)
    t_c, n_t = _contiguous(np.rint(channel[fg]).astype(np.int64))
    p_c, n_p = _contiguous(pred_c[fg])
    return _pq_from_indices(t_c, p_c, n_t, n_p)[2] if n_t else math.nan


_Image = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# the fold as a forked worker received it from its parent, by inheritance rather than pickling
_worker_images: list[_Image] = []


def _score_chunk(chunk: Sequence[_Image]) -> list[dict[str, float]]:
    """Score a list of images in one worker (top level so that process pools can pickle it)."""
    return [score_image(*item) for item in chunk]


def _adopt_images(images: list[_Image]) -> None:
    """Pool initializer: keep the inherited fold in this worker."""
    global _worker_images
    _worker_images = images


def _score_range(bounds: tuple[int, int]) -> list[dict[str, float]]:
    """Score images[start:stop] of the inherited fold, so only two ints travel to the worker."""
    return _score_chunk(_worker_images[bounds[0] : bounds[1]])


def _worker_count(workers: int) -> int:
    """Workers asked for, 0 meaning every CPU this process may use (the affinity mask, as containers restrict it)."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers:
        return workers
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def score_images(
    true_insts: Sequence[np.ndarray],
    true_types: Sequence[np.ndarray],
    pred_insts: Sequence[np.ndarray],
    pred_types: Sequence[np.ndarray],
    workers: int = 0,
    chunk_size: int | None = None,
) -> list[dict[str, float]]:
    """`score_image` over a fold, in image order, on a process pool when there are enough images to pay for it.

    Images go to the workers in chunks of `chunk_size` (default: about four chunks per worker, at least MIN_CHUNK);
    with one worker or a single chunk the images are scored here, serially.  Where fork exists, workers are forked
    with the maps already in memory, even if the platform's default start method is another.
    """
    lengths = {len(true_insts), len(true_types), len(pred_insts), len(pred_types)}
    if len(lengths) != 1:
        raise ValueError(
            f"need as many of each map, got {len(true_insts)} true_insts, {len(true_types)} true_types, "
            f"{len(pred_insts)} pred_insts, {len(pred_types)} pred_types"
        )
    n, n_workers = len(true_insts), _worker_count(workers)
    if chunk_size is None:
        chunk_size = max(MIN_CHUNK, math.ceil(n / (4 * n_workers)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    items = list(zip(true_insts, true_types, pred_insts, pred_types, strict=True))
    bounds = [(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]
    if n_workers <= 1 or len(bounds) <= 1:
        return _score_chunk(items)
    n_workers = min(n_workers, len(bounds))
    if _FORK_OK:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(n_workers, mp_context=context, initializer=_adopt_images, initargs=(items,)) as pool:
            return [row for rows in pool.map(_score_range, bounds) for row in rows]
    with ProcessPoolExecutor(n_workers) as pool:
        return [row for rows in pool.map(_score_chunk, (items[a:b] for a, b in bounds)) for row in rows]


def _mean_rows(rows: Sequence[dict[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """nanmean of each key over rows: the official reduction over the images of one tissue."""
    return {key: _nanmean([row[key] for row in rows]) for key in keys}


def row_class_names(row: dict[str, float]) -> tuple[str, ...]:
    """The class names a score_image row was made with, in order."""
    return tuple(key[3:] for key in row if key.startswith("PQ_"))


def aggregate_scores(rows: Sequence[dict[str, float]], tissues: Sequence[str]) -> dict:
    """Fold scores in the official order: per tissue nanmean over its images, then nanmean over tissues for bPQ,
    mPQ (and bDQ, bSQ, Dice, AJI); per-class PQ is the nanmean over all images, not over tissues."""
    if len(rows) != len(tissues):
        raise ValueError(f"need one tissue per row, got {len(rows)} rows and {len(tissues)} tissues")
    if not rows:
        raise ValueError("no images to aggregate")
    names = row_class_names(rows[0])
    keys = row_keys(names)
    missing = [key for key in keys if key not in rows[0]]
    if missing:
        raise ValueError(f"rows lack the keys {missing}; make them with score_image")
    per_tissue: dict[str, dict[str, float]] = {}
    for tissue in sorted(set(tissues)):
        tissue_rows = [row for row, name in zip(rows, tissues, strict=True) if name == tissue]
        per_tissue[tissue] = {"n_images": len(tissue_rows), **_mean_rows(tissue_rows, keys)}
    per_class = {name: _nanmean([row[key] for row in rows]) for name, key in zip(names, class_keys(names), strict=True)}
    overall = {key: _nanmean([scores[key] for scores in per_tissue.values()]) for key in TISSUE_MEAN_KEYS}
    overall.update({key: per_class[name] for name, key in zip(names, class_keys(names), strict=True)})
    overall.update(n_images=len(rows), n_tissues=len(per_tissue))
    return {"overall": overall, "per_tissue": per_tissue, "per_class": per_class}


def write_score_tables(rows: Sequence[dict[str, float]], tissues: Sequence[str], out_dir: str | os.PathLike) -> dict:
    """Write the per-image and per-tissue CSVs and the JSON summary under out_dir; return the aggregate.

    Everything is computed and checked before the first file is replaced.
    """
    agg = aggregate_scores(rows, tissues)
    keys = row_keys(row_class_names(rows[0]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_text = csv_text(
        ("index", "tissue", *keys),
        [(i, tissue, *(row[key] for key in keys)) for i, (row, tissue) in enumerate(zip(rows, tissues, strict=True))],
    )
    tissue_text = csv_text(
        ("tissue", "n_images", *keys),
        [(name, s["n_images"], *(s[key] for key in keys)) for name, s in agg["per_tissue"].items()],
    )
    scores_text = json_text(agg) + "\n"
    write_text(out / PER_IMAGE_CSV, image_text)
    write_text(out / PER_TISSUE_CSV, tissue_text)
    write_text(out / SCORES_JSON, scores_text)
    return agg


def format_summary(agg: dict) -> str:
    """A plain-text table of an `aggregate_scores` result, for the training or evaluation log."""
    overall = agg["overall"]
    lines = [
        f"PanNuke scores: {overall['n_images']} images, {overall['n_tissues']} tissues",
        "  " + "  ".join(f"{key} {overall[key]:.4f}" for key in TISSUE_MEAN_KEYS),
        "  per class PQ: " + "  ".join(f"{name} {value:.4f}" for name, value in agg["per_class"].items()),
    ]
    width = max([len("tissue"), *(len(name) for name in agg["per_tissue"])])
    columns = ("n", *TISSUE_MEAN_KEYS)
    lines.append(f"  {'tissue':<{width}}  " + "  ".join(f"{col:>6}" for col in columns))
    for name, scores in agg["per_tissue"].items():
        values = [f"{scores['n_images']:>6d}", *(f"{scores[key]:>6.4f}" for key in TISSUE_MEAN_KEYS)]
        lines.append(f"  {name:<{width}}  " + "  ".join(values))
    return "\n".join(lines)
