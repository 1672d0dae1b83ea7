"""PanNuke-format folds of any size for the benchmarks, written chunk by chunk so that writing one never needs the
fold in memory (a full fold is 12.5 GB of float64).  Tiles come from a pool of synthetic tiles
(scripts/data/pannuke/demo_data.make_tile) used in turn: the per-tile work of conversion and training does not depend
on the tiles being distinct, and making 2,656 distinct ones would take minutes.
"""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from scripts.data.pannuke.demo_data import DEMO_TISSUES, make_tile  # noqa: E402
from scripts.data.pannuke.files import LAYOUTS  # noqa: E402
from scripts.data.pannuke.format import TILE_SIZE  # noqa: E402

FOLD_TILES = 2656
BYTES_PER_TILE = TILE_SIZE * TILE_SIZE * (3 + 6) * 8  # float64 image + 6-channel mask


def fold_bytes(tiles: int) -> int:
    return tiles * BYTES_PER_TILE


def require_free_disk(folder: Path, needed: int) -> None:
    """Refuse to start a write that cannot finish (a full disk half-way through hurts other jobs too)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free, this needs {needed / 1e9:.1f} GB")


def write_folds(
    root: Path, tiles_per_fold: tuple[int, ...], pool_size: int = 32, chunk: int = 32, seed: int = 0
) -> Path:
    """Folds 1..k in the official layout under root, `chunk` tiles in memory at a time."""
    rng = np.random.default_rng(seed)
    pool = [make_tile(rng) for _ in range(min(pool_size, max(tiles_per_fold)))]
    for fold, n in enumerate(tiles_per_fold, start=1):
        paths = {key: root / pattern.format(k=fold) for key, pattern in LAYOUTS["official"].items()}
        for path in paths.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        images = np.lib.format.open_memmap(paths["images"], "w+", np.float64, (n, TILE_SIZE, TILE_SIZE, 3))
        masks = np.lib.format.open_memmap(paths["masks"], "w+", np.float64, (n, TILE_SIZE, TILE_SIZE, 6))
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            images[start:stop] = np.stack([pool[i % len(pool)][0] for i in range(start, stop)])
            masks[start:stop] = np.stack([pool[i % len(pool)][1] for i in range(start, stop)])
            images.flush(), masks.flush()
        del images, masks
        np.save(paths["types"], np.array([DEMO_TISSUES[i % len(DEMO_TISSUES)] for i in range(n)]))
    return root


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM, ...), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
