"""Print the markdown table of real-data runs (benchmarks/real_data_check.py --tag ...) for bundle/docs/results.md.

One row per tag and per test tissue (CoNSeP, NuCLS) plus the mean over tissues, with bPQ, bDQ, bSQ, Dice, AJI, mPQ,
the per-class PQ, the training and scoring minutes and the machine, read from <work>/runs/<tag>/result.json.

    .venv/bin/python benchmarks/real_data_table.py --work /tmp/realdata --tags boundary hv
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

KEYS = ("bPQ", "bDQ", "bSQ", "Dice", "AJI", "mPQ")
CLASSES = ("Neoplastic", "Inflammatory", "Connective", "Dead")  # Epithelial: no test nucleus in these sets


def cell(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--tags", nargs="+", required=True)
    args = parser.parse_args()
    print("| run | test tissue | " + " | ".join(KEYS) + " | " + " | ".join(f"PQ {c}" for c in CLASSES) + " |")
    print("|---" * (2 + len(KEYS) + len(CLASSES)) + "|")
    notes = []
    for tag in args.tags:
        result = json.loads((args.work / "runs" / tag / "result.json").read_text())
        scores = result["scores"]
        for tissue, row in scores["per_tissue"].items():
            print(f"| {tag} | {tissue} | " + " | ".join(cell(row.get(k)) for k in KEYS) + " |" + " |" * len(CLASSES))
        overall = scores["overall"]
        print(
            f"| **{tag}** | **mean over tissues** | "
            + " | ".join(f"**{cell(overall.get(k))}**" for k in KEYS)
            + " | "
            + " | ".join(cell(overall.get(f"PQ_{c}")) for c in CLASSES)
            + " |"
        )
        overrides = " ".join(result["overrides"])
        notes.append(
            f"- {tag}: {overrides}; {result['epochs']} epochs, batch {result['batch_size']}, "
            f"training {result['training_minutes']} min, scoring {result['scoring_minutes']} min; "
            f"{result['machine']}"
        )
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
