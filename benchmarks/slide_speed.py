"""Whole-slide throughput and memory: a synthetic 40x pyramidal slide through configs/inference_wsi.json.

    .venv/bin/python benchmarks/slide_speed.py [--size 50000] [--tissue_fraction 0.05] [--device cpu|cuda]
        [--num_workers 2] [--tiles_per_batch 1] [--keep /path/to/slide.tif]

The slide is written with tifffile (BigTIFF, 256² JPEG tiles, 3 pyramid levels, 0.25 µm/px): glass everywhere but a
centred block holding `tissue_fraction` of the area, made of the demo generator's H&E-like tiles.  The bundle's
real command then runs on it in a subprocess; printed: tiles/s (model tiles of tile_size², and 256² equivalents),
seconds per mm² of tissue, and the peak RSS of the run (the largest of its processes, DataLoader workers included).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from synthetic_folds import cpu_name  # noqa: E402  (postprocess_speed pins one thread at import)
from scripts.data.pannuke.demo_data import make_tile  # noqa: E402
from scripts.workflows.evaluate.official_protocol import bundle_command  # noqa: E402

GLASS, TILE = 242, 256


def tissue_box(size: int, fraction: float) -> tuple[int, int, int, int]:
    side = int(round(size * fraction**0.5 / TILE)) * TILE
    start = (size - side) // 2 // TILE * TILE
    return start, start, start + side, start + side


def write_slide(path: Path, size: int, fraction: float, mpp: float = 0.25, levels: int = 3) -> float:
    """Write the pyramid tile by tile (never the whole level in memory); returns the tissue area in mm²."""
    x0, y0, x1, y1 = tissue_box(size, fraction)
    rng = np.random.default_rng(0)
    library = [np.rint(make_tile(rng)[0]).astype(np.uint8) for _ in range(32)]
    glass = np.full((TILE, TILE, 3), GLASS, np.uint8)

    def tiles(level: int):
        step = 2**level
        n = -(-size // step // TILE)
        for r in range(n):
            for c in range(n):
                x, y = (c + 0.5) * TILE * step, (r + 0.5) * TILE * step  # the tile's centre, in level-0 pixels
                inside = x0 <= x < x1 and y0 <= y < y1
                yield library[(r * 7 + c * 13) % len(library)][::1, ::1] if inside else glass

    options = dict(tile=(TILE, TILE), compression="jpeg", photometric="rgb", dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        n0 = -(-size // TILE) * TILE
        metadata = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
        tif.write(tiles(0), shape=(n0, n0, 3), subifds=levels - 1, metadata=metadata, **res, **options)
        for level in range(1, levels):
            n = -(-size // 2**level // TILE) * TILE
            tif.write(tiles(level), shape=(n, n, 3), subfiletype=1, **options)
    return (x1 - x0) * (y1 - y0) * (mpp / 1000) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=50000, help="slide side in level-0 pixels")
    parser.add_argument("--tissue_fraction", type=float, default=0.05)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", help="the network backend: auto, torch, openvino or onnxruntime")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--tiles_per_batch", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="write (or reuse) the slide here")
    parser.add_argument("--log", type=Path, default=None, help="the bundle run's output (default: the temp folder)")
    args, extra = parser.parse_known_args()  # anything else goes to the bundle, e.g. --tile_margin 32
    work = Path(tempfile.mkdtemp(prefix="slide_speed_"))
    slide = args.keep or work / "slides" / "synthetic.ome.tif"
    slide.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tissue = (
        write_slide(slide, args.size, args.tissue_fraction)
        if not slide.exists()
        else tissue_box(args.size, args.tissue_fraction)
    )
    if not isinstance(tissue, float):
        x0, y0, x1, y1 = tissue
        tissue = (x1 - x0) * (y1 - y0) * (0.25 / 1000) ** 2
    print(
        f"slide: {args.size} x {args.size} px at 0.25 µm/px, {slide.stat().st_size / 1e6:.0f} MB on disk, "
        f"{tissue:.1f} mm² of tissue ({args.tissue_fraction:.0%}), ready in {time.perf_counter() - start:.0f} s"
    )
    overrides = [
        "--input_dir",
        str(slide),
        "--output_dir",
        str(work / "out"),
        "--device",
        f"$torch.device('{args.device}')",
        "--num_workers",
        str(args.num_workers),
        "--tiles_per_batch",
        str(args.tiles_per_batch),
        "--amp",
        str(args.device.startswith("cuda")),
        "--backend",
        args.backend,
        "--ckpt_dir",
        str(work / "models"),
        "--overwrite",
        "true",
        *extra,
    ]
    cmd = bundle_command("run", ["train.json", "inference.json", "inference_wsi.json"], overrides)
    start = time.perf_counter()
    log = args.log or work / "run.log"
    print(f"the run's log: {log}", flush=True)
    with open(log, "w") as out:  # as it runs, so a run stopped by a time limit still leaves it
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        print(Path(log).read_text()[-3000:])
        sys.exit(1)
    summary = json.loads(next((work / "out").glob("*/*_summary.json")).read_text())
    tiles, tile_px = summary["tiles"], 1024
    import torch

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({cpu_name()})"
    print(f"device: {device}; backend {args.backend}; python {platform.python_version()}, torch {torch.__version__}")
    print(f"run: {seconds:.1f} s end to end (open, tissue, read, network, post-processing, writing)")
    print(
        f"  {tiles} tiles of {tile_px}² -> {tiles / seconds:.2f} tiles/s, "
        f"{tiles * (tile_px / 256) ** 2 / seconds:.1f} tiles of 256²/s"
    )
    print(
        f"  {seconds / tissue:.2f} s per mm² of tissue ({tissue:.1f} mm² made, {summary['tissue_mm2']:.1f} mm² found)"
    )
    print(f"  {summary['nuclei']} nuclei; peak RSS {peak_mb:.0f} MB (largest process of the run)")


if __name__ == "__main__":
    main()
