"""Run every benchmark, each in its own process, and print one table of the figures that matter.

Sizes follow the device: on a CPU they are small (the figures say whether the code path works and roughly how fast
a CPU is), on a GPU they are what the issue asks to measure.  The full-fold memory benchmark writes 12.5 GB to a
temporary folder; --fold-tiles 200 makes it quick, --skip fold_memory leaves it out.

    .venv/bin/python benchmarks/run_all.py                       # CPU, small sizes
    .venv/bin/python benchmarks/run_all.py --device cuda         # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    args: tuple[str, ...]
    figures: tuple[tuple[str, str], ...]  # (label, regex with one group)


def benchmarks(device: str, fold_tiles: int, threads: int | None) -> list[Benchmark]:
    gpu = device.startswith("cuda")
    torch_threads = ("--threads", str(threads)) if threads else ()
    train = (
        "--device",
        device,
        "--batch-size",
        "16" if gpu else "4",
        "--steps",
        "100" if gpu else "4",
        "--warmup",
        "10" if gpu else "1",
        *torch_threads,
    )
    speed = (
        ("end to end, tiles/s", r"end to end \(data \+ step\):\s+([\d.]+)"),
        ("model-only step, tiles/s", r"model-only step:\s+([\d.]+)"),
        ("end-to-end / model-only", r"end-to-end / model-only:\s+([\d.]+)"),
    )
    network = (
        "--device",
        device,
        "--batch-size",
        "64" if gpu else "4",
        "--steps",
        "50" if gpu else "3",
        *(("--amp", "bf16", "--channels-last") if gpu else ()),
        *torch_threads,
    )
    return [
        Benchmark("train: train.json", "train_speed.py", (*train, "--num-workers", "8" if gpu else "2"), speed),
        Benchmark("train: + train_fast.json", "train_speed.py", (*train, "--config", "train_fast.json"), speed),
        Benchmark(
            "inference: network only",
            "network_speed.py",
            network,
            (("tiles/s", r"network only\):\s+([\d.]+) tiles/s"),),
        ),
        Benchmark(
            "slide: whole slide end to end",
            "slide_speed.py",
            (
                *("--device", device, "--size", "50000" if gpu else "8000"),
                *("--tissue_fraction", "0.05" if gpu else "0.1"),
                *(("--num_workers", "12", "--tiles_per_batch", "8") if gpu else ()),
            ),
            (
                ("256²-tiles/s", r"([\d.]+) tiles of 256²/s"),
                ("s per mm² of tissue", r"([\d.]+) s per mm² of tissue"),
                ("peak RSS, MB", r"peak RSS (\d+) MB"),
            ),
        ),
        Benchmark(
            f"fold_memory: convert {fold_tiles} tiles",
            "fold_conversion_memory.py",
            ("--tiles", str(fold_tiles)),
            (("peak RSS, MB", r"peak RSS: (\d+) MB"), ("conversion, s", r"conversion: ([\d.]+) s")),
        ),
        Benchmark(
            "postprocess: 1 core",
            "postprocess_speed.py",
            ("--tiles", "20"),
            (
                ("instances_from_probabilities, ms/tile", r"instances_from_probabilities: ([\d.]+) ms/tile"),
                ("NucleiInstancesd, ms/tile", r"NucleiInstancesd[^:]*: ([\d.]+) ms/tile"),
            ),
        ),
        Benchmark(
            "score: PanNuke metric",
            "score_fold_speed.py",
            ("--tiles", "2656" if gpu else "256"),
            (
                ("serial, tiles/s", r"serial:.*?([\d.]+) tiles/s"),
                ("parallel, tiles/s", r"parallel:.*?([\d.]+) tiles/s"),
            ),
        ),
    ]


def run(bench: Benchmark) -> tuple[list[tuple[str, str]], str, float, int]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / bench.script), *bench.args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    values = []
    for label, pattern in bench.figures:
        found = re.search(pattern, out)
        values.append((label, found.group(1) if found else "(not found, see log)"))
    return values, out, seconds, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fold-tiles", type=int, default=2656)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for the training/network runs")
    parser.add_argument("--skip", nargs="*", default=[], help="benchmark name prefixes to leave out, e.g. fold_memory")
    parser.add_argument("--verbose", action="store_true", help="print every benchmark's own output too")
    args = parser.parse_args()
    rows, headers = [], []
    for bench in benchmarks(args.device, args.fold_tiles, args.threads):
        if any(bench.name.startswith(prefix) for prefix in args.skip):
            continue
        values, out, seconds, code = run(bench)
        print(f"--- {bench.name}: {seconds:.0f} s, exit {code}", flush=True)
        if args.verbose or code != 0:
            print(out)
        headers += [line for line in out.splitlines() if line.startswith("device:") and line not in headers][:1]
        status = "" if code == 0 else f" (exit {code}: over budget or failed)"
        rows += [(bench.name + status, label, value) for label, value in values]
    print(f"\n{datetime.date.today()}; " + (headers[0] if headers else "device: unknown"))
    width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"| {'benchmark':<{width[0]}} | {'figure':<{width[1]}} | value |")
    print(f"|{'-' * (width[0] + 2)}|{'-' * (width[1] + 2)}|-------|")
    for name, label, value in rows:
        print(f"| {name:<{width[0]}} | {label:<{width[1]}} | {value} |")


if __name__ == "__main__":
    main()
