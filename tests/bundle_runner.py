"""Run the bundle's real configs through `python -m monai.bundle` in a subprocess, with every output in a temp dir."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scripts.official_protocol import bundle_command


def run_bundle(run_id: str, configs: list[str], work: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = bundle_command(run_id, configs, [
        "--ckpt_dir", str(work / "models"),
        "--output_dir", str(work / "eval"),
        "--cache_dir", str(work / "cache"),
        "--num_workers", "0",
        *overrides,
    ])
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
