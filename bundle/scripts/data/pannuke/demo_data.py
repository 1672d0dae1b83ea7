"""A small, deterministic, synthetic dataset in the exact PanNuke format, so the bundle runs out of the box.

Tiles look roughly like H&E: pink eosin background with fibres, purple hematoxylin nuclei whose size, shape and
darkness depend on the type (large pale neoplastic, small dark round inflammatory, elongated connective, tiny
fragmented dead, medium epithelial), clustered so that many touch.  Files are written like the official zips:
float64 images 0-255, float64 masks with non-contiguous instance ids, tissue names, official folder layout.
This is demo data only: it proves the pipeline runs, not that a model is any good on real tissue.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.color import rgb_from_hed
from skimage.draw import ellipse

from scripts.core.atomic import atomic_write, write_text
from scripts.core.distributed import in_rank_order
from scripts.data.pannuke.files import LAYOUTS, fold_paths
from scripts.data.pannuke.format import NUM_TYPES, TILE_SIZE

logger = logging.getLogger(__name__)

DEMO_TISSUES = ("Breast", "Colon", "Lung", "Kidney", "Skin")
DEMO_TILES_PER_FOLD = (24, 8, 8)
# per type: (semi-axis range in px, elongation range, hematoxylin strength range)
NUCLEUS_LOOK = {
    0: ((8.0, 12.0), (1.0, 1.5), (0.55, 0.75)),  # Neoplastic: large, pale-ish, irregular
    1: ((3.5, 5.0), (1.0, 1.15), (0.95, 1.1)),  # Inflammatory: small, round, dark
    2: ((9.0, 13.0), (2.8, 4.0), (0.7, 0.85)),  # Connective: spindle-shaped
    3: ((2.5, 3.5), (1.0, 1.3), (1.1, 1.25)),  # Dead: tiny, pyknotic
    4: ((6.0, 8.0), (1.0, 1.3), (0.6, 0.8)),  # Epithelial: medium, round
}
HEMATOXYLIN_OD, EOSIN_OD = rgb_from_hed[0], rgb_from_hed[1]  # Ruifrok & Johnston optical density per RGB


def make_tile(rng: np.random.Generator, size: int = TILE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic tile: (H, W, 3) float64 RGB 0-255 and (H, W, 6) float64 PanNuke mask."""
    masks = np.zeros((size, size, 6))
    occupied = np.zeros((size, size), np.int32)
    hema = np.zeros((size, size))
    dominant = rng.integers(NUM_TYPES)
    for _ in range(int(rng.integers(20, 45))):
        kind = dominant if rng.random() < 0.5 else int(rng.integers(NUM_TYPES))
        centre = _next_centre(rng, occupied, size)
        rr, cc = _nucleus_pixels(rng, kind, centre, size)
        if rr.size < 4:
            continue
        nucleus_id = int(rng.integers(1, 5000))  # PanNuke ids are neither contiguous nor ordered
        while (masks[..., kind] == nucleus_id).any():
            nucleus_id += 1
        masks[rr, cc, :NUM_TYPES] = 0  # a later nucleus lies on top: the earlier one keeps what shows
        masks[rr, cc, kind] = nucleus_id
        occupied[rr, cc] = 1
        strength = 1.5 * rng.uniform(*NUCLEUS_LOOK[kind][2])
        hema[rr, cc] = strength * (0.8 + 0.4 * rng.random(rr.size))  # chromatin texture
    masks[..., 5] = (masks[..., :NUM_TYPES].sum(-1) == 0).astype(np.float64)
    return _render(rng, hema, size), masks


def _next_centre(rng: np.random.Generator, occupied: np.ndarray, size: int) -> tuple[float, float]:
    """Half the nuclei are placed next to an existing one, so touching nuclei are common."""
    taken = np.argwhere(occupied)
    if taken.size and rng.random() < 0.5:
        r, c = taken[rng.integers(len(taken))]
        angle = rng.uniform(0, 2 * np.pi)
        return r + 7 * np.sin(angle), c + 7 * np.cos(angle)
    return rng.uniform(0, size), rng.uniform(0, size)


def _nucleus_pixels(rng: np.random.Generator, kind: int, centre: tuple[float, float], size: int):
    (lo, hi), (elo, ehi), _ = NUCLEUS_LOOK[kind]
    major = rng.uniform(lo, hi)
    minor = max(major / rng.uniform(elo, ehi), 2.0)
    return ellipse(centre[0], centre[1], minor, major, shape=(size, size), rotation=rng.uniform(0, np.pi))


def _render(rng: np.random.Generator, hema: np.ndarray, size: int) -> np.ndarray:
    """Beer-Lambert mix of a textured eosin background and blurred hematoxylin nuclei."""
    fibres = ndimage.gaussian_filter(rng.random((size, size)), sigma=(1.0, 6.0))
    eosin = 0.15 + 0.5 * (fibres - fibres.min()) / (np.ptp(fibres) + 1e-9)
    hema = ndimage.gaussian_filter(hema, 0.7)
    od = hema[..., None] * HEMATOXYLIN_OD + eosin[..., None] * EOSIN_OD * rng.uniform(0.6, 1.0)
    rgb = 255.0 * np.exp(-od) + rng.normal(0, 3.0, (size, size, 3))
    return np.clip(np.rint(rgb), 0, 255)


def write_demo_dataset(
    root: str | os.PathLike,
    tiles_per_fold: tuple[int, ...] = DEMO_TILES_PER_FOLD,
    seed: int = 0,
    layout: str = "official",
) -> Path:
    """Write folds 1..3 in the official (or Kaggle) layout; the same seed always gives the same files."""
    root = Path(root)
    for fold, n in enumerate(tiles_per_fold, start=1):
        rng = np.random.default_rng([seed, fold])
        tiles = [make_tile(rng) for _ in range(n)]
        paths = fold_paths(root, fold, layout)
        for path in paths.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        # each file renamed into place whole: under torchrun every rank may write the (identical) files at once,
        # as the training's option checks read the dataset's classes before the ranks join their process group
        arrays = {
            "images": np.stack([t[0] for t in tiles]),
            "masks": np.stack([t[1] for t in tiles]),
            "types": np.array([DEMO_TISSUES[i % len(DEMO_TISSUES)] for i in range(n)]),
        }
        for key, array in arrays.items():
            atomic_write(paths[key], lambda tmp, array=array: np.save(tmp, array))
    write_text(
        root / "DEMO_DATA_IS_SYNTHETIC.txt",
        "Synthetic PanNuke-format demo data written by scripts/data/pannuke/demo_data.py. Not real tissue.\n",
    )
    return root


def ensure_demo_dataset(root: str | os.PathLike) -> Path:
    """Generate the demo dataset on first use and say loudly that it is synthetic."""
    root = Path(root)
    if not (root / "DEMO_DATA_IS_SYNTHETIC.txt").is_file():
        logger.warning(f"generating the synthetic demo dataset in {root}")
        write_demo_dataset(root)
    logger.warning(
        "configs/demo.json: using SYNTHETIC demo data (%s). To train on PanNuke, download it and run train.json "
        "without demo.json, with --dataset_dir /path/to/pannuke (the folder holding 'Fold 1'..'Fold 3' or "
        "'Part 1'..'Part 3').",
        root,
    )
    return root


def demo_dataset(root: str | os.PathLike) -> str:
    """configs/demo.json's `dataset_dir`: the demo data in `root`, written on first use (by rank 0 first)."""
    return str(in_rank_order(lambda: ensure_demo_dataset(root)))


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic PanNuke-format dataset (official layout).")
    parser.add_argument("output_dir")
    parser.add_argument("--tiles_per_fold", type=int, nargs=3, default=DEMO_TILES_PER_FOLD)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="official")
    args = parser.parse_args()
    print(write_demo_dataset(args.output_dir, tuple(args.tiles_per_fold), args.seed, args.layout))


if __name__ == "__main__":
    main()
