"""Peak memory and wall time of converting one full-size PanNuke fold (2,656 tiles, 12.5 GB of float64) into the cache.

The fold is generated chunk by chunk into a temporary folder (free disk is checked first) and deleted afterwards.
The conversion runs in a fresh child process, which reports its own peak resident memory: VmHWM from
/proc/self/status, which counts the file pages it maps as well.  (ru_maxrss is not used: Linux carries it across
exec, so a child started from a big parent reports the parent's size.)  The bundle's budget is 1.5 GB.

    .venv/bin/python benchmarks/fold_conversion_memory.py                # the real thing: about 14 GB of disk
    .venv/bin/python benchmarks/fold_conversion_memory.py --tiles 200    # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_folds import FOLD_TILES, cpu_name, fold_bytes, require_free_disk, status_mb, write_folds  # noqa: E402

BUDGET_MB = 1536
CACHE_BYTES_PER_TILE = 256 * 256 * (3 + 2 + 1 + 1)  # uint8 RGB, uint16 instances, uint8 types, uint8 labels


def convert_in_this_process(dataset_dir: str, cache_dir: str) -> dict:
    """The child's job: import, note the memory, convert fold 1, report."""
    from scripts.data.pannuke.cache import ensure_fold_cache
    from scripts.data.pannuke.files import locate_folds

    after_imports = status_mb("VmRSS")
    files = locate_folds(Path(dataset_dir), [1])[1]
    start = time.perf_counter()
    root = ensure_fold_cache(files, cache_dir)
    seconds = time.perf_counter() - start
    tiles = json.loads((root / "meta.json").read_text())["tiles"]
    return {
        "seconds": seconds,
        "tiles": tiles,
        "rss_after_imports_mb": after_imports,
        "peak_rss_mb": status_mb("VmHWM"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=FOLD_TILES)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the fold is written (default: a temp dir)")
    parser.add_argument("--child", nargs=2, metavar=("DATASET_DIR", "CACHE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(convert_in_this_process(*args.child)))
        return
    work = Path(tempfile.mkdtemp(prefix="fold_memory_", dir=args.work_dir))
    try:
        require_free_disk(work, fold_bytes(args.tiles) + args.tiles * CACHE_BYTES_PER_TILE + 2**30)
        start = time.perf_counter()
        write_folds(work / "data", (args.tiles,))
        written = time.perf_counter() - start
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(work / "data"), str(work / "cache")],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"device: CPU ({cpu_name()}); python {platform.python_version()}, numpy {np.__version__}")
    print(
        f"fold: {args.tiles} tiles, {fold_bytes(args.tiles) / 1e9:.1f} GB float64 on disk "
        f"(written in {written:.0f} s, deleted afterwards); dtype float64 -> uint8/uint16 cache; chunk 32 tiles"
    )
    print(f"conversion: {result['seconds']:.1f} s, {result['tiles'] / result['seconds']:.1f} tiles/s")
    print(
        f"peak RSS: {result['peak_rss_mb']:.0f} MB (VmHWM of the converting process; "
        f"{result['rss_after_imports_mb']:.0f} MB of it after imports), budget {BUDGET_MB} MB"
    )
    sys.exit(0 if result["peak_rss_mb"] <= BUDGET_MB else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
    main()
