"""Yes/no options given on the command line.

monai.bundle parses overrides with python-fire, which turns `--resume True` into a bool but `--resume true` into the
string 'true', and any non-empty string, 'false' included, is truthy.  Options read with `as_bool` accept both.
"""

from __future__ import annotations

from scripts.errors import ConfigError

WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def as_bool(value: bool | int | str, name: str) -> bool:
    """True/False from JSON or the command line ('true', 'False', 1, ...); anything else is an error, not a guess."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in WORDS:
        raise ConfigError(f"--{name} must be true or false, got {value!r}")
    return WORDS[word]
