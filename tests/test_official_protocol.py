import json
import math
from pathlib import Path

import numpy as np
import pytest

from pannuke_fixtures import write_dataset
from scripts.workflows.evaluate.official_protocol import (
    SPLITS,
    combine_splits,
    format_table,
    main,
    split_overrides,
    write_protocol_tables,
)
from scripts.core.errors import ConfigError
from scripts.workflows.evaluate.pq import ROW_KEYS, write_score_tables


def _scores(tmp_path, name, value, tissues=("Breast", "Colon")):
    rows = [{key: value for key in ROW_KEYS} for _ in tissues]
    if name == "s3":
        rows[0]["PQ_Dead"] = math.nan
    write_score_tables(rows, list(tissues), tmp_path / name)
    return tmp_path / name / "pannuke_scores.json"


def test_official_splits():
    assert SPLITS == {1: (1, 2, 3), 2: (2, 1, 3), 3: (3, 2, 1)}
    assert split_overrides(2, Path("/x"))[:6] == ["--train_folds", "[2]", "--val_fold", "1", "--test_fold", "3"]


def test_combine_splits_mean_and_spread(tmp_path):
    files = {1: _scores(tmp_path, "s1", 0.5), 2: _scores(tmp_path, "s2", 0.6), 3: _scores(tmp_path, "s3", 0.7)}
    table = combine_splits(files)
    assert table["overall"]["bPQ"]["mean"] == pytest.approx(0.6)
    assert table["overall"]["bPQ"]["std"] == pytest.approx(np.std([0.5, 0.6, 0.7]))
    assert table["per_tissue"]["Colon"]["mPQ"]["n_splits"] == 3
    # split 3 has PQ_Dead NaN for one image only: its class mean is still 0.7
    assert table["per_class"]["Dead"]["mean"] == pytest.approx(0.6)
    write_protocol_tables(table, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "protocol_scores.json").read_text())["overall"]["mPQ"]["n_splits"] == 3
    assert "bPQ" in format_table(table) and "±" in format_table(table)
    assert (tmp_path / "out" / "protocol_scores.csv").read_text().count("\n") > 10


@pytest.mark.slow
def test_one_split_end_to_end_and_no_rerun(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", tiles=(2, 1, 1))
    common = [
        "--dataset_dir",
        str(data),
        "--epochs",
        "1",
        "--batch_size",
        "2",
        "--num_workers",
        "0",
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    assert main(["--output_dir", str(tmp_path / "proto"), "--splits", "1", *common]) == 0
    scores = tmp_path / "proto" / "split1" / "eval" / "pannuke_scores.json"
    assert scores.is_file() and (tmp_path / "proto" / "split1" / "models" / "model.pt").is_file()
    stamp = scores.stat().st_mtime_ns
    assert main(["--output_dir", str(tmp_path / "proto"), "--splits", "1", *common]) == 0
    assert scores.stat().st_mtime_ns == stamp
    assert "not run again" in capsys.readouterr().out
    assert (tmp_path / "proto" / "protocol_scores.json").is_file()
    # scores made with other options (here: another dataset) are never mixed into the table
    other = write_dataset(tmp_path / "other", tiles=(2, 1, 1))
    changed = [str(other) if item == str(data) else item for item in common]
    with pytest.raises(ConfigError, match=r"holds scores made with other options.*--force"):
        main(["--output_dir", str(tmp_path / "proto"), "--splits", "1", *changed])
    assert scores.stat().st_mtime_ns == stamp


def test_unknown_split_rejected(tmp_path):
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path), "--splits", "4"])
