"""Inference throughput in 256x256 tiles per second: network only, tiled network, post-processing + writing, whole run.

    .venv/bin/python benchmarks/inference_pipeline_speed.py [--device cpu|cuda] [--sw_batch_size 4]
        [--image_size 1024] [--images 2] [--checkpoint bundle/models/model.pt]

1. network:        the bundle's network_def on batches of sw_batch_size tiles (no overlap, no stitching).
2. tiled:          the configured inferer (tiles of 1024 with 64 px of context, one network call per window,
                   stitched on the CPU) on image_size^2 images; tiles/s counts image area / 256^2, so the
                   margins' cost shows.
3. post + write:   the one writer (NucleiInstancesd, the nucleus record and every output file of an image), on
                   network-like probability maps of image_size^2 with PanNuke-like nucleus density
                   (benchmarks/postprocess_speed.py), independent of the weights.
4. whole run:      the bundle's inference evaluator over --images generated PNGs: read, infer, post-process, write.
                   Its post-processing share depends on how many nuclei the weights find: untrained or random
                   weights find few, so step 3 is the figure to trust for that part.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import monai
import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from postprocess_speed import gt_tile, network_like_probs  # noqa: E402
from synthetic_folds import cpu_name  # noqa: E402
from scripts.data.pannuke.demo_data import make_tile  # noqa: E402
from scripts.core.classes import PANNUKE  # noqa: E402
from scripts.workflows.predict.image_outputs import ImageOutputs  # noqa: E402
from scripts.workflows.predict.tile_nuclei import TileNucleiPool  # noqa: E402
from scripts.workflows.predict.writer import NucleiWriterd  # noqa: E402
from scripts.data.pannuke.format import TILE_SIZE  # noqa: E402
from scripts.model.postprocess import NucleiInstancesd  # noqa: E402


def bundle_parser(args: argparse.Namespace, **overrides: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundle" / "configs" / f) for f in ("train.json", "inference.json")])
    settings = {
        "bundle_root": str(ROOT / "bundle"),
        "device": args.device,
        "sw_batch_size": args.sw_batch_size,
        "amp": args.amp,
        "num_workers": 0,
        **overrides,
    }
    for key, value in settings.items():
        parser[key] = value
    return parser


def segment_folder(
    args: argparse.Namespace, network: torch.nn.Module, folder: Path, out: Path, watch: Callable | None = None
) -> tuple[float, ImageOutputs]:
    """The bundle's image inference over `folder` in this process, with `network` already loaded (with or without
    a checkpoint); `watch(engine)` runs after each image.  The seconds it took and the run's outputs."""
    run = bundle_parser(args, input_dir=str(folder), output_dir=str(out), overwrite=True)
    run["handlers"] = [h for h in run["handlers"] if "WeightsLoader" not in str(h)]
    run["network"] = network
    evaluator, writer = run.get_parsed_content("evaluator"), run.get_parsed_content("writer")
    if watch is not None:
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, watch)
    start = time.perf_counter()
    evaluator.run()
    writer.complete()
    return time.perf_counter() - start, run.get_parsed_content("outputs")


def load_network(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    network = bundle_parser(args).get_parsed_content("network_def")
    if args.checkpoint and Path(args.checkpoint).is_file():
        network.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
        weights = args.checkpoint
    else:
        weights = "random init (no checkpoint found)"
    return network.to(args.device).eval(), weights


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: str) -> float:
    """Best of `repeats` seconds for fn() after one warm-up call; the minimum filters out other workers' load."""
    fn()
    best = np.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def he_image(size: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8 mosaic of synthetic H&E tiles."""
    rng = np.random.default_rng(seed)
    n = -(-size // TILE_SIZE)
    rows = [np.concatenate([make_tile(rng)[0] for _ in range(n)], axis=1) for _ in range(n)]
    return np.concatenate(rows)[:size, :size].astype(np.uint8)


def network_like_image_probs(size: int, seed: int) -> tuple[np.ndarray, int]:
    """(7, size, size) probabilities with PanNuke-like density: a mosaic of postprocess_speed's tiles."""
    rng = np.random.default_rng(seed)
    n = -(-size // TILE_SIZE)
    probs = np.zeros((7, n * TILE_SIZE, n * TILE_SIZE), np.float32)
    nuclei = 0
    for r in range(n):
        for c in range(n):
            inst, types = gt_tile(rng)
            nuclei += int(inst.max())
            rows, cols = slice(r * TILE_SIZE, (r + 1) * TILE_SIZE), slice(c * TILE_SIZE, (c + 1) * TILE_SIZE)
            probs[:, rows, cols] = network_like_probs(inst, types, rng)
    return probs[:, :size, :size], nuclei


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sw_batch_size", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3, help="network-only batches per timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--checkpoint", default=str(ROOT / "bundle" / "models" / "model.pt"))
    args = parser.parse_args()
    if args.amp and not args.device.startswith("cuda"):
        parser.error("--amp needs --device cuda")
    network, weights = load_network(args)
    tiles_per_image = args.image_size**2 / TILE_SIZE**2
    dtype = "float16 autocast" if args.amp else "float32"
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_name()
    print(
        f"device {args.device} ({device_name}), {torch.get_num_threads()} CPU threads, {dtype}, "
        f"sw_batch_size {args.sw_batch_size}, weights: {weights}"
    )
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}, "
        f"numpy {np.__version__}"
    )

    def autocast():
        return torch.autocast("cuda", enabled=args.amp)

    batch = torch.rand(args.sw_batch_size, 3, TILE_SIZE, TILE_SIZE, device=args.device)

    def network_only() -> None:
        with torch.no_grad(), autocast():
            for _ in range(args.batches):
                network(batch)

    seconds = timed(network_only, args.repeats, args.device)
    print(f"1. network only:      {args.batches * args.sw_batch_size / seconds:7.2f} tiles/s")

    inferer = bundle_parser(args).get_parsed_content("inferer")
    image = torch.from_numpy(he_image(args.image_size, 0)).permute(2, 0, 1)[None].float().div(255).to(args.device)

    def tiled() -> None:
        with torch.no_grad(), autocast():
            inferer(image, network)

    seconds = timed(tiled, args.repeats, args.device)
    print(
        f"2. tiled network:     {tiles_per_image / seconds:7.2f} tiles/s  ({seconds:.2f} s per "
        f"{args.image_size}^2 image, tiles of {inferer.tile_size} with {inferer.margin} px of context)"
    )

    probs, nuclei = network_like_image_probs(args.image_size, 1)
    rgb = he_image(args.image_size, 1)
    with tempfile.TemporaryDirectory() as tmp:
        instances = NucleiInstancesd("pred", softmax=False)
        writer = NucleiWriterd(TileNucleiPool(instances, PANNUKE), ImageOutputs(tmp, overwrite=True))

        def post_and_write() -> None:
            writer({"pred": torch.from_numpy(probs), "name": "bench", "rgb": rgb})

        seconds = timed(post_and_write, args.repeats, "cpu")
        print(
            f"3. post + write:      {tiles_per_image / seconds:7.2f} tiles/s  ({seconds:.2f} s per image, "
            f"{nuclei / tiles_per_image:.0f} nuclei/tile)"
        )

        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(args.images):
            Image.fromarray(he_image(args.image_size, 10 + i)).save(folder / f"image_{i}.png")
        seconds, outputs = segment_folder(args, network, folder, Path(tmp) / "out")
        found = sum(o.nuclei or 0 for o in outputs.outcomes.values())
        print(
            f"4. whole run:         {args.images * tiles_per_image / seconds:7.2f} tiles/s  "
            f"({seconds / args.images:.2f} s per image, {found / args.images:.0f} nuclei/image found with "
            f"these weights; {outputs.counts()})"
        )


if __name__ == "__main__":
    main()
