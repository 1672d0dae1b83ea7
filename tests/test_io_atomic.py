"""The one atomic writer: complete or untouched files, the user's permissions, a full disk named, strict JSON."""

from __future__ import annotations

import errno
import json
import math
import os
import stat

import numpy as np
import pytest

from scripts.core.errors import BundleError
import torch

from scripts.core.atomic import atomic_write, json_text, write_csv_rows, write_json, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "scores.json", "old")

    def fail(tmp):
        tmp.write_text("half of the new")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]


def test_a_full_disk_is_reported_with_the_path(tmp_path):
    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"no space left on the disk while writing .*model\.pt") as err:
        atomic_write(tmp_path / "model.pt", full)
    assert not list(tmp_path.iterdir())
    assert isinstance(err.value, BundleError)  # one line for the user, not a traceback
    assert str(err.value).startswith("no space left on the disk while writing")


def test_outputs_get_the_permissions_the_umask_allows(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_text(tmp_path / "a.csv", "x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not mkstemp's 0600


def test_overwrite_false_refuses_an_existing_file(tmp_path):
    write_text(tmp_path / "a.txt", "first")
    with pytest.raises(FileExistsError, match="a.txt already exists"):
        write_text(tmp_path / "a.txt", "second", overwrite=False)
    assert (tmp_path / "a.txt").read_text() == "first"


def test_json_is_strict_nan_becomes_null_and_numbers_are_plain(tmp_path):
    value = {"bPQ": math.nan, "n": np.int64(3), "x": np.float32(0.5), "t": torch.tensor([1.0, math.inf]), 1: "k"}
    text = json_text(value)
    assert json.loads(text) == {"bPQ": None, "n": 3, "x": 0.5, "t": [1.0, None], "1": "k"}
    write_json(tmp_path / "s.json", value)
    assert "NaN" not in (tmp_path / "s.json").read_text()


def test_json_of_finite_values_is_the_same_text_by_either_path():
    """Finite values skip the json_safe pass; the text must be what that pass gives."""
    from pathlib import Path

    from scripts.core.atomic import json_safe

    value = {
        "features": [{"id": np.int64(7), "ring": np.arange(6).reshape(3, 2), "p": np.float32(0.25), "ok": np.bool_(1)}],
        "where": Path("/a/b"),
        "pair": (1, 2.5),
        3: torch.tensor(2),
    }
    for indent in (None, 2):
        assert json_text(value, indent) == json.dumps(
            json_safe(value), indent=indent, separators=None if indent else (",", ":"), allow_nan=False
        )
    assert json.loads(json_text({np.int64(1): 1.0})) == {"1": 1.0}  # a key json.dumps refuses: the exact path


def test_csv_rows(tmp_path):
    write_csv_rows(tmp_path / "t.csv", ["a", "b"], [[1, "x"], [2, "y"]])
    assert (tmp_path / "t.csv").read_text() == "a,b\n1,x\n2,y\n"


def test_an_unwritable_output_folder_is_refused_before_work(tmp_path):
    from scripts.core.errors import ConfigError
    from scripts.core.atomic import require_writable

    assert require_writable(tmp_path / "new" / "eval", "output_dir").is_dir()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"--output_dir .*file/eval cannot be written"):
        require_writable(tmp_path / "file" / "eval", "output_dir")
    assert not list((tmp_path / "new" / "eval").iterdir())  # the probe leaves nothing behind


def test_csv_cells_a_spreadsheet_would_run_are_neutralised(tmp_path):
    """A tissue, file or class name such as =HYPERLINK(...) must reach a spreadsheet as text (OWASP CSV injection);
    numbers, negative ones included, stay numbers."""
    import csv

    from scripts.core.atomic import write_csv_rows
    import numpy as np

    from scripts.workflows.predict.nucleus_record import NUCLEUS_COLUMNS, csv_lines

    rows = [['=HYPERLINK("http://x")', "-0.5000", "+cmd", "@SUM(A1)", "-x", "Colon", 3, -2.5]]
    path = write_csv_rows(tmp_path / "t.csv", ["name", "a", "b", "c", "d", "e", "f", "g"], rows)
    with open(path, newline="") as f:
        read = list(csv.reader(f))[1]
    assert read == ['\'=HYPERLINK("http://x")', "-0.5000", "'+cmd", "'@SUM(A1)", "'-x", "Colon", "3", "-2.5"]
    table = {name: np.zeros(2) for name in NUCLEUS_COLUMNS} | {"type": np.array(["=1+1", "a,b"], dtype=object)}
    names = [row[NUCLEUS_COLUMNS.index("type")] for row in csv.reader(csv_lines(table))]
    assert names == ["'=1+1", "a,b"]  # the nucleus record's class names too (one CSV cell each)


def test_leaves_spots_links_and_paths_outside_the_root(tmp_path):
    from scripts.core.atomic import leaves

    root = tmp_path / "out"
    (root / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    (root / "inner").symlink_to(root / "a")  # a link, even one that stays inside, is not followed
    assert not leaves(root, root / "a" / "x.csv") and not leaves(root, root / "new" / "x.csv")
    assert leaves(root, root / "link" / "x.csv") and leaves(root, root / "link")
    assert leaves(root, root / "inner" / "x.csv")
    assert leaves(root, tmp_path / "x.csv") and leaves(root, root / ".." / "x.csv")
