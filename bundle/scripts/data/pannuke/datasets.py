"""The PanNuke folds a run uses, as MONAI datasets.

`PanNuke` finds, checks and caches every fold the run will touch (train, validation and test) when the config is
parsed, so a missing or broken fold fails before any training and before any checkpoint is written.  Each fold is
converted into its compact cache once; later runs reuse it.  `PanNukeDataset` then reads one tile at a
time from the memory-mapped cache and hands MONAI transforms a dict of numpy arrays.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from monai.data import Dataset
from monai.transforms import apply_transform

from scripts.core.atomic import require_writable
from scripts.core.classes import CLASSES_FILE, PANNUKE, NucleusClasses, read_dataset_classes
from scripts.core.distributed import in_rank_order
from scripts.core.errors import DataError
from scripts.data.pannuke.cache import ensure_fold_cache, open_fold_cache
from scripts.data.pannuke.files import FoldFiles, fold_exists, locate_folds

logger = logging.getLogger(__name__)


def as_fold_list(folds: int | str | Sequence) -> list[int]:
    """Accept the forms a command-line override takes (1, "1,3", [1, 3]) and nested lists such as [[1, 3], 2, 3]."""
    if isinstance(folds, str):
        return [int(f) for f in folds.replace("[", "").replace("]", "").split(",") if f.strip()]
    if isinstance(folds, (int, np.integer)):
        return [int(folds)]
    return [f for item in folds for f in as_fold_list(item)]


class PanNuke:
    """Checked, cached PanNuke folds under `dataset_dir`.

    `classes` are the folds' nucleus types: PanNuke's five, or a lab's own from `classes.json` beside the folds.

    Args:
        dataset_dir: the folder holding the folds (`@dataset_dir`; configs/demo.json sets it to the demo data).
        cache_dir: where fold caches go (`@cache_dir`).
        folds: every fold the run touches (`@run_folds`).
        optional_folds: folds used only if they exist (training: the test fold, which a lab's folder converted with
            `--split 0.8,0.2,0` does not have); a missing one is logged and left out.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike | None,
        cache_dir: str | os.PathLike,
        folds: int | str | Sequence[int] = (1, 2, 3),
        optional_folds: int | str | Sequence[int] = (),
    ) -> None:
        if not dataset_dir:
            raise DataError(
                "no dataset given: pass --dataset_dir /path/to/pannuke (the folder holding the folds), or add "
                "configs/demo.json to the config files to train on synthetic demo data"
            )
        self.dataset_dir = Path(dataset_dir)
        self.cache_dir = require_writable(cache_dir, "cache_dir")  # a file there: one line, not an OSError later
        self.classes: NucleusClasses = read_dataset_classes(self.dataset_dir)
        if self.classes != PANNUKE:
            logger.info(f"classes of {self.dataset_dir}: {', '.join(self.classes.names)} ({CLASSES_FILE})")
        optional = set(as_fold_list(optional_folds))
        absent = sorted(f for f in optional if self.dataset_dir.is_dir() and not fold_exists(self.dataset_dir, f))
        if absent:
            logger.info(f"{self.dataset_dir} has no fold {absent[0]}: this run has no test fold to check")
        wanted = [f for f in as_fold_list(folds) if f not in absent]
        self.files: dict[int, FoldFiles] = locate_folds(self.dataset_dir, wanted, self.classes.num_types)
        # every value check runs in the cache conversion: do it for all folds now, before any training starts; under
        # torchrun one rank builds each cache and the others then find it built
        self.caches: dict[int, Path] = in_rank_order(
            lambda: {fold: ensure_fold_cache(f, self.cache_dir) for fold, f in self.files.items()}
        )

    def cache(self, fold: int) -> Path:
        if fold not in self.caches:
            raise ValueError(f"fold {fold} was not among the folds checked at start-up ({sorted(self.caches)})")
        return self.caches[fold]


class PanNukeDataset(Dataset):
    """Tiles of one or more folds; each item is a dict with `keys` (image HWC uint8, label/inst/type HW) + tissue."""

    def __init__(
        self,
        pannuke: PanNuke,
        folds: int | str | Sequence[int],
        transform: Callable | None = None,
        keys: Sequence[str] = ("image", "label"),
    ) -> None:
        self.keys = tuple(keys)
        self.roots = {fold: pannuke.cache(fold) for fold in as_fold_list(folds)}
        records = []
        for fold, root in self.roots.items():
            tissues = np.load(root / "tissue.npy")
            records += [{"fold": fold, "index": i, "tissue": str(t)} for i, t in enumerate(tissues)]
        self._arrays: dict[int, dict[str, np.ndarray]] = {}
        super().__init__(data=records, transform=transform)

    def tissues(self) -> list[str]:
        return [r["tissue"] for r in self.data]

    def load(self, index: int) -> dict:
        """Copy one tile out of the cache (memory maps are opened lazily, once per worker process)."""
        record = self.data[index]
        if record["fold"] not in self._arrays:
            self._arrays[record["fold"]] = open_fold_cache(self.roots[record["fold"]])
        arrays = self._arrays[record["fold"]]
        return {**record, **{key: np.array(arrays[key][record["index"]]) for key in self.keys}}

    def _transform(self, index: int):
        item = self.load(index)
        return apply_transform(self.transform, item) if self.transform is not None else item

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # memory maps are reopened in each worker, never pickled
        return state
