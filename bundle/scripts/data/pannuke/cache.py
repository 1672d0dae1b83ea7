"""Convert one PanNuke fold, once, into a compact cache the data loaders can read tile by tile.

A fold is about 12.5 GB of float64; the cache holds the same information in about 1.2 GB (uint8 RGB, uint16
instance map, uint8 type map, tissue names).  The source is read through short-lived
memory maps of a few dozen tiles and the cache is written with plain sequential writes, so peak memory stays near
one chunk whatever the fold size.  Every value check (NaN, integer masks, 0-255 scale) runs during this single pass,
before any training.

A cache is trusted only as far as it can be checked.  `meta.json` records what it was built from (each source's
size, modification and change times, inode and a hash of sampled blocks, so a file swapped in with the same size
and mtime is noticed) and the size and SHA-256 of every cache file.  Opening a cache checks the sizes every time and
the checksums on first use in a process; a cache that is truncated, overwritten, half-built or built from other
sources is rebuilt, with a log line saying why.  A build holds a lock beside the cache (a second run waits for it,
then uses its result) and removes the temporary folders of builds that were killed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from scripts.core.errors import DataError, DiskFullError
from scripts.core.atomic import write_json
from scripts.core.locks import FolderLock
from scripts.data.pannuke.files import FoldFiles, NpyHeader, read_npy_header
from scripts.data.pannuke.format import TILE_SIZE

logger = logging.getLogger(__name__)

MAX_INSTANCE_ID = 2**31 - 1  # any larger id is refused: the relabelling keys (channel, id) in int64
CACHE_VERSION = 3  # 3: no label map (training builds its targets after augmentation); any number of types
BUILD_WAIT_S = 2 * 3600  # how long a run waits for another one building the same cache
SAMPLE_BYTES = 1 << 20
CHUNK_TILES = 32
CACHE_ARRAYS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "image": (np.dtype(np.uint8), (TILE_SIZE, TILE_SIZE, 3)),
    "inst": (np.dtype(np.uint16), (TILE_SIZE, TILE_SIZE)),
    "type": (np.dtype(np.uint8), (TILE_SIZE, TILE_SIZE)),
}


def masks_to_instances(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, K+1) PanNuke mask -> (instance map uint16 with ids 1..N, type map uint8 with 0 = none, 1..K).

    PanNuke ids are unique per channel but neither contiguous nor guaranteed unique across channels, so each
    nucleus is keyed by (channel, id) before relabelling.  Where channels overlap, the later channel wins.
    """
    num_types = masks.shape[-1] - 1
    ids = np.rint(masks[..., :num_types]).astype(np.int64)
    present = ids > 0
    channel = np.where(present.any(-1), num_types - 1 - np.argmax(present[..., ::-1], axis=-1), -1)
    picked = np.take_along_axis(ids, np.maximum(channel, 0)[..., None], axis=-1)[..., 0]
    key = np.where(channel >= 0, (channel + 1) * (int(ids.max()) + 1) + picked, 0)
    inst = np.searchsorted(np.union1d([0], key), key)
    if inst.max() >= np.iinfo(np.uint16).max:
        raise ValueError(f"a tile holds {inst.max()} nuclei, more than the uint16 instance map can store")
    return inst.astype(np.uint16), (channel + 1).astype(np.uint8)


def _source_id(path: Path) -> list:
    """Size, mtime, ctime, inode and a hash of the first, middle and last MiB: cheap, and a swapped file shows."""
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, st.st_size // 2 - SAMPLE_BYTES // 2), max(0, st.st_size - SAMPLE_BYTES)}):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest.hexdigest()[:16]]


def fingerprint(files: FoldFiles) -> dict:
    """What the cache was built from: any change to a source file means a rebuild."""
    sources = {str(p.resolve()): _source_id(p) for p in files.sources()}
    return {"version": CACHE_VERSION, "fold": files.fold, "sources": sources}


def _file_digests(root: Path) -> dict[str, list]:
    names = [f"{key}.npy" for key in CACHE_ARRAYS] + ["tissue.npy"]
    out = {}
    for name in names:
        with open(root / name, "rb") as f:
            digest = hashlib.sha256()
            while block := f.read(1 << 24):
                digest.update(block)
            out[name] = [os.fstat(f.fileno()).st_size, digest.hexdigest()]
    return out


_VERIFIED: set[str] = set()  # caches whose checksums this process has checked


def cache_problem(root: Path, expected: dict) -> str | None:
    """None if the cache at `root` is complete, intact and built from the expected sources; else what is wrong."""
    meta = root / "meta.json"
    if not root.exists():
        return "missing"
    try:
        recorded = json.loads(meta.read_text())
        files = recorded["files"]
    except FileNotFoundError:
        return "has no meta.json (an interrupted build?)"
    except (OSError, ValueError, KeyError, TypeError):
        return "has a damaged meta.json"
    if recorded.get("fingerprint") != expected:
        return "was built from other source files"
    for name, (size, _) in files.items():
        path = root / name
        if not path.is_file():
            return f"lacks {name}"
        if path.stat().st_size != size:
            return f"has {name} of {path.stat().st_size} bytes instead of {size} (truncated or replaced)"
    if str(root) not in _VERIFIED:
        actual = _file_digests(root)
        changed = [name for name in files if actual.get(name, [None, None])[1] != files[name][1]]
        if changed:
            return f"has {', '.join(changed)} changed on disk since it was built (checksum)"
        _VERIFIED.add(str(root))
    return None


def cache_path(files: FoldFiles, cache_dir: str | os.PathLike) -> Path:
    key = hashlib.sha1(str(files.images.resolve()).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"fold{files.fold}-{key}"


def ensure_fold_cache(files: FoldFiles, cache_dir: str | os.PathLike) -> Path:
    """Return the cache folder of a fold, building it first if it is missing, damaged or stale."""
    root = cache_path(files, cache_dir)
    expected = fingerprint(files)
    if cache_problem(root, expected) is None:
        logger.info(f"fold {files.fold}: using cache {root}")
        return root
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with FolderLock(root.with_name(f"{root.name}.lock"), f"the cache {root}").acquire(wait_s=BUILD_WAIT_S):
        problem = cache_problem(root, expected)  # another run may have built it while this one waited
        if problem is None:
            logger.info(f"fold {files.fold}: using cache {root}, built by another run meanwhile")
            return root
        if problem not in ("missing", "was built from other source files"):
            logger.warning(f"fold {files.fold}: the cache {root} {problem}: rebuilding it")
        stale_folders = [*root.parent.glob(f"{root.name}.tmp*"), *root.parent.glob(f"{root.name}.old*")]
        for stale in stale_folders:  # builds killed half-way (the lock is ours now)
            shutil.rmtree(stale, ignore_errors=True)
        build_fold_cache(files, root, expected)
    return root


def build_fold_cache(files: FoldFiles, root: Path, expected: dict) -> None:
    """Convert the fold into a temporary folder beside `root`, record its checksums, then swap it in."""
    logger.info(f"fold {files.fold}: converting {files.images.parent} into the cache {root} (once per fold)")
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        try:
            n, overlapping = convert_fold(files, tmp)
        except OSError as err:
            if err.errno != errno.ENOSPC or isinstance(err, DiskFullError):
                raise
            raise DiskFullError(
                err.errno,
                f"no space left on the disk while building the cache {root} of fold {files.fold} (about 6 bytes a "
                "pixel of the fold's images); free space or pass --cache_dir on a disk with more room",
            ) from err
        if overlapping:
            logger.warning(
                f"fold {files.fold}: {len(overlapping)} tiles have pixels in two type channels of masks.npy (first: "
                f"tile {overlapping[0]}); training sees the later channel there, and per-class PQ scores each class "
                "on its own raw channel, as the official code does"
            )
        meta = {"fingerprint": expected, "tiles": n, "overlap_tiles": overlapping, "files": _file_digests(tmp)}
        write_json(tmp / "meta.json", meta)
        old = root.with_name(f"{root.name}.old{os.getpid()}")
        if root.exists():
            root.rename(old)  # aside first: the new cache moves in with one rename, the old one goes afterwards
        tmp.rename(root)
        shutil.rmtree(old, ignore_errors=True)
        _VERIFIED.add(str(root))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_fold_cache(root: Path) -> dict[str, np.ndarray]:
    """Memory-map a built cache (read-only): tiles are read from disk only when a loader asks for them."""
    arrays = {key: np.load(root / f"{key}.npy", mmap_mode="r") for key in CACHE_ARRAYS}
    arrays["tissue"] = np.load(root / "tissue.npy")
    return arrays


def overlapping_tiles(root: Path) -> set[int]:
    """Tiles of a built cache whose PanNuke mask has a pixel in two type channels (scored from the raw channels)."""
    return set(json.loads((root / "meta.json").read_text()).get("overlap_tiles", []))


def convert_fold(files: FoldFiles, out_dir: Path) -> tuple[int, list[int]]:
    """Single validating pass over one fold, writing the cache arrays chunk by chunk.

    Returns the number of tiles and the tiles whose type channels overlap."""
    images_header, masks_header = read_npy_header(files.images), read_npy_header(files.masks)
    n = images_header.shape[0]
    tissues = load_tissue_names(files.types)
    np.save(out_dir / "tissue.npy", tissues)
    outputs = {key: open(out_dir / f"{key}.npy", "wb") for key in CACHE_ARRAYS}
    overlapping: list[int] = []
    try:
        for key, f in outputs.items():
            dtype, shape = CACHE_ARRAYS[key]
            write_npy_header(f, dtype, (n, *shape))
        with tqdm(total=n, desc=f"fold {files.fold}", unit="tile", mininterval=2.0) as bar:
            for start in range(0, n, CHUNK_TILES):
                stop = min(start + CHUNK_TILES, n)
                images = check_images(read_tiles(files.images, images_header, start, stop), files.images, start)
                masks = check_masks(read_tiles(files.masks, masks_header, start, stop), files.masks, start)
                chunk = convert_chunk(images, masks)
                shared = ((masks[..., :-1] > 0).sum(-1) > 1).any(axis=(1, 2))
                overlapping += (start + np.flatnonzero(shared)).tolist()
                for key, f in outputs.items():
                    f.write(np.ascontiguousarray(chunk[key], dtype=CACHE_ARRAYS[key][0]).tobytes())
                bar.update(stop - start)
    finally:
        for f in outputs.values():
            f.close()
    return n, overlapping


def convert_chunk(images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """float64 tiles -> compact cache arrays for one chunk."""
    out = {"image": np.rint(images).astype(np.uint8)}
    pairs = [masks_to_instances(m) for m in masks]
    out["inst"] = np.stack([p[0] for p in pairs])
    out["type"] = np.stack([p[1] for p in pairs])
    return out


def read_tiles(path: Path, header: NpyHeader, start: int, stop: int) -> np.ndarray:
    """Copy tiles [start, stop) out of a .npy file through a memory map that is dropped right away."""
    if header.fortran_order:  # tiles are strided through the whole file: map it all, copy only the chunk
        mm = np.memmap(path, header.dtype, "r", offset=header.offset, shape=header.shape, order="F")
        try:
            return np.ascontiguousarray(mm[start:stop])
        finally:
            del mm
    tile_bytes = int(np.prod(header.shape[1:])) * header.dtype.itemsize
    offset, shape = header.offset + start * tile_bytes, (stop - start, *header.shape[1:])
    mm = np.memmap(path, header.dtype, "r", offset=offset, shape=shape)
    try:
        return np.array(mm)
    finally:
        del mm


def check_images(images: np.ndarray, path: Path, start: int) -> np.ndarray:
    bad = ~np.isfinite(images)
    if bad.any():
        raise DataError(f"{path}: tile {start + np.argwhere(bad)[0][0]} holds NaN or infinite values.")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 255:
        raise DataError(f"{path}: pixel values must lie in 0-255, found {lo:g}..{hi:g} in tiles {start}+.")
    if 0.0 < hi <= 1.0:  # all zeros (a black padding tile) is not a scale
        raise DataError(
            f"{path}: pixel values lie in 0..{hi:g}, a 0-1 scale; PanNuke images are 0-255. Multiply by 255 and save."
        )
    return images


def check_masks(masks: np.ndarray, path: Path, start: int) -> np.ndarray:
    type_ids = masks[..., :-1]
    if not np.isfinite(type_ids).all():
        raise DataError(f"{path}: tiles {start}+ hold NaN or infinite values in the type channels.")
    if (type_ids < 0).any() or not np.array_equal(type_ids, np.rint(type_ids)):
        raise DataError(
            f"{path}: the type channels must be non-negative integer instance ids, found fractional or negative values "
            f"in tiles {start}+. These are not PanNuke instance masks (were they resized with interpolation?)."
        )
    if type_ids.size and float(type_ids.max()) > MAX_INSTANCE_ID:
        raise DataError(
            f"{path}: an instance id of {float(type_ids.max()):.6g} in tiles {start}+ is beyond {MAX_INSTANCE_ID:,}: "
            "ids that large cannot be told apart exactly (a float64 holds integers exactly only up to 2**53) and "
            "overflow the relabelling. Number each tile's nuclei 1, 2, 3, ..."
        )
    return masks


def load_tissue_names(path: Path) -> np.ndarray:
    """Tissue names as a plain unicode array, never unpickled (check_fold_headers refuses object arrays first).

    Byte strings (an `S` array) are read as UTF-8; bytes that are not UTF-8 text are refused naming the file."""
    names = np.asarray(np.load(path, allow_pickle=False))
    if names.dtype.kind != "S":
        return names.astype(str)
    try:
        return np.array([n.decode("utf-8") for n in names.ravel()], dtype=str).reshape(names.shape)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: tissue name {err.object!r} is not UTF-8 text; save the names as text, e.g. "
            "np.save(path, np.array(names, dtype=str))"
        ) from None


def write_npy_header(f: BinaryIO, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)
