"""The errors the bundle raises on purpose, one type per layer, all sharing `BundleError`.

Each message names the file (or option) at fault, what was expected and found, and how to fix it.  Anything else
that escapes is a bug, or a fault of the machine, and keeps its traceback.

  DataError       datasets, folds, caches, the converter, and any image that cannot be read
  ModelError      weights and checkpoints: missing, truncated, non-finite, of another network or class count
  InferenceError  a whole inference run cannot start (no input)
  ConfigError     an option that cannot be used as given: a yes/no flag, a folder that cannot be written, a run
                  folder another run holds

One mechanism turns them into what a user reads: importing `scripts` (which every workflow does) installs
`report_bundle_errors` as `sys.excepthook`.  When a run ends with an exception that is, or was caused by, a
BundleError, the user sees `error: <message>` and the exit status is 1, without the traceback wall of MONAI's
"Failed to instantiate component"; any other exception keeps Python's full traceback.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType


class BundleError(Exception):
    """An expected failure: its message alone tells the user what to change."""


class DataError(BundleError, ValueError):
    """A dataset, fold, cache or image the bundle cannot use as it is."""


class ModelError(BundleError):
    """Weights or a training state the bundle cannot load into the configured network."""


class InferenceError(BundleError, ValueError):
    """An inference run that cannot start: the input as a whole."""


class ConfigError(BundleError, ValueError):
    """An option or folder the run cannot use as given."""


class DiskFullError(BundleError, OSError):
    """A disk that filled up during a write: the message names the file or folder being written."""

    def __str__(self) -> str:
        return str(self.strerror or super().__str__())


def bundle_error_in(error: BaseException | None) -> BundleError | None:
    """The BundleError that `error` is or was raised from (MONAI wraps them in RuntimeError), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BundleError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def root_cause(error: BaseException) -> str:
    """The innermost exception as "Type: message": MONAI wraps a failing transform's error in 'applying transform'."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def report_bundle_errors(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """sys.excepthook: one readable message for expected errors, the full traceback for anything else.

    Set PANNUKE_TRACEBACK=1 to see the traceback of an expected error too.
    """
    expected = bundle_error_in(error)
    if expected is None or os.environ.get("PANNUKE_TRACEBACK"):
        sys.__excepthook__(kind, error, tb)
        return
    print(f"error: {expected}", file=sys.stderr)


def install_error_report() -> None:
    """Make `report_bundle_errors` the process's excepthook, once (it leaves other hooks, e.g. a debugger's, alone)."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = report_bundle_errors
