"""scripts/slides/memory.py: memory freed between tiles goes back to the system instead of staying in glibc's heap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"

# after one 16 MB array is freed glibc serves 1 MB arrays from its heap; small live objects between them keep the
# heap from shrinking when they are freed, as a run's state does between tiles
PROGRAM = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {bundle!r})
    from scripts.slides.memory import return_freed_memory

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))

    if {fixed}:
        assert return_freed_memory()
    del_me = np.ones((16 << 20) // 8)
    del del_me
    arrays, live = [], []
    for _ in range(200):
        arrays.append(np.ones((1 << 20) // 8))
        live.append(bytearray(512))
    before = rss_mb()
    arrays.clear()
    print(before - rss_mb())
    """
)


def _returned_mb(fixed: bool) -> int:
    code = PROGRAM.format(bundle=str(BUNDLE), fixed=fixed)
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_arrays_go_back_to_the_system():
    assert _returned_mb(fixed=False) < 50  # the heap keeps the 200 MB it no longer uses
    assert _returned_mb(fixed=True) > 150
