"""The nucleus types a dataset, a checkpoint and every output share: their names and their colours.

PanNuke's five types are the default.  A lab's folds converted from its own annotations carry their own list in
`classes.json` beside the folds (`{"names": [...], "colours": [[r, g, b], ...]}`), and a trained checkpoint carries
the list it was trained on in its state dict's own metadata (`state_dict._metadata[""]`, where PyTorch keeps the
modules' versions): plain strings and integers, so the file still loads with `torch.load(weights_only=True)`, and
the tensors are unchanged, so a strict `load_state_dict` (MONAI's CheckpointLoader, `ckpt_export`) still works.
Type id t (1-based, 0 = background) is `names[t - 1]` everywhere: masks channel t - 1, network class t, the CSV's
type column, QuPath's PathClass.

This module is numpy-free and torch-free on purpose: the converter, the writers and the configs all read it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.core.errors import DataError, ModelError

PANNUKE_NAMES: tuple[str, ...] = ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")
# RGB colours per type, as used by the PanNuke paper figures; QuPath and the overlays use them too.
PANNUKE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),  # Neoplastic: red
    (0, 255, 0),  # Inflammatory: green
    (0, 0, 255),  # Connective: blue
    (255, 255, 0),  # Dead: yellow
    (255, 165, 0),  # Epithelial: orange
)
# colours for a lab's classes that bring none (QuPath's own PathClass colours come with its export)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (200, 0, 0),
    (0, 160, 0),
    (30, 80, 255),
    (230, 200, 0),
    (255, 120, 0),
    (160, 0, 200),
    (0, 200, 200),
    (255, 0, 160),
    (120, 80, 40),
    (128, 128, 128),
)
CLASSES_FILE = "classes.json"
CHECKPOINT_KEY = "nuclei_classes"
MAX_TYPES = 254  # type ids are stored as uint8 with 0 = background and 255 kept free


@dataclass(frozen=True)
class NucleusClasses:
    """The ordered nucleus types of a dataset or model, with one RGB colour each.

    Args:
        names: the type names, in type-id order (id 1 first).
        colours: one (r, g, b) per name; default: PanNuke's colours for PanNuke's names, a palette otherwise.
    """

    names: tuple[str, ...]
    colours: tuple[tuple[int, int, int], ...]

    def __init__(self, names: Sequence[str], colours: Sequence[Sequence[int]] | None = None) -> None:
        names = tuple(str(n) for n in names)
        problems = []
        if not names:
            problems.append("no class names")
        if len(names) > MAX_TYPES:
            problems.append(f"{len(names)} classes, at most {MAX_TYPES}")
        if any(not n.strip() for n in names):
            problems.append("an empty class name")
        if len({n.lower() for n in names}) != len(names):
            problems.append(f"a class name twice ({', '.join(names)}), ignoring case")
        if problems:
            raise DataError(f"class names {list(names)}: {'; '.join(problems)}")
        if colours is None:
            colours = PANNUKE_COLOURS if names == PANNUKE_NAMES else default_colours(len(names))
        colours = tuple(_rgb(c, names) for c in colours)
        if len(colours) != len(names):
            raise DataError(f"{len(names)} class names but {len(colours)} colours")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "colours", colours)

    @property
    def num_types(self) -> int:
        return len(self.names)

    def name(self, type_id: int) -> str:
        """Name of type id `type_id` (1-based)."""
        return self.names[type_id - 1]

    def colour(self, type_id: int) -> tuple[int, int, int]:
        return self.colours[type_id - 1]

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "colours": [list(c) for c in self.colours]}

    @classmethod
    def from_json(cls, value: Any, source: str) -> NucleusClasses:
        """From `to_json`'s dict; a DataError naming `source` for anything else."""
        if not isinstance(value, Mapping) or not isinstance(value.get("names"), list):
            raise DataError(f"{source}: expected {{'names': [...], 'colours': [[r, g, b], ...]}}, found {value!r:.200}")
        try:
            return cls(value["names"], value.get("colours"))
        except DataError as err:
            raise DataError(f"{source}: {err}") from None


def _rgb(colour: Any, names: Sequence[str]) -> tuple[int, int, int]:
    if (
        not isinstance(colour, Sequence)
        or len(colour) != 3
        or not all(isinstance(v, int) and 0 <= v <= 255 for v in colour)
    ):
        raise DataError(f"colour {colour!r} of classes {list(names)}: expected [r, g, b] with integers 0-255")
    return (colour[0], colour[1], colour[2])


PANNUKE = NucleusClasses(PANNUKE_NAMES, PANNUKE_COLOURS)


def default_colours(count: int) -> tuple[tuple[int, int, int], ...]:
    """`count` distinct colours from the palette, cycling past its end."""
    return tuple(PALETTE[i % len(PALETTE)] for i in range(count))


def parse_names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """'A,B' or ["A", "B"] -> ("A", "B"); None or "" -> None (not given)."""
    if value is None or value == "" or value == []:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip() for item in items)


def read_dataset_classes(dataset_dir: str | os.PathLike) -> NucleusClasses:
    """The classes of the folds in `dataset_dir`: its classes.json, or PanNuke's five when there is none.

    Args:
        dataset_dir: the folder holding the folds (`@dataset_dir`); "" (the demo data) is PanNuke.
    """
    path = Path(dataset_dir) / CLASSES_FILE if dataset_dir else None
    if path is None or not path.is_file():
        return PANNUKE
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable classes file ({err}); convert the folds again") from None
    return NucleusClasses.from_json(value, str(path))


def checkpoint_classes(state: Mapping[str, Any], path: str | os.PathLike) -> NucleusClasses:
    """The classes a state dict was trained on; PanNuke's five for a file that does not say (older checkpoints)."""
    metadata = getattr(state, "_metadata", None) or {}
    value = (metadata.get("") or {}).get(CHECKPOINT_KEY)
    if value is None:
        return PANNUKE
    try:
        return NucleusClasses.from_json(value, str(path))
    except DataError as err:
        raise ModelError(str(err)) from None


def with_classes(state: Mapping[str, Any], classes: NucleusClasses) -> OrderedDict:
    """A copy of a state dict that carries `classes` in its metadata; the tensors are the same objects."""
    out = OrderedDict(state)
    metadata = OrderedDict(getattr(state, "_metadata", None) or {})
    metadata[""] = {**(metadata.get("") or {}), CHECKPOINT_KEY: classes.to_json()}
    out._metadata = metadata  # type: ignore[attr-defined]
    return out


def check_same_classes(found: NucleusClasses, asked: Sequence[str] | str | None, where: str) -> NucleusClasses:
    """`found` when `asked` is not given or names the same classes in the same order; else a ModelError.

    Args:
        found: the classes a checkpoint carries.
        asked: the names the run was told to expect (`--class_names`), or None.
        where: the checkpoint's path, for the message.
    """
    names = parse_names(asked)
    if names is None or list(names) == list(found.names):
        return found
    raise ModelError(
        f"{where} was trained on the classes {list(found.names)}, but this run asks for {list(names)}; drop "
        "--class_names to use the checkpoint's own, or pass the checkpoint trained on those classes"
    )
