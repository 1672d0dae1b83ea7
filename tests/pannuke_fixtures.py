"""Small PanNuke-format datasets written by the project itself, for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scripts.data.pannuke.demo_data import write_demo_dataset
from scripts.data.pannuke.files import LAYOUTS


def write_dataset(root: Path, tiles: tuple[int, int, int] = (3, 2, 2), layout: str = "official") -> Path:
    return write_demo_dataset(root, tiles, seed=1, layout=layout)


def fold_path(root: Path, fold: int, key: str, layout: str = "official") -> Path:
    return root / LAYOUTS[layout][key].format(k=fold)


def rewrite(root: Path, fold: int, key: str, fn, layout: str = "official") -> None:
    """Load one array of a fold, change it with fn, save it back."""
    path = fold_path(root, fold, key, layout)
    np.save(path, fn(np.load(path)))


def write_lab_folder(root: Path, images: int = 6, shape: tuple[int, int] = (256, 300), seed: int = 0) -> Path:
    """A lab's annotations as a user has them: PNG images beside NPZ masks (inst_map + type_map, ids 1-5 in PanNuke
    order), with H&E-like colours from the demo generator so that a network can learn something from them."""
    from PIL import Image

    from scripts.data.pannuke.demo_data import make_tile

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        image, masks = make_tile(rng, size=max(shape))
        image, masks = image[: shape[0], : shape[1]], masks[: shape[0], : shape[1]]
        inst = np.zeros(shape, np.int32)
        types = np.zeros(shape, np.uint8)
        for channel in range(5):
            ids = masks[..., channel].astype(np.int32)
            inst = np.where(ids > 0, ids + 10_000 * channel, inst)
            types = np.where(ids > 0, channel + 1, types).astype(np.uint8)
        Image.fromarray(np.rint(image).astype(np.uint8)).save(root / "images" / f"slide{i:02d}.png")
        np.savez(root / "masks" / f"slide{i:02d}.npz", inst_map=inst, type_map=types)
    return root
