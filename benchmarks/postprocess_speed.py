"""Time post-processing per 256x256 tile on one CPU core, on synthetic but network-like probability maps.

The maps are made from GT-like tiles (clusters of touching ellipses, 30-60 nuclei) turned into the 7-class
training target, then blurred, noised and softmaxed like a network's logits, with some type confusion inside
nuclei.  The script also reports how well the instances are recovered, so a speed-up that breaks the result shows.

    .venv/bin/python benchmarks/postprocess_speed.py [--tiles 20] [--repeats 5]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/torch load: the budget is per core

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import monai  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import skimage  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from skimage.draw import ellipse  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from scripts.pannuke_format import NUM_CLASSES, NUM_TYPES, TILE_SIZE  # noqa: E402
from scripts.postprocess import NucleiInstancesd, instances_from_probabilities  # noqa: E402
from scripts.targets import label_map  # noqa: E402

BUDGET_MS = 5.0


def gt_tile(rng: np.random.Generator, size: int = TILE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Instance and type maps: 30-60 ellipses in clusters, cut along centre bisectors so that neighbours touch."""
    centres: list[np.ndarray] = []
    target = rng.integers(30, 61)
    while len(centres) < target:
        cluster = rng.uniform(12, size - 12, 2)
        for _ in range(rng.integers(1, 7)):
            centre = np.clip(cluster + rng.normal(0, 9, 2), 6, size - 6)
            if len(centres) < target and all(np.hypot(*(c - centre)) >= 8 for c in centres):
                centres.append(centre)
    rows, cols = np.mgrid[:size, :size]
    nearest = np.argmin([np.hypot(rows - r, cols - c) for r, c in centres], axis=0) + 1
    inst = np.zeros((size, size), dtype=np.int32)
    for i, (r, c) in enumerate(centres, start=1):
        rr, cc = ellipse(r, c, rng.uniform(4, 9), rng.uniform(4, 9), shape=inst.shape, rotation=rng.uniform(0, np.pi))
        mine = nearest[rr, cc] == i
        inst[rr[mine], cc[mine]] = i
    types = rng.integers(1, NUM_TYPES + 1, len(centres) + 1)
    types[0] = 0
    return inst, types


def network_like_probs(inst: np.ndarray, types: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blurred, noisy softmax of the training target, with a second, weaker type inside each nucleus."""
    logits = 6.0 * np.eye(NUM_CLASSES, dtype=np.float32)[label_map(inst, types[inst])].transpose(2, 0, 1)
    confusion = rng.integers(1, NUM_TYPES + 1, types.size)
    rows, cols = np.indices(inst.shape)
    logits[confusion[inst], rows, cols] += 3.0 * (inst > 0)
    logits = ndi.gaussian_filter(logits, sigma=(0, 0.7, 0.7)) + rng.normal(0, 1.0, logits.shape).astype(np.float32)
    return torch.softmax(torch.from_numpy(logits), dim=0).numpy()


def recovery(inst: np.ndarray, types: np.ndarray, out: np.ndarray, out_types: np.ndarray) -> tuple[int, int, int]:
    """(GT nuclei, those matched at IoU > 0.5, those matched with the right type) for one tile."""
    ids = np.unique(inst[inst > 0])
    n_gt, n_out = int(inst.max()) + 1, int(out.max()) + 1
    pairs = np.bincount((inst.astype(np.int64) * n_out + out).ravel(), minlength=n_gt * n_out).reshape(n_gt, n_out)
    gt_size, out_size = pairs.sum(1), pairs.sum(0)
    matched = typed = 0
    for i in ids:
        j = pairs[i, 1:].argmax() + 1 if n_out > 1 else 0
        if j and pairs[i, j] / (gt_size[i] + out_size[j] - pairs[i, j]) > 0.5:
            matched += 1
            typed += int(out_types[j] == types[i])
    return len(ids), matched, typed


def time_per_tile(fn, items: list, repeats: int) -> float:
    """Best-of-repeats mean ms per tile: the minimum filters out the other workers sharing the machine."""
    fn(items[0])
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return 1e3 * best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-size", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    tiles = [gt_tile(rng) for _ in range(args.tiles)]
    probs = [network_like_probs(inst, types, rng) for inst, types in tiles]

    def post(p: np.ndarray) -> tuple:
        return instances_from_probabilities(p, min_size=args.min_size)

    transform = NucleiInstancesd(keys="pred", min_size=args.min_size)
    logits = [{"pred": torch.log(torch.from_numpy(p))} for p in probs]
    ms_post = time_per_tile(post, probs, args.repeats)
    ms_transform = time_per_tile(transform, logits, args.repeats)

    counts = np.array([recovery(inst, types, *post(p)[:2]) for (inst, types), p in zip(tiles, probs)]).sum(0)
    print(f"CPU: {cpu_name()} (1 thread); python {platform.python_version()}, numpy {np.__version__}, "
          f"scipy {scipy.__version__}, scikit-image {skimage.__version__}, torch {torch.__version__}, "
          f"monai {monai.__version__}")
    print(f"{args.tiles} tiles {TILE_SIZE}x{TILE_SIZE}, {counts[0] / args.tiles:.1f} nuclei/tile, "
          f"best of {args.repeats} runs")
    print(f"instances_from_probabilities: {ms_post:.2f} ms/tile (budget {BUDGET_MS:.0f} ms)")
    print(f"NucleiInstancesd on torch logits (softmax + maps): {ms_transform:.2f} ms/tile")
    print(f"recovered at IoU>0.5: {counts[1] / counts[0]:.1%} of nuclei, right type: {counts[2] / counts[1]:.1%}")
    sys.exit(0 if ms_post <= BUDGET_MS else 1)


if __name__ == "__main__":
    main()
