"""Network-only inference speed: tiles/s of the bundle's network on synthetic 256x256 batches already on the device.

No data loading and no post-processing (benchmarks/postprocess_speed.py times that): the ceiling an inference run
can reach.  The network is the config's (configs/train.json network_def), in eval mode under inference_mode, with
the AMP dtype and memory format chosen here.

    .venv/bin/python benchmarks/network_speed.py --device cpu --batch-size 4 --steps 5
    .venv/bin/python benchmarks/network_speed.py --device cuda --batch-size 64 --steps 50 --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import monai
import numpy as np
import torch
from monai.bundle import ConfigParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import device_name, synchronize  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def bundle_network(device: torch.device, memory_format: torch.memory_format) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    return parser.get_parsed_content("network_def").to(device, memory_format=memory_format).eval()


def tiles_per_second(network, batch: torch.Tensor, warmup: int, steps: int, amp_dtype) -> float:
    device = batch.device
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            network(batch)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            network(batch)
        synchronize(device)
    return steps * batch.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network first (warm-up compiles)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    network = bundle_network(device, memory_format)
    if args.compile:
        network = torch.compile(network)
    batch = torch.rand(args.batch_size, 3, 256, 256, device=device).contiguous(memory_format=memory_format)
    speed = tiles_per_second(network, batch, args.warmup, args.steps, AMP_DTYPES[args.amp])
    print(
        f"device: {device_name(device)}; python {platform.python_version()}, torch {torch.__version__}, "
        f"monai {monai.__version__}, numpy {np.__version__}"
    )
    dtype = args.amp if AMP_DTYPES[args.amp] else "float32"
    print(
        f"network_def of train.json, batch {args.batch_size}, dtype {dtype}, {str(memory_format).split('.')[-1]}, "
        f"compile {args.compile}; {args.steps} timed batches after {args.warmup}"
    )
    peak = ""
    if device.type == "cuda":
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    print(f"inference (network only): {speed:8.1f} tiles/s, {1e3 / speed:.2f} ms/tile{peak}")


if __name__ == "__main__":
    main()
