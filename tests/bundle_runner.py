"""Run the bundle's real configs through `python -m monai.bundle` in a subprocess, with every output in a temp dir.

Unlike `bundle_launch.launch`, a failed run can be returned rather than raised (check=False), for the tests that
expect a run to fail with a given message.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bundle_launch import ENV, command


def run_bundle(
    run_id: str, configs: list[str], work: Path, *overrides: str, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = command(run_id, configs, work, overrides)
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=ENV, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
