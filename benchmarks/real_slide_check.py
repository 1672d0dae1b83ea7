"""A real scanner's slide through the README's whole-slide command, checked against tile inference on its pixels.

    .venv/bin/python benchmarks/real_slide_check.py SLIDE [SLIDE ...] [--mpp 0.5] [--work /tmp/real_slides]
    .venv/bin/python benchmarks/real_slide_check.py --field IMAGE.png [IMAGE.png ...] [--mpp 0.25] [--tile_size 512]

`--field` turns real H&E images (e.g. 1000² MoNuSeg fields at 40x) into pyramidal OME-TIFF slides at `--mpp` µm/px
first, so the same pixels go through both workflows.  A field no larger than one tile's window is one window, the
whole image; `--tile_size 512` cuts it into tiles, so the seams between tiles are checked on real tissue too.

Each slide runs through configs/inference_wsi.json exactly as the README says.  The same slide is then read whole at
the model's 0.25 µm/px by the bundle's own reader (so a 20x slide is upsampled the same way), saved as a PNG and run
through tile inference; the nuclei both find on the region the slide workflow processed (the cores of its tiles, as
its planner lays them) should agree within 2 %, with the same CSV columns and matched centroids a median of at most
0.5 px apart.  The slide's GeoJSON is also checked against
the rules QuPath's reader applies (closed rings, level-0 pixel bounds, a detection with a named, coloured class).
Printed: the reader, the slide's µm/px, the level read, tissue area, tiles, both counts and their difference,
vertices and bytes per nucleus, and the seconds taken, with the machine.  Only slides up to 100 Mpx at the model's
scale can be compared whole; larger ones get the slide run alone.  No slide is committed: pass your own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from synthetic_folds import cpu_name  # noqa: E402  (postprocess_speed pins one thread at import)
from scripts.data.pannuke.format import TYPE_COLOURS, TYPE_NAMES  # noqa: E402
from scripts.workflows.slides.plan import SlidePlanner  # noqa: E402
from scripts.workflows.slides.reader import find_slides, open_slide, slide_name  # noqa: E402

MAX_WHOLE_PX = 100_000_000
WSI = ("train.json", "inference.json", "inference_wsi.json")
TILES = ("train.json", "inference.json")


def bundle(configs: tuple[str, ...], *overrides: str) -> float:
    """Run the bundle's `run` workflow with these configs; the seconds it took."""
    files = ",".join(repr(str(ROOT / "bundle" / "configs" / c)) for c in configs)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"[{files}]"]
    cmd += ["--bundle_root", str(ROOT / "bundle"), *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT / "bundle")
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def qupath_problems(features: list[dict], width: int, height: int) -> list[str]:
    """What QuPath's GeoJSON reader would refuse or misplace in these detections."""
    problems = []
    for i, f in enumerate(features):
        ring = f["geometry"]["coordinates"][0]
        props = f["properties"]
        name = props.get("classification", {}).get("name")
        if f["geometry"]["type"] != "Polygon" or ring[0] != ring[-1] or len(ring) < 4:
            problems.append(f"feature {i}: not a closed polygon")
        elif not all(0 <= x <= width and 0 <= y <= height for x, y in ring):
            problems.append(f"feature {i}: outside the slide's level-0 pixels")
        if props.get("objectType") != "detection" or name not in TYPE_NAMES:
            problems.append(f"feature {i}: not a typed detection")
        elif props["classification"].get("color") != list(TYPE_COLOURS[TYPE_NAMES.index(name)]):
            problems.append(f"feature {i}: colour does not match its type")
    return problems


def csv_centroids(path: Path, input_px_per_model_px: float) -> tuple[str, np.ndarray]:
    """The CSV's header and its (n, 2) centroids (x_px, y_px), in model pixels."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    xy = np.array([[float(r[1]), float(r[2])] for r in rows[1:]]).reshape(-1, 2)
    return ",".join(rows[0]), xy / input_px_per_model_px


def field_as_slide(image: Path, slide: Path, mpp: float, compression: str) -> Path:
    """A real image written as a 3-level pyramidal OME-TIFF at `mpp` µm/px, in 256² tiles: JPEG as scanners write,
    or zlib to give both workflows exactly the same pixels."""
    import tifffile

    pixels = np.asarray(Image.open(image).convert("RGB"))
    slide.parent.mkdir(parents=True, exist_ok=True)
    options = dict(tile=(256, 256), compression=compression, photometric="rgb")
    with tifffile.TiffWriter(slide, bigtiff=True, ome=True) as tif:
        metadata = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
        resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        tif.write(pixels, subifds=2, metadata=metadata, **resolution, **options)
        for level in (1, 2):
            tif.write(np.ascontiguousarray(pixels[:: 2**level, :: 2**level]), subfiletype=1, **options)
    return slide


def in_cores(points: np.ndarray, cores: list[tuple[int, int, int, int]]) -> np.ndarray:
    inside = np.zeros(len(points), bool)
    for x, y, w, h in cores:
        inside |= (points[:, 0] >= x) & (points[:, 0] < x + w) & (points[:, 1] >= y) & (points[:, 1] < y + h)
    return inside


def check(path: Path, work: Path, mpp: float | None, tile_size: int | None) -> None:
    extra = ["--mpp", str(mpp)] if mpp is not None else []
    extra += ["--tile_size", str(tile_size)] if tile_size is not None else []
    out = work / "slide_out"
    seconds = bundle(WSI, "--input_dir", str(path), "--output_dir", str(out), "--overwrite", "true", *extra)
    stem = slide_name(find_slides(path)[0])  # a DICOM slide is named after its folder
    summary = json.loads((out / stem / f"{stem}_summary.json").read_text())
    geojson = out / stem / f"{stem}_nuclei.geojson"
    features = json.loads(geojson.read_text())["features"]
    slide = open_slide(find_slides(path)[0], mpp)
    width, height = slide.handle.level_dimensions[0]
    problems = qupath_problems(features, width, height)
    vertices = np.mean([len(f["geometry"]["coordinates"][0]) for f in features]) if features else 0.0
    print(
        f"{path.name}: {width} x {height} px at {summary['mpp']:g} µm/px ({summary['reader']}), level "
        f"{summary['level_read']} read, {summary['tissue_mm2']:.2f} mm² of tissue in {summary['tiles']} tiles"
    )
    print(
        f"  slide workflow: {summary['nuclei']} nuclei in {seconds:.0f} s; {vertices:.1f} vertices and "
        f"{geojson.stat().st_size / max(1, len(features)):.0f} bytes a nucleus; QuPath rules: "
        f"{'all met' if not problems else f'{len(problems)} problems, first: {problems[0]}'}"
    )
    print(f"  types: {summary['nuclei_per_type']}")
    mw, mh = slide.model_size
    if mw * mh > MAX_WHOLE_PX:
        print(f"  tile inference: skipped, {mw} x {mh} model pixels is too large to read whole")
        return
    png = work / "png" / f"{stem}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(slide.read(0, 0, mw, mh)).save(png)
    tile_out = work / "tile_out"
    common = ("--output_dir", str(tile_out), "--overwrite", "true", "--max_pixels", str(mw * mh))
    seconds = bundle(TILES, "--input_dir", str(png.parent), *common)
    tile_header, tile_xy = csv_centroids(tile_out / stem / f"{stem}_nuclei.csv", 1.0)
    slide_header, slide_xy = csv_centroids(out / stem / f"{stem}_nuclei.csv", slide.scale)
    grid = {"tile_size": tile_size} if tile_size is not None else {}
    planner = SlidePlanner(path, work / "plan", mpp=mpp, overwrite=True, **grid)  # the run's tiles
    cores = [t.core for t in planner.plans[0].tiles]
    tile_xy, slide_xy = tile_xy[in_cores(tile_xy, cores)], slide_xy[in_cores(slide_xy, cores)]
    tile_count, slide_count = len(tile_xy), len(slide_xy)
    diff = (slide_count - tile_count) / max(1, tile_count)
    print(
        f"  tile inference on the same pixels ({mw} x {mh} at 0.25 µm/px): {tile_count} nuclei in the processed "
        f"tiles in {seconds:.0f} s against the slide's {slide_count}: difference {diff:+.2%} "
        f"({'within' if abs(diff) <= 0.02 else 'OUTSIDE'} the 2 % goal)"
    )
    from scipy.spatial import cKDTree

    distance = cKDTree(tile_xy).query(slide_xy)[0] if tile_count and slide_count else np.array([np.nan])
    print(
        f"  CSV columns: {'the same' if tile_header == slide_header else 'DIFFERENT'}; centroid of each slide "
        f"nucleus to the nearest tile nucleus: median {np.median(distance):.3f} model px, "
        f"{np.mean(distance <= 2):.1%} within 2 px"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slides", nargs="*", type=Path)
    parser.add_argument("--field", type=Path, nargs="*", default=[], help="real H&E images to check as slides")
    parser.add_argument("--compression", default="jpeg", choices=("jpeg", "zlib"), help="of the --field slide")
    parser.add_argument("--mpp", type=float, default=None, help="µm/px for slides that do not record it")
    parser.add_argument("--tile_size", type=int, default=None, help="the slide workflow's tile core (default 1024)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/real_slides"))
    args = parser.parse_args()
    import torch

    print(f"machine: CPU ({cpu_name()}), torch {torch.__version__}")
    mpp = 0.25 if args.mpp is None else args.mpp
    for field in args.field:
        args.slides.append(field_as_slide(field, args.work / "field" / f"{field.stem}.ome.tif", mpp, args.compression))
    for path in args.slides:
        check(path.resolve(), args.work / path.stem, args.mpp, args.tile_size)


if __name__ == "__main__":
    main()
