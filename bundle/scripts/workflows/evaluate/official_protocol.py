"""The official PanNuke protocol in one command: train and score the 3 splits, then report their mean and spread.

Splits (train, validation, test) = (1, 2, 3), (2, 1, 3), (3, 2, 1), as in the PanNuke paper.  Each split trains with
configs/train.json and scores its test fold with configs/evaluate.json, in its own folder, through `monai.bundle` in
a fresh process.  A split whose scores already exist is not run again (pass --force to redo it), so an interrupted
protocol continues where it stopped and finished splits are never lost.

    cd bundle
    python -m scripts.workflows.evaluate.official_protocol --output_dir runs/protocol --dataset_dir /data/pannuke \
        --epochs 100

Every option this script does not know (--dataset_dir, --epochs, --batch_size, ...) goes to monai.bundle as an
override.  Results: <output_dir>/split<k>/{models,eval}/ per split, and protocol_scores.json / protocol_scores.csv /
a printed table with the mean and standard deviation over the splits.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from scripts.core.errors import BundleError, ConfigError
from scripts.core.atomic import write_csv_rows, write_json

SPLITS: dict[int, tuple[int, int, int]] = {1: (1, 2, 3), 2: (2, 1, 3), 3: (3, 2, 1)}
BUNDLE_ROOT = Path(__file__).resolve().parents[3]
SCORES_FILE = "pannuke_scores.json"
RUN_RECORD = "run.json"  # the options that made a split's scores


def split_overrides(split: int, run_dir: Path) -> list[str]:
    train, val, test = SPLITS[split]
    return [
        "--train_folds",
        f"[{train}]",
        "--val_fold",
        str(val),
        "--test_fold",
        str(test),
        "--ckpt_dir",
        str(run_dir / "models"),
        "--output_dir",
        str(run_dir / "eval"),
    ]


def bundle_command(run_id: str, configs: list[str], overrides: list[str]) -> list[str]:
    config_files = "[" + ",".join(repr(str(BUNDLE_ROOT / "configs" / c)) for c in configs) + "]"
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        config_files,
        "--logging_file",
        str(BUNDLE_ROOT / "configs" / "logging.conf"),
        "--bundle_root",
        str(BUNDLE_ROOT),
        *overrides,
    ]


def run_split(split: int, output_dir: Path, extra: list[str], force: bool) -> Path:
    """Train and evaluate one split unless scores made with the same settings exist; returns its scores file.

    `run.json` beside the scores records the options that made them; scores made with other options (another
    dataset, other settings) are never mixed into the table: the run stops and says how to proceed.
    """
    run_dir = output_dir / f"split{split}"
    scores, record = run_dir / "eval" / SCORES_FILE, run_dir / RUN_RECORD
    made_with = {"split": split, "options": list(extra)}
    if scores.is_file() and not force:
        try:
            recorded = json.loads(record.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded == made_with:
            print(f"split {split}: scores made with these options exist in {scores}, not run again (--force redoes)")
            return scores
        before = (
            "unknown options (no run.json)" if recorded is None else " ".join(recorded.get("options", [])) or "none"
        )
        raise ConfigError(
            f"{scores} holds scores made with other options ({before}) than this run's ({' '.join(extra) or 'none'}); "
            "pass --force to train and score the split again, or another --output_dir"
        )
    overrides = split_overrides(split, run_dir) + extra
    print(f"split {split}: train fold {SPLITS[split][0]}, validate {SPLITS[split][1]}, test {SPLITS[split][2]}")
    record.unlink(missing_ok=True)  # the old record no longer describes what is in the folder
    for run_id, configs in (("training", ["train.json"]), ("run", ["train.json", "evaluate.json"])):
        code = subprocess.run(bundle_command(run_id, configs, overrides)).returncode
        if code != 0:
            raise BundleError(f"split {split}: the {run_id} step failed (exit {code}); its message is above")
    if not scores.is_file():
        raise BundleError(f"split {split}: evaluation finished without writing {scores}")
    write_json(record, made_with)
    return scores


def _stats(values: list[float | None]) -> dict[str, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n_splits": 0}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite)), "n_splits": len(finite)}


def combine_splits(score_files: dict[int, Path]) -> dict:
    """Mean and standard deviation over splits of every overall score, per-class PQ and per-tissue bPQ/mPQ."""
    per_split = {split: json.loads(Path(f).read_text()) for split, f in score_files.items()}
    first = next(iter(per_split.values()))
    overall_keys = [k for k in first["overall"] if k not in ("n_images", "n_tissues")]
    table = {
        "splits": {str(s): list(SPLITS[s]) for s in per_split},
        "overall": {k: _stats([p["overall"].get(k) for p in per_split.values()]) for k in overall_keys},
        "per_class": {k: _stats([p["per_class"].get(k) for p in per_split.values()]) for k in first["per_class"]},
        "per_tissue": {},
    }
    tissues = sorted({t for p in per_split.values() for t in p["per_tissue"]})
    for tissue in tissues:
        table["per_tissue"][tissue] = {
            key: _stats([p["per_tissue"].get(tissue, {}).get(key) for p in per_split.values()])
            for key in ("bPQ", "mPQ")
        }
    return table


def write_protocol_tables(table: dict, output_dir: Path) -> None:
    rows = [["overall", "", key, s["mean"], s["std"], s["n_splits"]] for key, s in table["overall"].items()]
    rows += [["class", name, "PQ", s["mean"], s["std"], s["n_splits"]] for name, s in table["per_class"].items()]
    rows += [
        ["tissue", tissue, key, s["mean"], s["std"], s["n_splits"]]
        for tissue, metrics in table["per_tissue"].items()
        for key, s in metrics.items()
    ]
    write_csv_rows(output_dir / "protocol_scores.csv", ["group", "name", "metric", "mean", "std", "n_splits"], rows)
    write_json(output_dir / "protocol_scores.json", table)


def format_table(table: dict) -> str:
    fmt = lambda s: f"{s['mean']:.4f} ± {s['std']:.4f}"  # noqa: E731
    lines = [f"PanNuke official protocol, mean ± std over splits {', '.join(table['splits'])}"]
    lines += [f"  {key:<16} {fmt(s)}" for key, s in table["overall"].items()]
    lines += [f"  PQ {name:<13} {fmt(s)}" for name, s in table["per_class"].items()]
    lines += [f"  {tissue:<16} bPQ {fmt(m['bPQ'])}  mPQ {fmt(m['mPQ'])}" for tissue, m in table["per_tissue"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the official PanNuke 3-split protocol; unknown options go to monai.bundle as overrides.",
        epilog="example: python -m scripts.workflows.evaluate.official_protocol --output_dir runs/protocol "
        "--dataset_dir /data/pannuke",
    )
    parser.add_argument("--output_dir", required=True, type=Path, help="one subfolder per split goes here")
    parser.add_argument("--splits", default="1,2,3", help="which splits to run (default: all three)")
    parser.add_argument("--force", action="store_true", help="re-run splits whose scores already exist")
    args, extra = parser.parse_known_args(argv)
    splits = [int(s) for s in args.splits.split(",")]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        parser.error(f"unknown split(s) {unknown}: the protocol has splits 1, 2, 3")
    score_files = {s: run_split(s, args.output_dir.resolve(), extra, args.force) for s in splits}
    table = combine_splits(score_files)
    write_protocol_tables(table, args.output_dir)
    print(format_table(table))
    print(f"written: {args.output_dir / 'protocol_scores.json'}, {args.output_dir / 'protocol_scores.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
