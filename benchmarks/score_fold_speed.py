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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.workflows.evaluate import pq as pm  # noqa: E402
from scripts.data.pannuke.format import TILE_SIZE  # noqa: E402
from scripts.data.synthetic_nuclei import prediction_like, random_types, synthetic_nuclei  # noqa: E402
from synthetic_folds import cpu_name  # noqa: E402

FOLD_TILES = 2656


def make_batch(rng: np.random.Generator, n: int) -> list[list[np.ndarray]]:
    """n synthetic tiles as [true_insts, true_types, pred_insts, pred_types]: 20-60 overlapping nuclei each (the
    project's synthetic-nuclei generator) and a model-like prediction of them."""
    maps: list[list[np.ndarray]] = [[], [], [], []]
    for _ in range(n):
        count = int(rng.integers(20, 61))
        inst = synthetic_nuclei(rng, count, TILE_SIZE, radii=(3.0, 9.0), min_distance=0.0, margin=0.0, touching=False)
        types = random_types(rng, inst)
        for store, item in zip(maps, (inst, types, *prediction_like(rng, inst, types)), strict=True):
            store.append(item)
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=FOLD_TILES, help="tiles to score (default: one fold)")
    parser.add_argument("--batch", type=int, default=256, help="tiles held in memory at once")
    parser.add_argument("--workers", type=int, default=0, help="parallel workers, 0 = every usable CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"device: CPU ({cpu_name()}); os.cpu_count()={os.cpu_count()}, usable={usable}; "
        f"numpy {np.__version__}; python {platform.python_version()}"
    )
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
