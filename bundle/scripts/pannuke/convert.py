"""Convert a lab's images + instance masks (+ optional type masks) into a PanNuke-format fold, or three.

So the bundle can train on a lab's own annotations, this writes exactly what the official PanNuke release holds:

  <output_dir>/Fold K/images/foldK/images.npy   (N, 256, 256, 3) float64, 0-255
  <output_dir>/Fold K/images/foldK/types.npy    (N,) numpy unicode tissue names
  <output_dir>/Fold K/masks/foldK/masks.npy     (N, 256, 256, 6) float64: channels 0-4 = instance ids of each
                                                 PanNuke type (TYPE_NAMES order), channel 5 = 1 where no nucleus

With `--split 0.8,0.1,0.1` instead of `--fold K`, the images are shuffled (`--seed`) and shared out whole into
folds 1, 2 and 3 in those proportions, so that the tiles of one image never straddle two folds; `split.json` beside
the folds records which image went where.  The bundle's defaults (train 1, validate 2, test 3) then train and
evaluate on the lab's folder with only `--dataset_dir`.

Inputs, paired by file stem:
  --images DIR  PNG / JPG / TIFF / NPY RGB images, read by the bundle's one reader (scripts/io/images.py: RGBA on
                white, 16-bit scaled, grayscale refused)
  --masks DIR   PNG / TIFF / NPY instance maps, or NPZ with `inst_map` and optionally `type_map`
  --types DIR   optional per-pixel type maps (PNG / TIFF / NPY, or NPZ with `type_map`); they win over an NPZ type_map

A nucleus's type is the most common non-zero type-map value inside it (0 if it has none). Source type ids go
through --class_map (default: ids 1-5 are already PanNuke order); ids outside the map are dropped, or put in
--unmapped. Dropped nuclei become background in the fold, i.e. the network learns them as "no nucleus".

Example (CoNSeP):
  python scripts/pannuke/convert.py --images consep/images --masks consep/labels --output_dir data/lab \\
      --fold 1 --tissue Colon --class_map "1:Dead,2:Inflammatory,3:Neoplastic,4:Connective"
  python scripts/pannuke/convert.py --images lab/images --masks lab/masks --output_dir data/lab --split 0.8,0.1,0.1
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file (python scripts/pannuke/convert.py): make `scripts` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.errors import DataError
from scripts.io.atomic import umask, write_json
from scripts.io.images import IMAGE_SUFFIXES, WHITE, read_labels, read_rgb
from scripts.pannuke.cache import write_npy_header
from scripts.pannuke.files import FOLDS, fold_folder, fold_paths_inside
from scripts.pannuke.format import NUM_TYPES, TILE_SIZE, TYPE_NAMES

IMAGE_EXTS = (*IMAGE_SUFFIXES, ".npy")
LABEL_EXTS = (".png", ".tif", ".tiff", ".npy", ".npz")


# ---------------------------------------------------------------- arguments


def parse_type_name(name: str) -> int:
    """PanNuke channel (0-based) of a type name, case-insensitive; 'Connective/Soft tissue' is accepted too."""
    key = name.strip().lower().split("/")[0]
    for channel, known in enumerate(TYPE_NAMES):
        if known.lower() == key:
            return channel
    raise DataError(f"unknown PanNuke type {name!r}; use one of {', '.join(TYPE_NAMES)}")


def parse_class_map(text: str | None) -> dict[int, int]:
    """'1:Inflammatory,2:Neoplastic' -> {source id: PanNuke channel}; None -> ids 1..5 are PanNuke order."""
    if not text:
        return {i + 1: i for i in range(NUM_TYPES)}
    mapping: dict[int, int] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        source, sep, name = item.partition(":")
        if not sep or not source.strip().isdigit():
            raise DataError(f"bad --class_map entry {item!r}: write SOURCE_ID:TYPE_NAME, e.g. 2:Inflammatory")
        if int(source) in mapping:
            raise DataError(f"--class_map maps source id {int(source)} twice")
        mapping[int(source)] = parse_type_name(name)
    return mapping


def parse_split(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> three non-negative fractions of the images for folds 1, 2, 3 (normalised to sum 1)."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != len(FOLDS) or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected three fractions for folds 1, 2, 3 such as 0.8,0.1,0.1, got {text!r}"
        )
    total = sum(parts)
    return tuple(x / total for x in parts)  # type: ignore[return-value]


def split_pairs(pairs: list[Pair], split: tuple[float, ...], seed: int) -> dict[int, list[Pair]]:
    """Shuffle whole images (by `seed`) into folds in the proportions `split`; every fold with a share gets one."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    wanted = [fold for fold, share in zip(FOLDS, split, strict=True) if share > 0]
    if len(pairs) < len(wanted):
        raise DataError(f"--split needs at least {len(wanted)} images for folds {wanted}, found {len(pairs)}")
    counts = [int(round(share * len(pairs))) if share > 0 else 0 for share in split]
    for i, fold in enumerate(FOLDS):  # at least one image per fold asked for, taken from the largest
        if fold in wanted and counts[i] == 0:
            counts[int(np.argmax(counts))] -= 1
            counts[i] = 1
    counts[int(np.argmax(counts))] += len(pairs) - sum(counts)  # rounding: the largest fold absorbs the rest
    bounds = np.cumsum([0, *counts])
    return {fold: [pairs[j] for j in sorted(order[bounds[i] : bounds[i + 1]])] for i, fold in enumerate(FOLDS)}


def build_parser() -> argparse.ArgumentParser:
    """All options; see the module docstring for the formats."""
    p = argparse.ArgumentParser(
        prog="convert_to_pannuke",
        description="Convert images + instance masks (+ type masks) into one PanNuke-format fold "
        "(<output_dir>/Fold K/images/foldK/{images,types}.npy, masks/foldK/masks.npy).",
        epilog="example (CoNSeP): --images consep/images --masks consep/labels --output_dir data/lab --fold 1 "
        "--tissue Colon --class_map '1:Dead,2:Inflammatory,3:Neoplastic,4:Connective'",
    )
    p.add_argument("--images", required=True, type=Path, help="folder of RGB images (png, jpg, tif, npy)")
    p.add_argument(
        "--masks",
        required=True,
        type=Path,
        help="folder of instance maps with the images' stems "
        "(png, tif, npy, or npz with inst_map and optional type_map)",
    )
    p.add_argument("--types", type=Path, default=None, help="optional folder of per-pixel type maps (same stems)")
    p.add_argument("--output_dir", required=True, type=Path, help="PanNuke root; the fold goes in '<root>/Fold K'")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--fold", type=int, choices=FOLDS, help="write every tile into this one fold")
    target.add_argument(
        "--split",
        type=parse_split,
        help="share the images out into folds 1, 2, 3 in these proportions, e.g. 0.8,0.1,0.1 "
        "(whole images, so no image straddles two folds)",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for --split (default 0)")
    p.add_argument(
        "--tissue", default="Unknown", help="tissue name stored in types.npy for every tile (default: Unknown)"
    )
    p.add_argument(
        "--class_map",
        default=None,
        help="source type id -> PanNuke type, e.g. "
        "'1:Dead,2:Inflammatory,3:Neoplastic,4:Connective'; default: ids 1-5 are PanNuke order "
        f"({', '.join(TYPE_NAMES)})",
    )
    p.add_argument(
        "--unmapped",
        default=None,
        help="PanNuke type for nuclei whose source type is not in the map "
        "(default: drop them, which makes them background)",
    )
    p.add_argument(
        "--default_type",
        default=None,
        help="PanNuke type for every nucleus of files with no type map (required if some have none)",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=TILE_SIZE,
        help=f"step between tiles, 1..{TILE_SIZE} (default: {TILE_SIZE}; smaller = overlapping tiles)",
    )
    p.add_argument("--skip_empty", action="store_true", help="do not write tiles that contain no nucleus")
    p.add_argument("--skip_bad", action="store_true", help="warn about and skip bad pairs instead of failing")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="add tiles to an existing fold")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing fold")
    return p


@dataclass(frozen=True)
class TypeRules:
    """How source type ids become PanNuke channels (-1 = drop)."""

    class_map: dict[int, int]
    unmapped: int | None
    default: int | None

    def channel(self, source_type: int) -> int:
        """Channel of one source type id."""
        if source_type in self.class_map:
            return self.class_map[source_type]
        return -1 if self.unmapped is None else self.unmapped


def type_rules(args: argparse.Namespace) -> TypeRules:
    """Parse the three type options once, so a typo fails before any file is read."""
    return TypeRules(
        class_map=parse_class_map(args.class_map),
        unmapped=None if args.unmapped is None else parse_type_name(args.unmapped),
        default=None if args.default_type is None else parse_type_name(args.default_type),
    )


# ---------------------------------------------------------------- pairing


@dataclass(frozen=True)
class Pair:
    """One image with its instance mask and optional type mask."""

    image: Path
    mask: Path
    types: Path | None


def _by_stem(folder: Path, exts: tuple[str, ...]) -> dict[str, list[Path]]:
    """Files of the given extensions in a folder, grouped by stem (several per stem = ambiguous)."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in exts:
            found.setdefault(path.stem, []).append(path)
    return found


def find_pairs(images: Path, masks: Path, types: Path | None) -> tuple[list[Pair], list[str], list[Path]]:
    """Pair files by stem; return (pairs, problems naming each bad image, masks that have no image)."""
    image_files = _by_stem(images, IMAGE_EXTS)
    mask_files = _by_stem(masks, LABEL_EXTS)
    type_files = _by_stem(types, LABEL_EXTS) if types is not None else {}
    if not image_files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in {images}")
    pairs, problems = [], []
    for stem, imgs in image_files.items():
        found_masks = mask_files.get(stem, [])
        found_types = type_files.get(stem, [])
        if len(imgs) > 1:
            problems.append(
                f"{imgs[0]}: several images share the stem {stem!r} ({', '.join(p.name for p in imgs)}); "
                "rename or remove all but one"
            )
        elif not found_masks:
            problems.append(f"{imgs[0]}: no mask named {stem}.{{png,tif,tiff,npy,npz}} in {masks}")
        elif len(found_masks) > 1:
            problems.append(f"{imgs[0]}: several masks match ({', '.join(str(p) for p in found_masks)}); keep one")
        elif types is not None and len(found_types) != 1:
            what = "no type mask" if not found_types else "several type masks"
            problems.append(f"{imgs[0]}: {what} named {stem}.* in {types}")
        else:
            pairs.append(Pair(imgs[0], found_masks[0], found_types[0] if found_types else None))
    orphans = [paths[0] for stem, paths in mask_files.items() if stem not in image_files]
    return pairs, problems, orphans


# ---------------------------------------------------------------- reading


def read_label(path: Path, key: str, what: str, required: bool = True) -> np.ndarray | None:
    """A label map from PNG / TIFF / NPY, or array `key` of an NPZ (None if an optional key is absent)."""
    values = read_labels(path, what, key)
    if values is None and required:
        with np.load(path, allow_pickle=False) as npz:
            found = ", ".join(npz.files)
        raise DataError(f"{path}: no {key!r} array in the npz (it has {found})")
    return values


# ---------------------------------------------------------------- typing nuclei


def instance_types(inst: np.ndarray, types: np.ndarray) -> dict[int, int]:
    """Majority non-zero type id inside each instance (0 if the type map is empty there); ties go to the lower id."""
    fg = inst > 0
    ids, inverse = np.unique(inst[fg], return_inverse=True)
    if ids.size == 0:
        return {}
    counts = np.zeros((ids.size, int(types.max(initial=0)) + 1), dtype=np.int64)
    np.add.at(counts, (inverse, types[fg]), 1)
    counts[:, 0] = 0
    majority = np.where(counts.sum(axis=1) > 0, np.argmax(counts, axis=1), 0)
    return dict(zip(ids.tolist(), majority.tolist()))


def channel_map(
    inst: np.ndarray, types: np.ndarray | None, rules: TypeRules, path: Path, dropped: Counter
) -> np.ndarray:
    """(H, W) int8 PanNuke channel per pixel, -1 where there is no (kept) nucleus; counts drops by source type."""
    chan = np.full(inst.shape, -1, dtype=np.int8)
    if types is None:
        if rules.default is None:
            raise DataError(
                f"{path}: no type map (no type_map in the npz and no --types folder); pass "
                "--default_type NAME to put every nucleus in one channel"
            )
        chan[inst > 0] = rules.default
        return chan
    source = instance_types(inst, types)  # ids in ascending order
    lut_ids = np.array(list(source), dtype=np.int64)
    lut_channels = np.array([rules.channel(t) for t in source.values()], dtype=np.int8)
    for src_type, ch in zip(source.values(), lut_channels.tolist()):
        if ch < 0:
            dropped[src_type] += 1
    if lut_ids.size:
        fg = inst > 0
        chan[fg] = lut_channels[np.searchsorted(lut_ids, inst[fg])]
    return chan


# ---------------------------------------------------------------- tiling


def tile_origins(length: int, tile: int = TILE_SIZE, stride: int = TILE_SIZE) -> list[int]:
    """Tile starts covering [0, length); the last one is shifted back to end at the edge instead of padding."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def pad_to_tile(array: np.ndarray, fill: int, tile: int = TILE_SIZE) -> np.ndarray:
    """Pad bottom / right up to one tile where the image is smaller (white image, empty mask)."""
    pad_h, pad_w = max(0, tile - array.shape[0]), max(0, tile - array.shape[1])
    if not pad_h and not pad_w:
        return array
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, constant_values=fill)


@dataclass
class Tile:
    """One 256² tile kept compact (uint8 image, instance ids, channel per pixel) until the fold is written."""

    image: np.ndarray
    inst: np.ndarray
    chan: np.ndarray


def cut_tiles(image: np.ndarray, inst: np.ndarray, chan: np.ndarray, stride: int, skip_empty: bool) -> list[Tile]:
    """All tiles of one image; dropped nuclei are already -1 in chan and become 0 in inst here."""
    inst = np.where(chan >= 0, inst, 0)
    image, inst, chan = pad_to_tile(image, WHITE), pad_to_tile(inst, 0), pad_to_tile(chan, -1)
    tiles = []
    for y in tile_origins(image.shape[0], TILE_SIZE, stride):
        for x in tile_origins(image.shape[1], TILE_SIZE, stride):
            window = (slice(y, y + TILE_SIZE), slice(x, x + TILE_SIZE))
            tile_inst = inst[window]
            if skip_empty and not tile_inst.any():
                continue
            tiles.append(Tile(image[window].copy(), tile_inst.astype(np.uint32), chan[window].copy()))
    return tiles


def tile_masks(tile: Tile) -> np.ndarray:
    """(256, 256, 6) float64 PanNuke mask of one tile: instance ids per type channel, then background."""
    masks = np.zeros((*tile.inst.shape, NUM_TYPES + 1), dtype=np.float64)
    for channel in range(NUM_TYPES):
        masks[..., channel] = np.where(tile.chan == channel, tile.inst, 0)
    masks[..., NUM_TYPES] = tile.inst == 0
    return masks


# ---------------------------------------------------------------- conversion


@dataclass
class Summary:
    """What a run read and wrote, printed at the end."""

    images: int = 0
    tiles: int = 0
    nuclei: Counter = field(default_factory=Counter)  # channel -> nucleus-in-tile occurrences
    dropped: Counter = field(default_factory=Counter)  # source type -> nuclei dropped
    skipped: list[str] = field(default_factory=list)


def convert_pair(pair: Pair, rules: TypeRules, stride: int, skip_empty: bool, dropped: Counter) -> list[Tile]:
    """Read, check and tile one image / mask (/ type mask) triple."""
    image = read_rgb(pair.image)
    inst = read_label(pair.mask, "inst_map", "instance mask")
    sizes = {pair.image: image.shape[:2], pair.mask: inst.shape}
    if pair.types is not None:
        types = read_label(pair.types, "type_map", "type mask")
        sizes[pair.types] = types.shape
    elif pair.mask.suffix.lower() == ".npz":
        types = read_label(pair.mask, "type_map", "type mask", required=False)
        if types is not None and types.shape != inst.shape:
            raise DataError(f"{pair.mask}: inst_map is {inst.shape} but type_map is {types.shape}")
    else:
        types = None
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p} is {s[0]}x{s[1]}" for p, s in sizes.items())
        raise DataError(f"size mismatch: {listed}; image and masks must have the same height and width")
    return cut_tiles(image, inst, channel_map(inst, types, rules, pair.mask, dropped), stride, skip_empty)


def convert_all(pairs: list[Pair], rules: TypeRules, stride: int, skip_empty: bool, summary: Summary) -> list[Tile]:
    """Tile every pair, recording each bad one in summary.skipped instead of stopping at the first."""
    tiles = []
    for pair in pairs:
        try:
            new = convert_pair(pair, rules, stride, skip_empty, summary.dropped)
        except DataError as err:
            summary.skipped.append(str(err))
            continue
        tiles.extend(new)
        summary.images += 1
    return tiles


# ---------------------------------------------------------------- writing


def check_existing_fold(files: dict[str, Path]) -> int:
    """Validate an existing fold for --append and return its tile count; names the file at fault."""
    for path in files.values():
        if not path.is_file():
            raise DataError(
                f"--append: {path} is missing, so this is not a complete PanNuke fold; use --overwrite to replace it"
            )
    try:
        images = np.load(files["images"], mmap_mode="r")
        masks = np.load(files["masks"], mmap_mode="r")
        types = np.load(files["types"], allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(
            f"--append: cannot read the existing fold in {files['images'].parents[2]} ({err}); "
            "use --overwrite to replace it"
        ) from err
    n = images.shape[0]
    expected = {
        files["images"]: (images, (n, TILE_SIZE, TILE_SIZE, 3)),
        files["masks"]: (masks, (n, TILE_SIZE, TILE_SIZE, NUM_TYPES + 1)),
    }
    for path, (arr, shape) in expected.items():
        if arr.shape != shape or arr.dtype != np.float64:
            raise DataError(f"--append: {path} is {arr.shape} {arr.dtype}, expected {shape} float64")
    if types.shape != (n,) or types.dtype.kind not in "US":
        raise DataError(f"--append: {files['types']} is {types.shape} {types.dtype}, expected ({n},) strings")
    return n


TILE_BYTES = TILE_SIZE * TILE_SIZE * (3 + NUM_TYPES + 1) * 8  # one float64 image + mask tile on disk


def check_free_space(root: Path, tiles: int) -> None:
    """Refuse before writing when the fold cannot fit (PanNuke's float64 format is large: 3.7 MB a tile)."""
    need = int(tiles * TILE_BYTES * 1.01) + (1 << 20)
    free = shutil.disk_usage(root).free
    if free < need:
        raise DataError(
            f"{root}: writing {tiles} tiles needs {need / 1e9:.2f} GB, but only {free / 1e9:.2f} GB are free there; "
            "free some space or pass another --output_dir"
        )


def _stream_npy(path: Path, shape: tuple[int, ...], tiles) -> None:
    """Write a float64 .npy tile by tile with plain writes: a full disk is an error naming the file (a memory map
    would die with SIGBUS instead)."""
    try:
        with open(path, "wb") as f:
            write_npy_header(f, np.dtype(np.float64), shape)
            for tile in tiles:
                f.write(np.ascontiguousarray(tile, dtype=np.float64).tobytes())
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DataError(f"{path}: the disk filled up while writing the fold; free space and run again") from None
        raise


def write_fold_arrays(
    target: dict[str, Path], tiles: list[Tile], tissue: str, existing: dict[str, Path] | None
) -> None:
    """Write the three arrays (existing fold's tiles first when appending) without holding them all in memory."""
    old_n = 0 if existing is None else check_existing_fold(existing)
    n = old_n + len(tiles)
    for path in target.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    old_types = np.zeros(0, dtype=str)
    old_images = old_masks = ()
    if existing is not None:  # read one tile at a time: memory stays flat for large folds
        old_images = np.load(existing["images"], mmap_mode="r")
        old_masks = np.load(existing["masks"], mmap_mode="r")
        old_types = np.load(existing["types"], allow_pickle=False).astype(str)
    images = itertools.chain((old_images[i] for i in range(old_n)), (tile.image for tile in tiles))
    masks = itertools.chain((old_masks[i] for i in range(old_n)), (tile_masks(tile) for tile in tiles))
    _stream_npy(target["images"], (n, TILE_SIZE, TILE_SIZE, 3), images)
    _stream_npy(target["masks"], (n, TILE_SIZE, TILE_SIZE, NUM_TYPES + 1), masks)
    np.save(target["types"], np.concatenate([old_types, np.array([tissue] * len(tiles), dtype=str)]).astype(str))


def replace_fold(tmp_fold: Path, final: Path) -> None:
    """Swap the finished temp fold into place; the old fold is only deleted once the new one is in."""
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old")
        if backup.exists():
            shutil.rmtree(backup)
        final.rename(backup)
    try:
        tmp_fold.rename(final)
    except BaseException:
        if backup is not None:
            backup.rename(final)
        raise
    if backup is not None:
        shutil.rmtree(backup)


def write_fold(root: Path, fold: int, tiles: list[Tile], tissue: str, append: bool) -> Path:
    """Write the fold into a temp folder beside it, then rename: a crash never leaves half a fold."""
    final = fold_folder(root, fold)
    root.mkdir(parents=True, exist_ok=True)
    tmp_fold = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    os.chmod(tmp_fold, 0o777 & ~umask())  # mkdtemp makes it private; the fold it becomes is shared like any folder
    try:
        existing = fold_paths_inside(final, fold) if append and final.exists() else None
        write_fold_arrays(fold_paths_inside(tmp_fold, fold), tiles, tissue, existing)
        replace_fold(tmp_fold, final)
    except BaseException:
        shutil.rmtree(tmp_fold, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------- CLI


def target_folds(args: argparse.Namespace) -> tuple[int, ...]:
    return FOLDS if args.split is not None else (args.fold,)


def check_target(args: argparse.Namespace) -> None:
    """Refuse to touch an existing fold unless asked, before any work is done."""
    if args.split is not None and args.append:
        raise DataError("--append adds to one fold: use it with --fold, not with --split")
    if not 1 <= args.stride <= TILE_SIZE:
        raise DataError(f"--stride must be 1..{TILE_SIZE} (a larger step would skip pixels), got {args.stride}")
    for fold in target_folds(args):
        final = fold_folder(args.output_dir, fold)
        if final.exists() and not (args.append or args.overwrite):
            raise DataError(f"{final} already exists; pass --append to add tiles to it or --overwrite to replace it")
        if args.append and final.exists():
            check_existing_fold(fold_paths_inside(final, fold))
        if args.append and not final.exists():
            print(f"note: --append but {final} does not exist yet; creating it")


def print_summary(summary: Summary, written: list[Path], orphans: list[Path]) -> None:
    """Counts a user can sanity-check against their annotation tool."""
    print(f"wrote {', '.join(map(str, written))}")
    print(f"  images converted: {summary.images}, tiles written: {summary.tiles}")
    per_type = ", ".join(f"{TYPE_NAMES[c]} {summary.nuclei[c]}" for c in range(NUM_TYPES))
    print(f"  nuclei per type (a nucleus counts once per tile it appears in): {per_type}")
    if summary.dropped:
        drops = ", ".join(f"source type {t}: {n}" for t, n in sorted(summary.dropped.items()))
        print(f"  dropped nuclei (not in --class_map; now background, use --unmapped to keep them): {drops}")
    if summary.skipped:
        print(f"  skipped {len(summary.skipped)} bad input(s) (see the warning above)")
    for orphan in orphans:
        print(f"  ignored mask with no image: {orphan}")


def count_nuclei(tiles: list[Tile]) -> Counter:
    """Nucleus-in-tile occurrences per PanNuke channel."""
    counts: Counter = Counter()
    for tile in tiles:
        for channel in range(NUM_TYPES):
            counts[channel] += int(np.unique(tile.inst[tile.chan == channel]).size)
    return counts


def run(args: argparse.Namespace) -> Path:
    """Whole conversion: check arguments and targets, read and tile everything, then write the fold(s).

    Every input is read and checked before the first fold is written, so a bad file never leaves some folds new
    and others old.
    """
    rules = type_rules(args)
    check_target(args)
    pairs, problems, orphans = find_pairs(args.images, args.masks, args.types)
    shares = {args.fold: pairs} if args.split is None else split_pairs(pairs, args.split, args.seed)
    summary = Summary(skipped=list(problems))
    tiles = {
        fold: convert_all(fold_pairs, rules, args.stride, args.skip_empty, summary)
        for fold, fold_pairs in shares.items()
    }
    if summary.skipped:
        listed = "\n  ".join(summary.skipped)
        if not args.skip_bad:
            raise DataError(
                f"{len(summary.skipped)} bad input(s), nothing written "
                f"(fix them, or pass --skip_bad to skip them):\n  {listed}"
            )
        warnings.warn(f"--skip_bad: skipped {len(summary.skipped)} bad input(s):\n  {listed}", stacklevel=2)
    empty = [fold for fold, fold_tiles in tiles.items() if not fold_tiles and shares[fold]]
    if not any(tiles.values()) or empty:
        where = f" for fold(s) {empty}" if args.split is not None and any(tiles.values()) else ""
        raise DataError(f"no tiles to write{where} (no valid pairs, or every tile empty with --skip_empty)")
    summary.tiles = sum(len(t) for t in tiles.values())
    summary.nuclei = count_nuclei([tile for fold_tiles in tiles.values() for tile in fold_tiles])
    appended = args.append and fold_folder(args.output_dir, args.fold).exists()
    old_tiles = (
        check_existing_fold(fold_paths_inside(fold_folder(args.output_dir, args.fold), args.fold)) if appended else 0
    )
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    check_free_space(Path(args.output_dir), summary.tiles + old_tiles)  # every fold, before the first is written
    written = [
        write_fold(args.output_dir, fold, fold_tiles, args.tissue, args.append)
        for fold, fold_tiles in tiles.items()
        if fold_tiles
    ]
    print_summary(summary, written, orphans)
    if args.split is None:
        return written[0]
    record = {
        "split": list(args.split),
        "seed": args.seed,
        "folds": {str(fold): [p.image.name for p in fold_pairs] for fold, fold_pairs in shares.items()},
    }
    write_json(Path(args.output_dir) / "split.json", record)
    counts = ", ".join(
        f"fold {fold} {len(fold_pairs)} images / {len(tiles[fold])} tiles" for fold, fold_pairs in shares.items()
    )
    print(f"  split by image: {counts} (split.json)")
    return Path(args.output_dir)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user errors exit with status 2 and a message, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DataError as err:
        print(f"convert_to_pannuke: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
