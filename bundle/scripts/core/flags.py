"""Options given on the command line: yes/no values, and names that no config defines.

monai.bundle parses overrides with python-fire, which turns `--resume True` into a bool but `--resume true` into the
string 'true', and any non-empty string, 'false' included, is truthy.  Options read with `as_bool` accept both.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import sys
from pathlib import Path
from typing import Any

from scripts.core.errors import ConfigError

WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def as_bool(value: bool | int | str, name: str) -> bool:
    """True/False from JSON or the command line ('true', 'False', 1, ...); anything else is an error, not a guess."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in WORDS:
        raise ConfigError(f"--{name} must be true or false, got {value!r}")
    return WORDS[word]


# options of `python -m monai.bundle run` itself, not config ids
RUN_OPTIONS = frozenset(
    {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}
)


def _config_ids(value: Any, prefix: str = "") -> tuple[set[str], set[str]]:
    """Every id a config defines, nested ones joined with '#' ("instances#min_size", "train#handlers#0"), and those
    of them that are dicts (a component's arguments, to which an option may add one: `--optimizer#momentum 0.9`)."""
    ids: set[str] = set()
    dicts: set[str] = set()
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        name = f"{prefix}{str(key).lstrip('+')}"
        ids.add(name)
        if isinstance(child, dict):
            dicts.add(name)
        child_ids, child_dicts = _config_ids(child, name + "#")
        ids |= child_ids
        dicts |= child_dicts
    return ids, dicts


def _argv_config_files(argv: list[str]) -> list[str]:
    for i, token in enumerate(argv):
        if token.startswith("--config_file"):
            value = token.split("=", 1)[1] if "=" in token else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                parsed = ast.literal_eval(value) if value.strip().startswith("[") else value
            except (ValueError, SyntaxError):
                parsed = value
            return [str(p) for p in (parsed if isinstance(parsed, list | tuple) else [parsed])]
    return []


def check_overrides(argv: list[str] | None = None) -> None:
    """Refuse a command-line option that names no id of the run's configs (`--epoch 1` for `--epochs`).

    monai.bundle accepts any `--name value` and adds it to the config, where nothing reads it: a typo silently runs
    with the default (100 epochs, or results written into the bundle folder).  Runs only under `python -m
    monai.bundle` (or with `argv` given), before any work.

    Args:
        argv: the command line to check; default: this process's, when it is monai.bundle's command line.
    """
    if argv is None:
        main = sys.modules.get("__main__")
        if getattr(getattr(main, "__spec__", None), "name", "") != "monai.bundle.__main__":
            return
        argv = sys.argv[1:]
    files = _argv_config_files(argv)
    if not files:
        return
    ids: set[str] = set()
    dicts: set[str] = set()
    for path in files:
        try:
            file_ids, file_dicts = _config_ids(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return  # monai.bundle itself reports a config it cannot read
        ids |= file_ids
        dicts |= file_dicts
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS  # noqa: PLC0415 - only the command line needs MONAI here

    ids |= set(DEFAULT_MLFLOW_SETTINGS["configs"])  # --tracking mlflow adds these
    names = [token[2:].split("=", 1)[0] for token in argv if token.startswith("--") and len(token) > 2]
    unknown = [
        name
        for name in names
        if name not in RUN_OPTIONS and name not in ids and not ("#" in name and name.rsplit("#", 1)[0] in dicts)
    ]
    if unknown:
        name = unknown[0]
        top = sorted({i for i in ids if "#" not in i} | RUN_OPTIONS)
        near = difflib.get_close_matches(name, top, n=1, cutoff=0.6)
        hint = f"; did you mean --{near[0]}?" if near else "; the options are the ids of the configs (README)"
        raise ConfigError(
            f"unknown option --{name}: no id of that name in {', '.join(Path(f).name for f in files)}, so it would "
            f"be ignored{hint}"
        )


def check_values(
    positive_ints: dict[str, Any] | None = None,
    non_negative_ints: dict[str, Any] | None = None,
    positive_numbers: dict[str, Any] | None = None,
    non_negative_numbers: dict[str, Any] | None = None,
    devices: dict[str, Any] | None = None,
    unet_features: dict[str, Any] | None = None,
) -> None:
    """Refuse option values that cannot work, before any work, each in one line naming the option.

    Args:
        positive_ints: options that must be whole numbers of at least 1 (epochs, batch sizes, intervals).
        non_negative_ints: options that must be whole numbers of at least 0 (worker counts).
        positive_numbers: options that must be numbers above 0 (learning rate, µm per pixel); None is allowed
            (not set).
        non_negative_numbers: options that must be numbers of at least 0 (a polygon tolerance).
        devices: options that must name a torch device this machine has (`cpu`, `cuda`, `cuda:1`).
        unet_features: options that must be BasicUNet's six widths, whole numbers of at least 1.
    """
    for name, value in (positive_ints or {}).items():
        _whole(name, value, 1)
    for name, value in (non_negative_ints or {}).items():
        _whole(name, value, 0)
    for name, value in (positive_numbers or {}).items():
        if value is not None and not (is_number(value) and value > 0):
            raise ConfigError(f"--{name} must be a number above 0, got {value!r}")
    for name, value in (non_negative_numbers or {}).items():
        if not (is_number(value) and value >= 0):
            raise ConfigError(f"--{name} must be a number of at least 0, got {value!r}")
    for name, value in (devices or {}).items():
        _device(name, value)
    for name, value in (unet_features or {}).items():
        if not (isinstance(value, list | tuple) and len(value) == 6 and all(_is_whole(v, 1) for v in value)):
            raise ConfigError(
                f'--{name} must be six whole numbers of at least 1, e.g. "[16,16,32,64,128,16]", got {value!r}'
            )


def is_number(value: Any) -> bool:
    """A finite int or float (NaN and infinity are no learning rate, µm per pixel or tolerance)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _device(name: str, value: Any) -> None:
    """A device torch can parse and this machine has (torch imported here: the converter imports this module)."""
    import torch  # noqa: PLC0415

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--{name} must be a torch device such as cpu or cuda, got {value!r}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--{name} {value}: no CUDA GPU is visible on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--{name} {value}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def _fold_numbers(value: Any) -> set[int]:
    """The fold numbers of a fold option: 3, [1, 2] or [[1], 2] (the forms PanNuke's fold lists take)."""
    if isinstance(value, list | tuple):
        return set().union(*(_fold_numbers(v) for v in value)) if value else set()
    return {int(value)} if isinstance(value, int) and not isinstance(value, bool) else set()


def check_folds(train_folds: Any, val_fold: Any, test_fold: Any, allow_overlap: bool | str = False) -> None:
    """Refuse a training that learns from the fold that scores it: a test or validation fold among the training
    folds makes every score it reports optimistic without a word.

    Args:
        train_folds, val_fold, test_fold: the run's folds (`--train_folds`, `--val_fold`, `--test_fold`).
        allow_overlap: `--allow_fold_overlap true` trains anyway (e.g. a final model on every fold).
    """
    if as_bool(allow_overlap, "allow_fold_overlap"):
        return
    train = _fold_numbers(train_folds)
    for name, value in (("test", test_fold), ("validation", val_fold)):
        shared = sorted(train & _fold_numbers(value))
        if shared:
            raise ConfigError(
                f"--train_folds {train_folds} includes the {name} fold {shared[0]}: its scores would be measured on "
                f"tiles the model learnt from; choose other folds, or pass --allow_fold_overlap true to train so anyway"
            )


def _whole(name: str, value: Any, least: int) -> None:
    if not _is_whole(value, least):
        raise ConfigError(f"--{name} must be a whole number of at least {least}, got {value!r}")
