"""Small PanNuke-format datasets written by the project itself, for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scripts.pannuke.demo_data import write_demo_dataset
from scripts.pannuke.files import LAYOUTS


def write_dataset(root: Path, tiles: tuple[int, int, int] = (3, 2, 2), layout: str = "official") -> Path:
    return write_demo_dataset(root, tiles, seed=1, layout=layout)


def fold_path(root: Path, fold: int, key: str, layout: str = "official") -> Path:
    return root / LAYOUTS[layout][key].format(k=fold)


def rewrite(root: Path, fold: int, key: str, fn, layout: str = "official") -> None:
    """Load one array of a fold, change it with fn, save it back."""
    path = fold_path(root, fold, key, layout)
    np.save(path, fn(np.load(path)))
