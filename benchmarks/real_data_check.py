"""Train and score on real H&E pixels: CoNSeP + MoNuSeg for training, CoNSeP test + NuCLS for scoring.

PanNuke is not reachable from the development machines, so this is the project's honest check on real tissue.
It converts the public sets in ../shared/data with scripts/data/pannuke/convert.py into a PanNuke-format dataset:

  fold 1 (train):      CoNSeP train images 1-24 (patches) + MoNuSeg training images 1-27 (cut into 256² tiles)
  fold 2 (validation): CoNSeP train images 25-27 + MoNuSeg images 28-30 (never scored, only for model selection)
  fold 3 (test):       CoNSeP test (14 images, patches) + NuCLS (15 tiles): never trained on

Type mapping (../shared/data/README.md): CoNSeP inflammatory -> Inflammatory, spindle -> Connective, epithelial ->
Neoplastic (adenocarcinoma), other -> Dead (a catch-all: ignore its class score); NuCLS tumor -> Neoplastic,
non-tumor -> Connective (score NuCLS as binary only); MoNuSeg is untyped: its nuclei go to Neoplastic, which biases
the type head (documented in bundle/docs/benchmarks.md).  Tissue names carry the source, so the per-tissue table
gives one row per dataset.

    python benchmarks/real_data_check.py --work /tmp/realdata --epochs 30 [--reduced] [--tag hv] [bundle overrides]

The converted dataset and its cache are shared by every run in --work; each --tag gets its own runs/<tag>/ folder
(models, eval, result.json with the scores, the overrides, the machine and the minutes), so an A/B comparison is two
commands with the same --work and different tags and overrides (e.g. --target hv / --target boundary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from synthetic_folds import cpu_name

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
SHARED = REPO.parent / "shared" / "data"
CONSEP_CLASSES = "1:Dead,2:Inflammatory,3:Neoplastic,4:Connective"
NUCLS_CLASSES = "1:Connective,2:Neoplastic"


def _link_subset(src: Path, dst: Path, keep) -> Path:
    """A folder of symlinks to the images/labels whose stem passes `keep` (the converter pairs by stem)."""
    for sub in ("images", "labels"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for f in (src / sub).iterdir():
            if keep(f.stem) and not (dst / sub / f.name).exists():
                (dst / sub / f.name).symlink_to(f)
    return dst


def _convert(source: Path, out: Path, fold: int, tissue: str, extra: list[str], append: bool) -> None:
    cmd = [
        sys.executable,
        str(BUNDLE / "scripts" / "data" / "pannuke" / "convert.py"),
        "--images",
        str(source / "images"),
        "--masks",
        str(source / "labels"),
        "--output_dir",
        str(out),
        "--fold",
        str(fold),
        "--tissue",
        tissue,
        *extra,
    ]
    subprocess.run(cmd + (["--append"] if append else []), check=True)


def build_dataset(work: Path, reduced: bool, shared: Path = SHARED) -> Path:
    """reduced (for CPU): 6 of the 16 overlapping CoNSeP patches per training image, every third MoNuSeg image."""
    out = work / "pannuke_format"
    if (out / "Fold 3").is_dir():
        print(f"dataset exists: {out}")
        return out
    consep_image = lambda stem: int(stem.split("_")[1])  # noqa: E731  train_<img>_<patch>
    consep_patch = lambda stem: int(stem.split("_")[2])  # noqa: E731
    use_patch = (lambda stem: consep_patch(stem) < 6) if reduced else (lambda stem: True)
    monuseg = sorted(p.stem for p in (shared / "monuseg_train" / "images").iterdir())
    links = work / "links"
    train_consep = _link_subset(
        shared / "consep/train", links / "c_tr", lambda s: consep_image(s) <= 24 and use_patch(s)
    )
    val_consep = _link_subset(shared / "consep/train", links / "c_va", lambda s: consep_image(s) > 24)
    train_names = monuseg[:27][:: 3 if reduced else 1]
    train_monuseg = _link_subset(shared / "monuseg_train", links / "m_tr", lambda s: s in train_names)
    val_monuseg = _link_subset(shared / "monuseg_train", links / "m_va", lambda s: s in monuseg[27:])
    typed = ["--class_map", CONSEP_CLASSES]
    untyped = ["--default_type", "Neoplastic"]
    _convert(train_consep, out, 1, "Colon (CoNSeP)", typed, append=False)
    _convert(train_monuseg, out, 1, "Mixed (MoNuSeg)", untyped, append=True)
    _convert(val_consep, out, 2, "Colon (CoNSeP)", typed, append=False)
    _convert(val_monuseg, out, 2, "Mixed (MoNuSeg)", untyped, append=True)
    _convert(shared / "consep/test", out, 3, "Colon (CoNSeP)", typed, append=False)
    _convert(shared / "nucls", out, 3, "Breast (NuCLS)", ["--class_map", NUCLS_CLASSES], append=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pannuke_real_data"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--reduced", action="store_true", help="fewer training tiles, for a CPU-only check")
    parser.add_argument("--tag", default="", help="runs/<tag>/ for models and scores (default: models/, eval/)")
    parser.add_argument("--skip_training", action="store_true", help="only score the run's existing models/model.pt")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the annotated sets (default: ../shared/data)")
    args, extra = parser.parse_known_args()
    if not args.shared.is_dir():
        print(f"{args.shared} is absent: nothing to check")
        return 1
    sys.path.insert(0, str(BUNDLE))
    from scripts.workflows.evaluate.official_protocol import bundle_command

    data = build_dataset(args.work, args.reduced, args.shared.resolve())  # links point at absolute paths
    run_dir = args.work / "runs" / args.tag if args.tag else args.work
    overrides = [
        "--dataset_dir",
        str(data),
        "--cache_dir",
        str(args.work / "cache"),
        "--ckpt_dir",
        str(run_dir / "models"),
        "--output_dir",
        str(run_dir / "eval"),
        "--epochs",
        str(args.epochs),
        "--batch_size",
        str(args.batch_size),
        *extra,
    ]
    start = time.time()
    if not args.skip_training:
        subprocess.run(bundle_command("training", ["train.json"], overrides), check=True, cwd=BUNDLE)
    train_minutes = (time.time() - start) / 60
    start = time.time()
    subprocess.run(bundle_command("run", ["train.json", "evaluate.json"], overrides), check=True, cwd=BUNDLE)
    score_minutes = (time.time() - start) / 60
    scores = json.loads((run_dir / "eval" / "pannuke_scores.json").read_text())
    cpu = f"CPU {cpu_name()} ({os.cpu_count()} cores)"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    machine = f"{device}, torch {torch.__version__}, python {platform.python_version()}"
    result = {
        "tag": args.tag,
        "machine": machine,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "reduced": args.reduced,
        "overrides": extra,
        "training_minutes": round(train_minutes, 1),
        "scoring_minutes": round(score_minutes, 1),
        "scores": scores,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    print(
        f"{machine}; epochs {args.epochs}, batch {args.batch_size}, reduced {args.reduced}, overrides {extra}; "
        f"training {train_minutes:.1f} min, scoring {score_minutes:.1f} min"
    )
    print(json.dumps(scores["overall"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
