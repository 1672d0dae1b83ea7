"""Lock files that say who holds a folder, so two runs never mix their files in it.

A lock is a small JSON file (pid, host, start time, command) created atomically (written aside, then hard-linked
into place, which fails if the lock exists).  A lock whose process is gone (same host, pid not alive) is stale: it is
removed with a log line and taken over, so a `kill -9` never blocks the next run.  The same process may take its
own lock again.  `FolderLock` either stops at once with a message naming the holder, or waits for it (the fold
cache, which a second run can simply reuse once the first has built it).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from scripts.core.errors import ConfigError
from scripts.core.atomic import require_writable

logger = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class FolderLock:
    """An exclusive lock at `path`.

    Args:
        path: the lock file (e.g. `<ckpt_dir>/.training.lock`).
        what: what the lock protects, for messages ("the training folder models/").
    """

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path, self.what = Path(path), what
        self.held = False
        self.created: list[Path] = []  # folders made for this lock's run, deepest first: removed at release if empty

    def holder(self) -> dict | None:
        """The lock's content, {} if it cannot be read (being written, or damaged), None if there is no lock."""
        try:
            content = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        # anything but what try_acquire writes (another JSON value, no host, a pid that is no process id) is damaged
        pid = content.get("pid") if isinstance(content, dict) else None
        if (
            not isinstance(pid, int)
            or isinstance(pid, bool)
            or not 0 < pid < 2**31
            or not isinstance(content.get("host"), str)
        ):
            return {}
        return content

    def _stale(self, holder: dict) -> bool:
        if not holder:  # unreadable: stale once it is older than a few seconds (a writer needs microseconds)
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except FileNotFoundError:
                return True
        return holder.get("host") == socket.gethostname() and not _alive(holder["pid"])

    def try_acquire(self) -> dict | None:
        """Take the lock; return None on success, else the holder's description."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        me["command"] = " ".join(sys.argv)[:500]
        while True:
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == me["host"]:
                self.held = True
                return None
            if holder is not None and self._stale(holder):
                self._remove_stale(holder)
                continue
            if holder is not None:
                return holder
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(me))
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                continue  # someone was faster: look at their lock
            finally:
                tmp.unlink(missing_ok=True)
            self.held = True
            atexit.register(self.release)
            HELD.append(self)
            return None

    def _remove_stale(self, seen: dict) -> None:
        """Remove the stale lock `seen`, unless another process replaced it meanwhile: the check and the removal
        happen under an flock of a guard file, so two runs taking over one stale lock cannot delete each other's."""
        guard = self.path.with_name(f"{self.path.name}.guard")
        with open(guard, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if self.holder() == seen:
                    damaged = f"removing the damaged lock {self.path}, unchanged for over 10 s"
                    stale = f"removing the stale lock {self.path} of a run that is gone ({_describe(seen)})"
                    logger.warning(stale if seen else damaged)
                    self.path.unlink(missing_ok=True)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def acquire(self, wait_s: float = 0.0, poll_s: float = 2.0) -> FolderLock:
        """Take the lock, waiting up to `wait_s` seconds for its holder; a ConfigError naming the holder otherwise."""
        deadline, announced = time.monotonic() + wait_s, False
        while (holder := self.try_acquire()) is not None:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"{self.what} is in use by another run ({_describe(holder)}; lock {self.path}). Wait for it to "
                    "finish, or give this run another folder. If that run is gone, delete the lock file"
                )
            if not announced:
                logger.info(f"waiting for {_describe(holder)}, which holds {self.what}")
                announced = True
            time.sleep(poll_s)
        return self

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
            _remove_empty(self.created)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


OUTPUT_LOCK = ".outputs.lock"
HELD: list[FolderLock] = []  # locks this process took; released at its exit, or by release_held


def release_held() -> None:
    """Release now every lock this process took: a workflow run inside a longer-lived process (ConfigWorkflow in a
    notebook, or a test) has ended, and the folders it held are free for the next run, whichever process runs it."""
    while HELD:
        HELD.pop().release()


def lock_output_folder(folder: str | os.PathLike) -> FolderLock | None:
    """Hold `<folder>/.outputs.lock` for the rest of this process: a second run writing into the same output folder
    stops at once, naming this one, instead of mixing its files with this run's.  Under torchrun rank 0 holds it for
    the job (each rank is a process of its own, and would find the others' lock); when rank 0 cannot take it, every
    rank stops with its message.

    Args:
        folder: the run's output folder (`@output_dir`).
    """
    from scripts.core.distributed import in_rank_order, is_main_rank  # torch: only where a workflow runs

    take = lambda: _lock_output_folder(Path(folder)) if is_main_rank() else None  # noqa: E731
    return in_rank_order(take, what=f"taking the output folder {folder}")


def _lock_output_folder(folder: Path) -> FolderLock:
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    require_writable(folder, "output_dir")  # a file or a read-only folder there: one message, not an OSError
    lock = FolderLock(folder / OUTPUT_LOCK, f"the output folder {folder}")
    lock.created = created  # removed again at release if the run wrote nothing there
    return lock.acquire()


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a run created for its outputs if it wrote nothing there (it stopped before any work)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _describe(holder: dict) -> str:
    if not holder:
        return "a run whose lock is being written, or a damaged lock"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: {holder.get('command')}"
