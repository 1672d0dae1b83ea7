"""scripts/core/memory.py: memory freed between tiles goes back to the system instead of staying in glibc's
heap, and the per-tile steps trim: reading (DataLoader workers), post-processing (here or in a pool's processes), and
handing a tile to the pool (the main process, when a pool post-processes)."""

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
    from scripts.core.memory import trim_heap

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))

    del_me = np.ones((16 << 20) // 8)
    del del_me
    arrays, live = [], []
    for _ in range(200):
        arrays.append(np.ones((1 << 20) // 8))
        live.append(bytearray(512))
    before = rss_mb()
    arrays.clear()
    if {trim}:
        assert trim_heap()
    print(before - rss_mb())
    """
)


def _returned_mb(trim: bool) -> int:
    code = PROGRAM.format(bundle=str(BUNDLE), trim=trim)
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_arrays_go_back_to_the_system():
    assert _returned_mb(trim=False) < 50  # the heap keeps the 200 MB it no longer uses
    assert _returned_mb(trim=True) > 150


def test_every_tile_read_and_post_processed_trims_the_heap(monkeypatch, tmp_path):
    """The two steps that run once per tile, in whichever process runs them, call it."""
    import numpy as np
    from slide_fixtures import write_slide

    from scripts.core.classes import PANNUKE
    from scripts.workflows.predict import tile_nuclei
    from scripts.workflows.slides import tiles
    from scripts.workflows.slides.plan import SlidePlanner

    calls = []
    monkeypatch.setattr(tiles, "trim_heap", lambda: calls.append("read"))
    monkeypatch.setattr(tile_nuclei, "trim_heap", lambda: calls.append("post-process"))
    write_slide(tmp_path / "s.ome.tif", size=(512, 512), tissue=(0, 0, 512, 512))
    planner = SlidePlanner(tmp_path / "s.ome.tif", tmp_path / "out", tile_size=256, margin=16)
    item = tiles.SlideTiles(planner)[0]
    assert item["image"].shape == (288, 288, 3) and not item["error"]

    class NoNuclei:
        def instances(self, pred):
            return np.zeros(pred.shape[1:], np.int32), np.zeros(1, int), np.zeros(1)

    tile = planner.plans[0].tiles[0]
    nuclei = tile_nuclei.tile_nuclei(NoNuclei(), np.zeros((8, 288, 288), np.float32), tile, PANNUKE, 1, 0.25, 1)
    assert len(nuclei.table["nucleus_id"]) == 0 and nuclei.outlines == []
    assert calls == ["read", "post-process"]


def test_the_post_processing_queue_is_bounded_by_bytes_too(monkeypatch):
    """Predictions waiting for the pool are handed over, oldest first, once they hold more than MAX_PENDING_BYTES,
    even while fewer than twice the workers wait: a folder of large images must not pile up in memory."""
    import threading
    from concurrent.futures import Future

    import numpy as np

    from scripts.core.classes import PANNUKE
    from scripts.model.tiled import Tile
    from scripts.workflows.predict import tile_nuclei

    class HeldPool:  # stands for the process pool: results arrive when the test says
        def __init__(self):
            self.futures = []

        def submit(self, *args):
            self.futures.append(Future())
            return self.futures[-1]

    def queue(limit):
        monkeypatch.setattr(tile_nuclei, "MAX_PENDING_BYTES", limit)
        pool = tile_nuclei.TileNucleiPool(None, PANNUKE, workers=4)
        pool.pool = held = HeldPool()
        tile = Tile(0, (0, 0, 10, 10), (0, 0, 10, 10))
        for key in range(3):
            pool.submit(tile_nuclei.TileJob(key, tile, 1.0, 0.25), np.zeros(1000, np.uint8))
        held.futures[0].set_result("first")
        threading.Timer(0.2, held.futures[1].set_result, ["second"]).start()
        return [job.key for job, _ in pool.finished()], pool.pending_bytes

    assert queue(limit=10**9) == ([0], 2000)  # 3 of 4 x 2 may wait: only what is done
    assert queue(limit=1500) == ([0, 1], 1000)  # 3000 bytes waited: the second is waited for, the third may wait


@pytest.mark.slow
def test_a_pool_whose_worker_died_is_replaced():
    """A killed post-processing process (the kernel's out-of-memory killer) fails the tiles it held; the next tile
    gets a new pool instead of stopping the run with BrokenProcessPool."""
    import os
    import signal

    import numpy as np

    from scripts.core.classes import PANNUKE
    from scripts.model.postprocess import NucleiInstancesd
    from scripts.model.tiled import Tile
    from scripts.workflows.predict import tile_nuclei

    pool = tile_nuclei.TileNucleiPool(NucleiInstancesd("pred", target="boundary"), PANNUKE, workers=1)
    tile = Tile(0, (0, 0, 32, 32), (0, 0, 32, 32))
    pred = np.zeros((7, 32, 32), np.float32)
    pool.submit(tile_nuclei.TileJob("first", tile, 1.0, 0.25), pred)
    assert [job.key for job, future in pool.finished(everything=True) if future.exception() is None] == ["first"]
    for pid in list(pool.pool._processes):
        os.kill(pid, signal.SIGKILL)
    pool.submit(tile_nuclei.TileJob("held", tile, 1.0, 0.25), pred)  # fails if the pool has not noticed yet
    list(pool.finished(everything=True))
    pool.submit(tile_nuclei.TileJob("after", tile, 1.0, 0.25), pred)
    outcome = {job.key: future.exception() for job, future in pool.finished(everything=True)}
    pool.close()
    assert outcome == {"after": None}
