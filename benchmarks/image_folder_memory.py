"""Memory over a folder of images: the README's image inference on many synthetic H&E images of varying sizes.

    .venv/bin/python benchmarks/image_folder_memory.py [--images 120] [--no_trim] [--checkpoint ...]

The images (500-1500 px a side, cut from one synthetic H&E mosaic) go through the bundle's inference evaluator in
this process, as `inference_pipeline_speed.py`'s whole run does.  Printed: the seconds per image, the resident memory
(VmRSS) after the 10th image, half-way and at the end, and the peak (VmHWM).  `--no_trim` leaves out handing the
heap's free pages back after each image (`scripts/core/memory.trim_heap`), to show what it buys and costs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import inference_pipeline_speed as pipeline  # noqa: E402
import scripts.workflows.predict.tile_nuclei as tile_nuclei  # noqa: E402
from synthetic_folds import cpu_name, status_mb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--no_trim", action="store_true")
    parser.add_argument("--checkpoint", default=str(ROOT / "bundle" / "models" / "pretrained" / "model_fp16.pt"))
    args = parser.parse_args()
    if args.no_trim:
        tile_nuclei.trim_heap = lambda: True
    settings = argparse.Namespace(device="cpu", sw_batch_size=1, amp=False, checkpoint=args.checkpoint)
    network, weights = pipeline.load_network(settings)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        mosaic = pipeline.he_image(1500, 3)
        for i, side in enumerate(rng.integers(500, 1500, size=args.images)):
            field = np.roll(mosaic, 37 * i, axis=0)[:side, : int(side * 0.9)]
            Image.fromarray(field).save(folder / f"image_{i:04d}.png")
        after: list[float] = []
        seconds, _ = pipeline.segment_folder(
            settings, network, folder, Path(tmp) / "out", watch=lambda _: after.append(status_mb("VmRSS"))
        )
    n = len(after)
    peak = status_mb("VmHWM")
    print(f"{cpu_name()}, weights {weights}, heap trimmed after each image: {not args.no_trim}")
    print(
        f"{n} images of 500-1500 px in {seconds:.0f} s ({seconds / n:.2f} s each); RSS after image 10: "
        f"{after[min(9, n - 1)]:.0f} MB, after {n // 2}: {after[n // 2 - 1]:.0f} MB, after {n}: {after[-1]:.0f} MB; "
        f"peak {peak:.0f} MB"
    )


if __name__ == "__main__":
    main()
