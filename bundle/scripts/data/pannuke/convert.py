"""Convert a lab's images + instance masks (+ optional type masks) into a PanNuke-format fold, or three.

So the bundle can train on a lab's own annotations, this writes exactly what the official PanNuke release holds:

  <output_dir>/Fold K/images/foldK/images.npy   (N, 256, 256, 3) float64, 0-255
  <output_dir>/Fold K/images/foldK/types.npy    (N,) numpy unicode tissue names
  <output_dir>/Fold K/masks/foldK/masks.npy     (N, 256, 256, K+1) float64: channels 0..K-1 = instance ids of
                                                 each type (PanNuke's 5 by default), channel K = 1 where no nucleus
  <output_dir>/classes.json                     the type names and colours, when they are not PanNuke's five

With `--split 0.8,0.1,0.1` instead of `--fold K`, the images are shuffled (`--seed`) and shared out whole into
folds 1, 2 and 3 in those proportions, so that the tiles of one image never straddle two folds; `split.json` beside
the folds records which image went where.  The bundle's defaults (train 1, validate 2, test 3) then train and
evaluate on the lab's folder with only `--dataset_dir`.

Inputs, paired by file stem:
  --images DIR       PNG / JPG / TIFF / NPY RGB images, read by the bundle's one reader (scripts/data/images.py: RGBA
                     on white, 16-bit scaled, grayscale refused)
  --masks DIR        PNG / TIFF / NPY instance maps, or NPZ with `inst_map` and optionally `type_map`
  --types DIR        optional per-pixel type maps (PNG / TIFF / NPY, or NPZ with `type_map`); they win over an NPZ
                     type_map
  --annotations DIR  instead of --masks: QuPath "Export objects as GeoJSON" files, `<image stem>.geojson`
                     (scripts/data/pannuke/annotations.py); each object's classification is its class

Classes: PanNuke's five by default.  `--classes A,B` gives the dataset its own list (a lab's classes), written to
classes.json beside the folds so training, scores and every output use those names.  With --annotations and no
--classes, the list is the classification names found, sorted; objects without a classification become one class
("Nucleus") when no object is classified, are refused when others are, or go to `--unclassified NAME`.

A nucleus's type is the most common non-zero type-map value inside it (0 if it has none). Source type ids go
through --class_map (default: ids 1-5 are already PanNuke order); ids outside the map are dropped, or put in
--unmapped. Dropped nuclei become background in the fold, i.e. the network learns them as "no nucleus".

Example (CoNSeP):
  python scripts/data/pannuke/convert.py --images consep/images --masks consep/labels --output_dir data/lab \\
      --fold 1 --tissue Colon --class_map "1:Dead,2:Inflammatory,3:Neoplastic,4:Connective"
  python scripts/data/pannuke/convert.py --images lab/images --masks lab/masks --output_dir data/lab --split 0.8,0.1,0.1
  python scripts/data/pannuke/convert.py --images lab/images --annotations lab/geojson --output_dir data/lab \\
      --split 0.8,0.2,0
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

if __package__ in (None, ""):  # run as a file (python scripts/data/pannuke/convert.py): make `scripts` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from scripts.core.classes import CLASSES_FILE, PANNUKE, NucleusClasses, parse_names, read_dataset_classes
from scripts.core.errors import DataError
from scripts.core.atomic import umask, write_json
from scripts.data.images import IMAGE_SUFFIXES, WHITE, read_labels, read_rgb
from scripts.data.pannuke.cache import write_npy_header
from scripts.data.pannuke.files import FOLDS, fold_folder, fold_paths_inside, load_npy
from scripts.data.pannuke.annotations import UNCLASSIFIED, AnnotationStats, Nucleus, parse_geojson, rasterise
from scripts.data.pannuke.format import TILE_SIZE

IMAGE_EXTS = (*IMAGE_SUFFIXES, ".npy")
LABEL_EXTS = (".png", ".tif", ".tiff", ".npy", ".npz")
GEOJSON_EXTS = (".geojson", ".json")
ALL_UNCLASSIFIED = "Nucleus"  # the one class of annotations that carry no classification at all


# ---------------------------------------------------------------- arguments


def parse_type_name(name: str, classes: NucleusClasses = PANNUKE) -> int:
    """Channel (0-based) of a type name in `classes`, case-insensitive; 'Connective/Soft tissue' is accepted too."""
    key = name.strip().lower()
    for channel, known in enumerate(classes.names):
        if known.lower() in (key, key.split("/")[0]):
            return channel
    what = "PanNuke type" if classes == PANNUKE else "class"
    raise DataError(f"unknown {what} {name!r}; use one of {', '.join(classes.names)} (or set the list with --classes)")


def parse_class_map(text: str | None, classes: NucleusClasses = PANNUKE) -> dict[int, int]:
    """'1:Inflammatory,2:Neoplastic' -> {source id: channel}; None -> ids 1..K are the classes' order."""
    if not text:
        return {i + 1: i for i in range(classes.num_types)}
    mapping: dict[int, int] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        source, sep, name = item.partition(":")
        if not sep or not source.strip().isdigit():
            raise DataError(f"bad --class_map entry {item!r}: write SOURCE_ID:TYPE_NAME, e.g. 2:Inflammatory")
        if int(source) in mapping:
            raise DataError(f"--class_map maps source id {int(source)} twice")
        mapping[int(source)] = parse_type_name(name, classes)
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
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument(
        "--masks",
        type=Path,
        help="folder of instance maps with the images' stems "
        "(png, tif, npy, or npz with inst_map and optional type_map)",
    )
    labels.add_argument(
        "--annotations",
        type=Path,
        help="folder of QuPath GeoJSON exports named <image stem>.geojson (polygons; classification = class)",
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
        "--classes",
        default=None,
        help="the dataset's own class names in order, e.g. 'Tumour,Lymphocyte' (written to classes.json); default: "
        f"PanNuke's ({', '.join(PANNUKE.names)}), or with --annotations the classification names found",
    )
    p.add_argument(
        "--class_map",
        default=None,
        help="source type id -> class name, e.g. "
        "'1:Dead,2:Inflammatory,3:Neoplastic,4:Connective'; default: ids 1..K are the classes' order",
    )
    p.add_argument(
        "--unclassified",
        default=None,
        help="with --annotations: the class for objects without a classification when others have one",
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
    """How source type ids (or annotation class names) become channels of `classes` (-1 = drop)."""

    class_map: dict[int, int]
    unmapped: int | None
    default: int | None
    classes: NucleusClasses = PANNUKE
    unclassified: int | None = None

    def channel(self, source_type: int) -> int:
        """Channel of one source type id."""
        if source_type in self.class_map:
            return self.class_map[source_type]
        return -1 if self.unmapped is None else self.unmapped


def type_rules(args: argparse.Namespace, classes: NucleusClasses) -> TypeRules:
    """Parse the type options once, so a typo fails before any tile is cut."""
    if args.annotations is not None and (args.class_map or args.types or args.default_type or args.unmapped):
        raise DataError(
            "--annotations takes each object's class from its QuPath classification: drop --class_map, --types, "
            "--default_type and --unmapped (use --classes and --unclassified)"
        )
    if args.unclassified is not None and args.annotations is None:
        raise DataError("--unclassified is for --annotations; with --masks use --default_type or --unmapped")
    return TypeRules(
        class_map=parse_class_map(args.class_map, classes),
        unmapped=None if args.unmapped is None else parse_type_name(args.unmapped, classes),
        default=None if args.default_type is None else parse_type_name(args.default_type, classes),
        classes=classes,
        unclassified=None if args.unclassified is None else parse_type_name(args.unclassified, classes),
    )


def annotation_classes(args: argparse.Namespace, parsed: dict[Path, list[Nucleus]]) -> NucleusClasses:
    """The classes of a GeoJSON conversion: --classes, else the names found (sorted), with QuPath's colours."""
    found: dict[str, tuple[int, int, int] | None] = {}
    unclassified: list[Path] = []
    for path, nuclei in parsed.items():
        for nucleus in nuclei:
            if nucleus.name is UNCLASSIFIED:
                unclassified.append(path)
            elif nucleus.name not in found or found[nucleus.name] is None:
                found[nucleus.name] = nucleus.colour
    asked = parse_names(args.classes)
    if asked is None and args.unclassified is not None and args.unclassified not in found:
        found[args.unclassified] = None
    if asked is None and not found:
        print(f"  no object is classified: every object is a nucleus of one class, {ALL_UNCLASSIFIED!r}")
        return NucleusClasses([ALL_UNCLASSIFIED])
    if unclassified and args.unclassified is None and not (asked is None and not found):
        files = sorted({str(p) for p in unclassified})
        raise DataError(
            f"{len(unclassified)} objects have no classification while others are classified ({', '.join(found)}); "
            f"first in {files[0]}. Classify them in QuPath, or pass --unclassified NAME to put them in one class"
        )
    if asked is not None:
        classes = NucleusClasses(asked, _colours_for(asked, found))
        missing = sorted(set(found) - {n for n in asked})
        if missing:
            raise DataError(
                f"the annotations use classes that --classes does not list: {', '.join(missing)}; add them to --classes"
            )
        return classes
    names = sorted(found, key=str.lower)
    return NucleusClasses(names, _colours_for(names, found))


def _colours_for(names, found: dict) -> list | None:
    """QuPath's own colours where every class brought one, else the bundle's palette."""
    colours = [found.get(name) for name in names]
    return colours if all(c is not None for c in colours) and len(set(colours)) == len(colours) else None


def annotation_map(nuclei: list[Nucleus], shape: tuple[int, int], rules: TypeRules) -> tuple[np.ndarray, np.ndarray]:
    """Instance map and per-pixel channel (-1 = none) of one image's annotations."""
    inst, source, stats = rasterise(nuclei, shape)
    channels = np.full(len(source) + 1, -1, dtype=np.int8)
    for k, index in enumerate(source, start=1):
        name = nuclei[index].name
        if name is not UNCLASSIFIED:
            channels[k] = parse_type_name(name, rules.classes)
        else:  # --unclassified, or (no object classified) the one class
            channels[k] = 0 if rules.unclassified is None else rules.unclassified
    return inst, channels[inst], stats


# ---------------------------------------------------------------- pairing


@dataclass(frozen=True)
class Pair:
    """One image with its instance mask (or QuPath GeoJSON) and optional type mask."""

    image: Path
    mask: Path
    types: Path | None

    @property
    def is_geojson(self) -> bool:
        return self.mask.suffix.lower() in GEOJSON_EXTS


def _by_stem(folder: Path, exts: tuple[str, ...]) -> dict[str, list[Path]]:
    """Files of the given extensions in a folder, grouped by stem (several per stem = ambiguous)."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in exts:
            found.setdefault(path.stem, []).append(path)
    return found


def find_pairs(
    images: Path, masks: Path, types: Path | None, mask_exts: tuple[str, ...] = LABEL_EXTS
) -> tuple[list[Pair], list[str], list[Path]]:
    """Pair files by stem; return (pairs, problems naming each bad image, masks that have no image)."""
    image_files = _by_stem(images, IMAGE_EXTS)
    mask_files = _by_stem(masks, mask_exts)
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
            exts = ",".join(e.lstrip(".") for e in mask_exts)
            problems.append(
                f"{imgs[0]}: no {'annotations' if mask_exts == GEOJSON_EXTS else 'mask'} named "
                f"{stem}.{{{exts}}} in {masks}"
            )
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
    return dict(zip(ids.tolist(), majority.tolist(), strict=True))


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
    for src_type, ch in zip(source.values(), lut_channels.tolist(), strict=True):
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


def tile_masks(tile: Tile, num_types: int) -> np.ndarray:
    """(256, 256, K+1) float64 PanNuke mask of one tile: instance ids per type channel, then background."""
    masks = np.zeros((*tile.inst.shape, num_types + 1), dtype=np.float64)
    for channel in range(num_types):
        masks[..., channel] = np.where(tile.chan == channel, tile.inst, 0)
    masks[..., num_types] = tile.inst == 0
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
    annotations: AnnotationStats = field(default_factory=AnnotationStats)
    classes: NucleusClasses = PANNUKE


def convert_pair(
    pair: Pair, rules: TypeRules, stride: int, skip_empty: bool, summary: Summary, parsed: dict[Path, list[Nucleus]]
) -> list[Tile]:
    """Read, check and tile one image / mask (/ type mask) triple, or one image and its GeoJSON annotations."""
    image = read_rgb(pair.image)
    if pair.is_geojson:
        inst, chan, stats = annotation_map(parsed[pair.mask], image.shape[:2], rules)
        summary.annotations.add(stats)
        return cut_tiles(image, inst, chan, stride, skip_empty)
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
    return cut_tiles(image, inst, channel_map(inst, types, rules, pair.mask, summary.dropped), stride, skip_empty)


def convert_all(
    pairs: list[Pair],
    rules: TypeRules,
    stride: int,
    skip_empty: bool,
    summary: Summary,
    parsed: dict[Path, list[Nucleus]] | None = None,
) -> list[Tile]:
    """Tile every pair, recording each bad one in summary.skipped instead of stopping at the first."""
    tiles = []
    for pair in pairs:
        try:
            new = convert_pair(pair, rules, stride, skip_empty, summary, parsed or {})
        except DataError as err:
            summary.skipped.append(str(err))
            continue
        tiles.extend(new)
        summary.images += 1
    return tiles


# ---------------------------------------------------------------- writing


def check_existing_fold(files: dict[str, Path], num_types: int) -> int:
    """Validate an existing fold for --append and return its tile count; names the file at fault."""
    for path in files.values():
        if not path.is_file():
            raise DataError(
                f"--append: {path} is missing, so this is not a complete PanNuke fold; use --overwrite to replace it"
            )
    try:
        images = load_npy(files["images"], mmap_mode="r")
        masks = load_npy(files["masks"], mmap_mode="r")
        types = load_npy(files["types"])
    except (OSError, ValueError, DataError) as err:
        raise DataError(
            f"--append: cannot read the existing fold in {files['images'].parents[2]} ({err}); "
            "use --overwrite to replace it"
        ) from err
    n = images.shape[0]
    expected = {
        files["images"]: (images, (n, TILE_SIZE, TILE_SIZE, 3)),
        files["masks"]: (masks, (n, TILE_SIZE, TILE_SIZE, num_types + 1)),
    }
    for path, (arr, shape) in expected.items():
        if arr.shape != shape or arr.dtype != np.float64:
            raise DataError(f"--append: {path} is {arr.shape} {arr.dtype}, expected {shape} float64")
    if types.shape != (n,) or types.dtype.kind not in "US":
        raise DataError(f"--append: {files['types']} is {types.shape} {types.dtype}, expected ({n},) strings")
    return n


def check_free_space(root: Path, tiles: int, num_types: int) -> None:
    """Refuse before writing when the fold cannot fit (PanNuke's float64 format is large: 3.7 MB a tile)."""
    tile_bytes = TILE_SIZE * TILE_SIZE * (3 + num_types + 1) * 8  # one float64 image + mask tile on disk
    need = int(tiles * tile_bytes * 1.01) + (1 << 20)
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
    target: dict[str, Path], tiles: list[Tile], tissue: str, existing: dict[str, Path] | None, num_types: int
) -> None:
    """Write the three arrays (existing fold's tiles first when appending) without holding them all in memory."""
    old_n = 0 if existing is None else check_existing_fold(existing, num_types)
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
    masks = itertools.chain((old_masks[i] for i in range(old_n)), (tile_masks(tile, num_types) for tile in tiles))
    _stream_npy(target["images"], (n, TILE_SIZE, TILE_SIZE, 3), images)
    _stream_npy(target["masks"], (n, TILE_SIZE, TILE_SIZE, num_types + 1), masks)
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


def write_fold(root: Path, fold: int, tiles: list[Tile], tissue: str, append: bool, num_types: int) -> Path:
    """Write the fold into a temp folder beside it, then rename: a crash never leaves half a fold."""
    final = fold_folder(root, fold)
    root.mkdir(parents=True, exist_ok=True)
    tmp_fold = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    os.chmod(tmp_fold, 0o777 & ~umask())  # mkdtemp makes it private; the fold it becomes is shared like any folder
    try:
        existing = fold_paths_inside(final, fold) if append and final.exists() else None
        write_fold_arrays(fold_paths_inside(tmp_fold, fold), tiles, tissue, existing, num_types)
        replace_fold(tmp_fold, final)
    except BaseException:
        shutil.rmtree(tmp_fold, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------- CLI


def target_folds(args: argparse.Namespace) -> tuple[int, ...]:
    return FOLDS if args.split is not None else (args.fold,)


def check_target(args: argparse.Namespace, num_types: int) -> None:
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
            check_existing_fold(fold_paths_inside(final, fold), num_types)
        if args.append and not final.exists():
            print(f"note: --append but {final} does not exist yet; creating it")


def check_classes(root: Path, classes: NucleusClasses, replacing_all: bool) -> None:
    """Refuse to add folds of other classes beside existing ones (unless --split --overwrite replaces them all)."""
    if replacing_all or not any(fold_folder(root, f).exists() for f in FOLDS):
        return
    existing = read_dataset_classes(root)
    if existing.names != classes.names:
        raise DataError(
            f"{root} holds folds of the classes {list(existing.names)}, but this conversion has "
            f"{list(classes.names)}; pass --classes '{','.join(existing.names)}' "
            "to keep the same list, or convert into another --output_dir"
        )


def write_classes(root: Path, classes: NucleusClasses) -> None:
    """classes.json beside the folds for a lab's own classes; none for PanNuke's five (as PanNuke ships)."""
    path = root / CLASSES_FILE
    if classes == PANNUKE and not path.exists():
        return
    write_json(path, classes.to_json())
    print(f"  classes: {', '.join(classes.names)} ({path})")


def print_summary(summary: Summary, written: list[Path], orphans: list[Path]) -> None:
    """Counts a user can sanity-check against their annotation tool."""
    print(f"wrote {', '.join(map(str, written))}")
    print(f"  images converted: {summary.images}, tiles written: {summary.tiles}")
    names = summary.classes.names
    per_type = ", ".join(f"{names[c]} {summary.nuclei[c]}" for c in range(len(names)))
    print(f"  nuclei per type (a nucleus counts once per tile it appears in): {per_type}")
    if summary.dropped:
        drops = ", ".join(f"source type {t}: {n}" for t, n in sorted(summary.dropped.items()))
        print(f"  dropped nuclei (not in --class_map; now background, use --unmapped to keep them): {drops}")
    for line in summary.annotations.lines():
        print(f"  {line}")
    if summary.skipped:
        print(f"  skipped {len(summary.skipped)} bad input(s) (see the warning above)")
    for orphan in orphans:
        print(f"  ignored mask with no image: {orphan}")


def count_nuclei(tiles: list[Tile], num_types: int) -> Counter:
    """Nucleus-in-tile occurrences per channel."""
    counts: Counter = Counter()
    for tile in tiles:
        for channel in range(num_types):
            counts[channel] += int(np.unique(tile.inst[tile.chan == channel]).size)
    return counts


def run(args: argparse.Namespace) -> Path:
    """Whole conversion: check arguments and targets, read and tile everything, then write the fold(s).

    Every input is read and checked before the first fold is written, so a bad file never leaves some folds new
    and others old.
    """
    annotations = args.annotations is not None
    labels = args.annotations if annotations else args.masks
    pairs, problems, orphans = find_pairs(args.images, labels, args.types, GEOJSON_EXTS if annotations else LABEL_EXTS)
    summary = Summary(skipped=list(problems))
    parsed: dict[Path, list[Nucleus]] = {}
    if annotations:
        for pair in list(pairs):
            try:
                parsed[pair.mask], stats = parse_geojson(pair.mask)
            except DataError as err:
                summary.skipped.append(str(err))
                pairs.remove(pair)
                continue
            summary.annotations.add(stats)
        classes = annotation_classes(args, parsed)
    else:
        asked = parse_names(args.classes)
        classes = PANNUKE if asked is None else NucleusClasses(asked)
    summary.classes = classes
    check_classes(Path(args.output_dir), classes, args.overwrite and args.split is not None)
    rules = type_rules(args, classes)
    check_target(args, classes.num_types)
    shares = {args.fold: pairs} if args.split is None else split_pairs(pairs, args.split, args.seed)
    tiles = {
        fold: convert_all(fold_pairs, rules, args.stride, args.skip_empty, summary, parsed)
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
    k = classes.num_types
    summary.nuclei = count_nuclei([tile for fold_tiles in tiles.values() for tile in fold_tiles], k)
    appended = args.append and fold_folder(args.output_dir, args.fold).exists()
    old_tiles = (
        check_existing_fold(fold_paths_inside(fold_folder(args.output_dir, args.fold), args.fold), k) if appended else 0
    )
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    check_free_space(Path(args.output_dir), summary.tiles + old_tiles, k)  # every fold, before the first is written
    written = [
        write_fold(args.output_dir, fold, fold_tiles, args.tissue, args.append, k)
        for fold, fold_tiles in tiles.items()
        if fold_tiles
    ]
    write_classes(Path(args.output_dir), classes)
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
