"""The errors the bundle raises on purpose, one type per layer, all sharing `BundleError`.

Each message names the file (or option) at fault, what was expected and found, and how to fix it.  Anything else
that escapes is a bug, or a fault of the machine, and keeps its traceback.

  DataError       datasets, folds, caches, the converter, and any image that cannot be read
  ModelError      weights and checkpoints: missing, truncated, of another network or class count
  InferenceError  a whole inference run cannot start (no input, unusable output folder)
"""

from __future__ import annotations


class BundleError(Exception):
    """An expected failure: its message alone tells the user what to change."""


class DataError(BundleError, ValueError):
    """A dataset, fold, cache or image the bundle cannot use as it is."""


class ModelError(BundleError):
    """Weights or a training state the bundle cannot load into the configured network."""


class InferenceError(BundleError, ValueError):
    """An inference run that cannot start: the input as a whole, or where its outputs go."""
