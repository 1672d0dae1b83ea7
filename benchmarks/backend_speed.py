"""CPU inference per network backend: the README's tile inference end to end on real images, then the network alone.

    python benchmarks/backend_speed.py [--images ../shared/data/monuseg_train/images] [--count 14]
        [--backends torch onnxruntime auto ...] [--work /tmp/backend_speed] [--repeats 3] [--skip_network]

1. end to end: the README's inference command (`configs/train.json` + `configs/inference.json`, shipped model) on
   the last --count real 1000² MoNuSeg images, once per --backends entry (alternating), each in a fresh process.
   A warm-up run on one image makes the ONNX export first (cached, as after a user's first run).  Printed per run:
   the per-image seconds of its inference_summary.csv added up (from reading each image to its files written:
   reading, network, post-processing and writing), the whole command's wall time (start-up included), and the
   binary PQ of its instance maps against the truth (mean over images).  The shipped model trained on MoNuSeg
   images 1-27, so the PQ only compares backends; it is not a score of the model.
2. network: tiles of 256² per second of the network with the shipped weights, on batches of 4 x 256² (the sliding
   window's default) and on one 1024² window: eager PyTorch in contiguous memory (the path before the backends),
   PyTorch in channels-last memory (`--backend torch`), OpenVINO (`--backend openvino`, what `auto` picks on a CPU)
   and ONNX Runtime (`--backend onnxruntime`); interleaved, best of --repeats, with the largest difference of each
   from eager PyTorch.  It runs after step 1, so that this process's own thread pools never compete with the
   inference runs.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
sys.path.insert(0, str(BUNDLE))
sys.path.insert(0, str(ROOT / "benchmarks"))
from synthetic_folds import cpu_name  # noqa: E402  (postprocess_speed pins one thread at import)
from scripts.model.backends import InferenceNetwork  # noqa: E402
from scripts.model.weights import load_state_dict_file  # noqa: E402
from scripts.workflows.evaluate.official_protocol import bundle_command  # noqa: E402
from scripts.workflows.evaluate.pq import pq_counts  # noqa: E402

SHIPPED = BUNDLE / "models" / "pretrained" / "model_fp16.pt"
SHARED = ROOT.parent / "shared" / "data"


def shipped_network() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    net = parser.get_parsed_content("network_def").eval()
    load_state_dict_file(net, SHIPPED)
    return net


def network_speed(work: Path, repeats: int) -> None:
    """Tiles of 256² per second for each way of running the network, interleaved so that load affects all alike."""
    plain = shipped_network()
    ways = {
        "pytorch, contiguous": plain,
        "pytorch, channels_last (--backend torch)": InferenceNetwork(shipped_network(), "torch").eval(),
        "openvino (--backend openvino)": InferenceNetwork(shipped_network(), "openvino", str(work)).eval(),
        "onnxruntime (--backend onnxruntime)": InferenceNetwork(shipped_network(), "onnxruntime", str(work)).eval(),
    }
    start = time.perf_counter()
    with torch.no_grad():
        ways["openvino (--backend openvino)"](torch.rand(1, 3, 64, 64))
    print(f"\nONNX export, OpenVINO compile and check: {time.perf_counter() - start:.1f} s")
    for shape in ((4, 3, 256, 256), (1, 3, 1024, 1024)):
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
        tiles = shape[0] * shape[2] * shape[3] / 256**2
        with torch.no_grad():
            reference = plain(x)
            outputs = {name: net(x) for name, net in ways.items()}  # warm-up (and the ONNX export, once)
            best = dict.fromkeys(ways, float("inf"))
            for _ in range(repeats):
                for name, net in ways.items():
                    start = time.perf_counter()
                    net(x)
                    best[name] = min(best[name], time.perf_counter() - start)
        print(f"\nnetwork, input {tuple(shape)} ({tiles:g} tiles of 256²), best of {repeats}:")
        for name in ways:
            diff = float((outputs[name] - reference).abs().max())
            print(f"  {name:45s} {tiles / best[name]:6.1f} tiles/s   max |diff| {diff:.1e}")


def run_inference(images: Path, out: Path, backend: str) -> float:
    """The README's tile inference command in a fresh process; the wall-clock seconds of the whole command."""
    overrides = ["--input_dir", str(images), "--output_dir", str(out), "--backend", backend]
    overrides += ["--ckpt_dir", str(out.parent / "models")]  # every run shares one ONNX export cache
    cmd = bundle_command("run", ["train.json", "inference.json"], overrides)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def per_image_seconds(out: Path) -> float:
    with open(out / "inference_summary.csv", newline="") as f:
        return sum(float(row["seconds"]) for row in csv.DictReader(f) if row["status"] == "done")


def mean_pq(out: Path, names: list[str]) -> float:
    scores = []
    for name in names:
        truth = np.load(SHARED / "monuseg_train" / "labels" / f"{name}.npz")["inst_map"]
        pred = tifffile.imread(out / name / f"{name}_instances.tif")
        scores.append(pq_counts(truth, pred)[2])
    return float(np.mean(scores))


def end_to_end(images_dir: Path, count: int, backends: list[str], work: Path) -> None:
    chosen = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in {".png", ".tif", ".jpg"})[-count:]
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    for path in chosen:
        if not (images / path.name).exists():
            (images / path.name).symlink_to(path.resolve())
    names = [p.stem for p in chosen]
    print(f"\nend to end: the README's tile inference on {len(names)} images of {images_dir} ({names[0]}, ...)")
    warm = work / "warmup-image"  # one image through a CPU runtime first: its export is cached, as after a first run
    warm.mkdir(exist_ok=True)
    if not (warm / chosen[0].name).exists():
        (warm / chosen[0].name).symlink_to(chosen[0].resolve())
    run_inference(warm, work / "warmup", "onnxruntime")
    results: dict[str, list[tuple[float, float, float]]] = {}
    for run, backend in enumerate(backends):
        out = work / f"out-{run}-{backend}"
        wall = run_inference(images, out, backend)
        seconds, pq = per_image_seconds(out), mean_pq(out, names)
        results.setdefault(backend, []).append((seconds, wall, pq))
        print(
            f"  --backend {backend:12s} per-image seconds summed {seconds:6.1f} ({seconds / len(names):.2f} s/image), "
            f"whole command {wall:6.1f} s, binary PQ {pq:.4f}"
        )
    if len(results) >= 2:  # the median run of each backend
        (first, a), (last, b) = list(results.items())[0], list(results.items())[-1]
        a, b = sorted(a)[len(a) // 2], sorted(b)[len(b) // 2]
        print(f"  {last} is {a[0] / b[0]:.2f}x faster per image than {first} (median runs); PQ {b[2] - a[2]:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=SHARED / "monuseg_train" / "images")
    parser.add_argument("--count", type=int, default=14)
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime", "auto"] * 2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/backend_speed"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_network", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, python {platform.python_version()}")
    # the inference runs first, while this process holds no thread pool of its own that could take their cores
    end_to_end(args.images, args.count, args.backends, args.work)
    if not args.skip_network:
        network_speed(args.work / "onnx", args.repeats)


if __name__ == "__main__":
    main()
