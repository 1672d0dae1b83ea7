"""Time the PanNuke score over a fold-sized set of synthetic tiles, serially and on a process pool.

A PanNuke fold has about 2,656 tiles of 256x256.  Tiles are made in batches so that memory stays at one batch of
maps (about 170 MB for 256 tiles); each batch is scored serially and then in parallel, and only scoring is timed.

    .venv/bin/python benchmarks/score_fold_speed.py --tiles 200
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from skimage.draw import ellipse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.workflows.evaluate import pq as pm  # noqa: E402
from scripts.data.pannuke.format import NUM_TYPES, TILE_SIZE  # noqa: E402

FOLD_TILES = 2656


def nucleus_params(rng: np.random.Generator) -> np.ndarray:
    """Rows of (centre row, centre col, radius r, radius c, rotation, type) for 20-60 nuclei of one tile."""
    n = int(rng.integers(20, 61))
    return np.column_stack(
        [
            rng.uniform(0, TILE_SIZE, size=(n, 2)),
            rng.uniform(3, 9, size=(n, 2)),
            rng.uniform(0, np.pi, size=n),
            rng.integers(1, NUM_TYPES + 1, size=n),
        ]
    )


def draw(params: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint ellipses in order (later ones cover earlier ones, as touching nuclei do) into instance and type maps."""
    inst = np.zeros((TILE_SIZE, TILE_SIZE), np.int32)
    types = np.zeros((TILE_SIZE, TILE_SIZE), np.uint8)
    for (r, c, rad_r, rad_c, rot, t), inst_id in zip(params, ids, strict=True):
        rr, cc = ellipse(r, c, rad_r, rad_c, shape=inst.shape, rotation=rot)
        inst[rr, cc] = inst_id
        types[rr, cc] = int(t)
    return inst, types


def perturb_params(rng: np.random.Generator, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A model-like prediction: jittered shapes, missed and spurious nuclei, some wrong types and some merges."""
    pred = params.copy()
    pred[:, :2] += rng.normal(0, 1.5, size=(len(pred), 2))
    pred[:, 2:4] = np.clip(pred[:, 2:4] * rng.normal(1, 0.15, size=(len(pred), 2)), 1.5, None)
    retype = rng.random(len(pred)) < 0.15
    pred[retype, 5] = rng.integers(1, NUM_TYPES + 1, size=int(retype.sum()))
    pred = pred[rng.random(len(pred)) > 0.1]
    pred = np.vstack([pred, nucleus_params(rng)[: int(rng.integers(0, 5))]])
    ids = np.arange(1, len(pred) + 1) * 7  # non-contiguous ids, as some post-processing leaves them
    merge = np.flatnonzero(rng.random(len(pred)) < 0.03)
    ids[merge[merge > 0]] = ids[merge[merge > 0] - 1]  # a nucleus takes its predecessor's id: a merge
    return pred, ids


def make_batch(rng: np.random.Generator, n: int) -> list[list[np.ndarray]]:
    """n synthetic tiles as [true_insts, true_types, pred_insts, pred_types]."""
    maps: list[list[np.ndarray]] = [[], [], [], []]
    for _ in range(n):
        params = nucleus_params(rng)
        true = draw(params, np.arange(1, len(params) + 1))
        pred = draw(*perturb_params(rng, params))
        for store, item in zip(maps, (*true, *pred), strict=True):
            store.append(item)
    return maps


def describe_machine() -> str:
    """CPU model and counts, numpy and Python versions: what the timings depend on."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        model = names[0] if names else model
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"device: CPU ({model}); os.cpu_count()={os.cpu_count()}, usable={usable}; "
        f"numpy {np.__version__}; python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=FOLD_TILES, help="tiles to score (default: one fold)")
    parser.add_argument("--batch", type=int, default=256, help="tiles held in memory at once")
    parser.add_argument("--workers", type=int, default=0, help="parallel workers, 0 = every usable CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(describe_machine())
    rng = np.random.default_rng(args.seed)
    timings = {"make": 0.0, "serial": 0.0, "parallel": 0.0}
    rows_serial, rows_parallel, nuclei = [], [], 0
    for start in range(0, args.tiles, args.batch):
        t0 = time.perf_counter()
        maps = make_batch(rng, min(args.batch, args.tiles - start))
        t1 = time.perf_counter()
        rows_serial += pm.score_images(*maps, workers=1)
        t2 = time.perf_counter()
        rows_parallel += pm.score_images(*maps, workers=args.workers)
        t3 = time.perf_counter()
        timings["make"] += t1 - t0
        timings["serial"] += t2 - t1
        timings["parallel"] += t3 - t2
        nuclei += sum(len(np.unique(inst)) - 1 for inst in maps[0])
    same = all(
        np.allclose([a[k] for k in pm.ROW_KEYS], [b[k] for k in pm.ROW_KEYS], equal_nan=True)
        for a, b in zip(rows_serial, rows_parallel, strict=True)
    )
    print(
        f"tiles {args.tiles} ({TILE_SIZE}x{TILE_SIZE}), {nuclei / args.tiles:.1f} GT nuclei per tile, "
        f"batch {args.batch}; making tiles took {timings['make']:.1f} s (not counted)"
    )
    for name in ("serial", "parallel"):
        seconds = timings[name]
        print(f"{name:>8}: {seconds:7.2f} s total, {args.tiles / seconds:7.1f} tiles/s")
    speed_up = timings["serial"] / timings["parallel"]
    print(f"parallel workers={pm._worker_count(args.workers)}, speed-up x{speed_up:.2f}, rows identical: {same}")
    fold_tissues = [f"tissue_{i % 19:02d}" for i in range(args.tiles)]
    print(pm.format_summary(pm.aggregate_scores(rows_serial, fold_tissues)).splitlines()[1])


if __name__ == "__main__":
    main()
