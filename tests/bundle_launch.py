"""Start the bundle's configs as real processes: one, several under torchrun, or in the background (to kill it).

Each process gets one OpenMP thread: test runs share two cores with each other, and two threads per process on a
busy machine made a small training run several times slower in our measurements (threads spin-wait).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scripts.workflows.evaluate.official_protocol import bundle_command

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def command(run_id: str, configs: list[str], work: Path, overrides: tuple[str, ...], ranks: int = 1) -> list[str]:
    """`python -m monai.bundle run ...` with every output under `work`; through torchrun when ranks > 1."""
    cmd = bundle_command(
        run_id,
        configs,
        [
            "--ckpt_dir",
            str(work / "models"),
            "--output_dir",
            str(work / "eval"),
            "--cache_dir",
            str(work / "cache"),
            "--num_workers",
            "0",
            *overrides,
        ],
    )
    if ranks == 1:
        return cmd
    launcher = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        "--log-dir",
        str(work / "rank_logs"),
        "--redirects",
        "3",
    ]
    return [cmd[0], *launcher, *cmd[1:]]


def rank_logs(work: Path, ranks: int) -> dict[int, str]:
    """What each torchrun rank printed (stdout and stderr)."""
    logs = work / "rank_logs"
    return {r: "".join(p.read_text() for p in sorted(logs.glob(f"*/attempt_*/{r}/std*.log"))) for r in range(ranks)}


def launch(run_id: str, configs: list[str], work: Path, *overrides: str, ranks: int = 1) -> str:
    """Run to the end and return the log (every rank's, rank by rank); fail with the log's tail on a non-zero exit."""
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        command(run_id, configs, work, overrides, ranks), cwd=work, capture_output=True, text=True, env=ENV, timeout=600
    )
    log = proc.stdout + proc.stderr
    if ranks > 1:
        log = "\n".join(f"===== rank {r} =====\n{text}" for r, text in rank_logs(work, ranks).items()) + "\n" + log
    if proc.returncode != 0:
        raise AssertionError(f"{run_id} {configs} exited with {proc.returncode}:\n{log[-8000:]}")
    return log


def start(run_id: str, configs: list[str], work: Path, *overrides: str) -> subprocess.Popen:
    """Start one process in the background, its output in work/log.txt (so a pipe never fills up and blocks it)."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "log.txt", "w") as log:  # the child keeps its own copy of the file handle
        return subprocess.Popen(
            command(run_id, configs, work, overrides), cwd=work, stdout=log, stderr=subprocess.STDOUT, env=ENV
        )
