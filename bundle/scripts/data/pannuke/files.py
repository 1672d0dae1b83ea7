"""Find the PanNuke folds on disk and check their array headers before anything is read.

Two layouts are in use: the official zips (``Fold 1/images/fold1/images.npy``, ``Fold 1/masks/fold1/masks.npy``) and
the Kaggle copy (``Part 1/Images/images.npy``, ``Part 1/Masks/masks.npy``).  Header checks are cheap (a few hundred
bytes per file), so every fold a run needs is checked up front and a broken download fails before any training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.core.errors import DataError
from scripts.core.classes import CLASSES_FILE
from scripts.data.pannuke.format import NUM_TYPES, TILE_SIZE

logger = logging.getLogger(__name__)

LAYOUTS: dict[str, dict[str, str]] = {
    "official": {
        "images": "Fold {k}/images/fold{k}/images.npy",
        "types": "Fold {k}/images/fold{k}/types.npy",
        "masks": "Fold {k}/masks/fold{k}/masks.npy",
    },
    "kaggle": {
        "images": "Part {k}/Images/images.npy",
        "types": "Part {k}/Images/types.npy",
        "masks": "Part {k}/Masks/masks.npy",
    },
}
FOLDS = (1, 2, 3)
DOWNLOAD_HINT = (
    "Download PanNuke from https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke (unzip 'Fold 1', 'Fold 2', 'Fold 3' "
    "into one folder) or the Kaggle copy ('Part 1', 'Part 2', 'Part 3'), and pass that folder as --dataset_dir."
)


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # bytes before the first element
    fortran_order: bool


@dataclass(frozen=True)
class FoldFiles:
    fold: int
    layout: str
    images: Path
    masks: Path
    types: Path

    def sources(self) -> tuple[Path, Path, Path]:
        return (self.images, self.masks, self.types)


def read_npy_header(path: Path) -> NpyHeader:
    """Read a .npy header without mapping the data, and check the file holds every byte the header promises."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e}). Re-download or re-extract it.") from e
    if dtype.hasobject:
        return NpyHeader(tuple(shape), dtype, offset, fortran_order)
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = os.path.getsize(path)
    if actual < expected:
        raise DataError(
            f"{path}: truncated, the header promises shape {tuple(shape)} {dtype} ({expected:,} bytes) but the file "
            f"has {actual:,} bytes. The download or unzip was interrupted: fetch this file again."
        )
    if actual > expected:  # e.g. float64 data under a float32 header: every value would be read wrong
        raise DataError(
            f"{path}: the header promises shape {tuple(shape)} {dtype} ({expected:,} bytes) but the file has "
            f"{actual:,} bytes, so its header does not describe its data (another dtype or shape). Save the array "
            "again with numpy.save."
        )
    return NpyHeader(tuple(shape), dtype, offset, fortran_order)


def load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """The array of a .npy file that holds exactly what its header promises (`read_npy_header`), never unpickled:
    numpy reads only the bytes the header describes, so a file saved as float64 under a float32 header would load
    as other numbers without a word."""
    read_npy_header(path)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # object arrays raise ValueError instead of unpickling
        raise DataError(f"{path}: not a readable numeric .npy array ({err}); save it with np.save") from err


def fold_paths(root: str | os.PathLike, fold: int, layout: str = "official") -> dict[str, Path]:
    """Where one fold's images.npy, types.npy and masks.npy lie under `root` in a layout (the one source of them)."""
    return {key: Path(root) / pattern.format(k=fold) for key, pattern in LAYOUTS[layout].items()}


def fold_folder(root: str | os.PathLike, fold: int, layout: str = "official") -> Path:
    """The top folder of one fold (`Fold K` or `Part K`, with its space), which holds all of its files."""
    return Path(root) / Path(LAYOUTS[layout]["images"].format(k=fold)).parts[0]


def fold_exists(root: str | os.PathLike, fold: int) -> bool:
    """Whether any file of the fold is there, in either layout (an incomplete fold exists, and is refused later)."""
    try:
        return any(fold_folder(root, fold, layout).exists() for layout in LAYOUTS)
    except PermissionError as e:
        raise unreadable(Path(root), root, e) from e


def fold_paths_inside(folder: str | os.PathLike, fold: int, layout: str = "official") -> dict[str, Path]:
    """The fold's files inside its top folder `folder`, wherever that folder is (e.g. a temporary one)."""
    top = fold_folder("", fold, layout)
    return {key: Path(folder) / path.relative_to(top) for key, path in fold_paths("", fold, layout).items()}


def unreadable(path: Path, dataset_dir: str | os.PathLike, error: PermissionError) -> DataError:
    """The one-line refusal for a dataset path behind a folder this account may not read (pathlib raises
    PermissionError there instead of answering)."""
    return DataError(
        f"{path}: cannot be read ({error.strerror}): a folder of the dataset is not readable by this account. Give it "
        f"read access, e.g. chmod -R u+rX '{dataset_dir}', or copy the dataset somewhere you own."
    )


def is_file(path: Path, dataset_dir: Path) -> bool:
    """`path.is_file()`, with an unreadable folder on the way as one line, not a traceback."""
    try:
        return path.is_file()
    except PermissionError as e:
        raise unreadable(path, dataset_dir, e) from e


def find_fold(dataset_dir: Path, fold: int) -> FoldFiles:
    """Locate one fold in either layout; the error lists every path tried."""
    present = [layout for layout in LAYOUTS if is_file(fold_paths(dataset_dir, fold, layout)["images"], dataset_dir)]
    if len(present) > 1:
        logger.warning(
            f"fold {fold} exists in both layouts in {dataset_dir} ({' and '.join(present)}); using the {present[0]} "
            "one. Remove the other copy if it is not the same data."
        )
    tried = []
    for layout in LAYOUTS:
        paths = fold_paths(dataset_dir, fold, layout)
        if is_file(paths["images"], dataset_dir) or is_file(paths["masks"], dataset_dir):
            missing = [str(p) for p in paths.values() if not is_file(p, dataset_dir)]
            if missing:
                raise DataError(
                    f"fold {fold} ({layout} layout) in {dataset_dir} is incomplete, missing: {', '.join(missing)}. "
                    + DOWNLOAD_HINT
                )
            return FoldFiles(fold, layout, paths["images"], paths["masks"], paths["types"])
        tried.append(str(paths["images"]))
    looked = " and ".join(tried)
    raise DataError(f"fold {fold} not found in {dataset_dir}: looked for {looked}. " + DOWNLOAD_HINT)


def check_fold_headers(files: FoldFiles, num_types: int = NUM_TYPES) -> int:
    """Check shapes, dtypes and counts of one fold from the headers alone; returns the number of tiles."""
    images, masks = read_npy_header(files.images), read_npy_header(files.masks)
    types = read_npy_header(files.types)
    _expect_shape(files.images, images, (TILE_SIZE, TILE_SIZE, 3), "(N, 256, 256, 3) RGB tiles")
    channels = num_types + 1
    _expect_shape(
        files.masks,
        masks,
        (TILE_SIZE, TILE_SIZE, channels),
        f"(N, 256, 256, {channels}): {num_types} type channels + background"
        + ("" if num_types == NUM_TYPES else f" (the dataset's {CLASSES_FILE} lists {num_types} classes)"),
    )
    for path, header in ((files.images, images), (files.masks, masks)):
        if header.dtype.kind not in "fiu":
            raise DataError(
                f"{path}: expected a numeric array (PanNuke ships float64), found dtype {header.dtype}. "
                "Re-download the file, or save it with np.save(path, array.astype(np.float64))."
            )
    if types.dtype.kind == "O":
        raise DataError(
            f"{files.types}: the tissue names are stored as a Python object array, which only unpickling can read, "
            "and unpickling a data file can run any code in it, so the bundle never does. If you trust this file, "
            f'convert it once to plain strings: python -c "import numpy as np; p = {str(files.types)!r}; '
            'np.save(p, np.array(np.load(p, allow_pickle=True), dtype=str))"'
        )
    if len(types.shape) != 1 or types.dtype.kind not in "US":
        raise DataError(
            f"{files.types}: expected (N,) tissue names as strings, found shape {types.shape} dtype {types.dtype}."
        )
    counts = {files.images: images.shape[0], files.masks: masks.shape[0], files.types: types.shape[0]}
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"{p} has {n}" for p, n in counts.items())
        raise DataError(f"fold {files.fold}: tile counts differ ({listing}); the three files must match.")
    if images.shape[0] == 0:
        raise DataError(f"{files.images}: holds no tiles.")
    return images.shape[0]


def _expect_shape(path: Path, header: NpyHeader, tail: tuple[int, ...], what: str) -> None:
    if len(header.shape) != 4 or header.shape[1:] != tail:
        raise DataError(f"{path}: expected shape {what}, found {header.shape}.")


def locate_folds(dataset_dir: str | os.PathLike, folds: list[int], num_types: int = NUM_TYPES) -> dict[int, FoldFiles]:
    """Find and header-check every requested fold, logging which layout was found."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"dataset_dir {root} is not a folder. " + DOWNLOAD_HINT)
    found = {}
    for fold in sorted(set(folds)):
        if fold not in FOLDS:
            raise DataError(f"fold {fold} does not exist: PanNuke has folds 1, 2 and 3.")
        files = find_fold(root, fold)
        n = check_fold_headers(files, num_types)
        logger.info(f"PanNuke fold {fold}: {n} tiles, {files.layout} layout, {files.images.parent}")
        found[fold] = files
    return found
