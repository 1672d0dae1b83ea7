"""The one way the bundle writes a file: complete or not at all.

Every output (weights, training state, scores, tables, label maps, GeoJSON, CSV, overlays, caches' metadata) goes
through `atomic_write`: the content is written to a temporary file in the target's folder, flushed to disk, given the
permissions the user's umask allows, and renamed over the target in one step, then the folder entry itself is
flushed.  A reader, a crash or a full disk sees the old file or the new one, never half of one, and a failed write
leaves no temporary behind.  `json_text` is the one JSON encoder: NaN and infinity become null (JSON has neither),
numpy and torch scalars become numbers, paths become strings.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from scripts.core.errors import ConfigError, DiskFullError

PathLike = str | os.PathLike


def umask() -> int:
    """The process's umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it onto `path` (all or nothing).

    The temporary name ends with the target's name, so writers that pick the format from the extension (nibabel's
    .nii.gz) still work.  A full disk is reported as an OSError naming `path`.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{path.name}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; outputs are shared like any file the user writes
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            message = f"no space left on the disk while writing {path}; free space and rerun"
            raise DiskFullError(err.errno, message) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def require_writable(folder: PathLike, option: str) -> Path:
    """Create `folder` if needed and prove a file can be written in it, before any long work; a ConfigError otherwise.

    Args:
        folder: the output folder.
        option: the config id that names it (ckpt_dir, output_dir), for the message.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"--{option} {folder} cannot be written ({err.strerror or err}); pass --{option} with a folder you can "
            "write, or fix its permissions"
        ) from None
    return folder


def leaves(root: PathLike, path: PathLike) -> bool:
    """True when writing at `path` would land outside the folder `root`: `path`, or a folder between them, is a
    symbolic link, or `path` resolves elsewhere.  Output names are safe (`safe_name`); a link someone placed inside
    an output folder is what this catches."""
    root, path = Path(root).absolute(), Path(path).absolute()
    if root not in (path, *path.parents):
        return True
    step = path
    while step != root:
        if step.is_symlink():
            return True
        step = step.parent
    return not path.resolve().is_relative_to(root.resolve())


def require_inside(root: PathLike, folder: PathLike, error: type[Exception]) -> None:
    """Raise `error` (the caller's kind of failure) when writing in `folder` would leave the output folder `root`."""
    if leaves(root, folder):
        raise error(
            f"{folder} is a symbolic link out of --output_dir {root}: nothing is written through it; remove the link "
            "or choose another --output_dir"
        )


def fsync_folder(folder: PathLike) -> None:
    """Make a rename in `folder` durable (a power cut right after os.replace could otherwise undo it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: PathLike, text: str, overwrite: bool = True) -> Path:
    """Atomically write UTF-8 text (newlines as given)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""), overwrite)


def safe_name(name: str) -> str:
    """A name for an output folder or file prefix that stays inside the output folder: no path separator, no NUL,
    and nothing that is only dots or starts with a dot (a file named `...png` has the stem `..`, which would
    write into the parent folder); such names get a leading underscore, separators become underscores."""
    cleaned = "".join("_" if c in "/\\\0" else c for c in name)
    return "_" + cleaned if not cleaned or cleaned.startswith(".") else cleaned


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (=, +, -, @, tab, CR first: a tissue, file or class name
    from a user's data) gets a leading apostrophe, as OWASP recommends; numbers, negative ones included, and
    everything else stay as they are."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """CSV text built in memory, so that a failure while formatting leaves the old file untouched; text cells are
    made `spreadsheet_safe`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([spreadsheet_safe(cell) for cell in header])
    writer.writerows([spreadsheet_safe(cell) for cell in row] for row in rows)
    return buffer.getvalue()


def write_csv_rows(path: PathLike, header: Sequence[str], rows: Iterable[Sequence], overwrite: bool = True) -> Path:
    """Atomically write a header row and the given rows as CSV."""
    return write_text(path, csv_text(header, rows), overwrite)


def write_json(path: PathLike, value: Any, overwrite: bool = True, indent: int | None = 2) -> Path:
    """Atomically write `value` as JSON through `json_text`."""
    return write_text(path, json_text(value, indent) + ("\n" if indent is not None else ""), overwrite)


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None, numpy / torch scalars and arrays as Python numbers and lists."""
    if isinstance(value, dict):
        return {str(key): json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy and torch scalars / arrays
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plain(value: Any) -> Any:
    """json.dumps' `default`: numpy / torch values as Python ones, paths as text."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def json_text(value: Any, indent: int | None = 2) -> str:
    """The one JSON encoding of the bundle's outputs: strict JSON that any reader loads (no NaN tokens).

    Encoded directly when every number is finite and every key plain (a nucleus GeoJSON: one pass instead of two);
    otherwise through `json_safe`, which writes NaN and infinities as null.
    """
    separators = (",", ":") if indent is None else None
    try:
        return json.dumps(value, indent=indent, separators=separators, allow_nan=False, default=_plain)
    except (TypeError, ValueError):  # NaN, infinity, or a key json.dumps does not take as it is
        return json.dumps(json_safe(value), indent=indent, separators=separators, allow_nan=False)
