"""Fine-tuning as a lab would do it, on real H&E, scored against the shipped model: the evidence for finetune.json.

Each "lab" is a real annotated set in ../shared/data, written as QuPath GeoJSON exports with the lab's own class
names, converted with `convert.py --annotations`, fine-tuned with `train.json` + `finetune.json`, and then run
through the README's tile inference on the lab's held-out images, for the shipped model and for the fine-tuned one.
Scores are the official per-image PQ (IoU > 0.5) and AJI on those outputs, averaged over the images; per-class PQ
uses the lab's names (the shipped model, trained on other classes, gets binary scores only).

  dsb      BBBC038 / DSB 2018 histology (107 crops of 256x320, untyped: one class "Nucleus"), split by image with
           a fixed seed into fine-tuning, validation and scoring images (--dsb_train images to fine-tune on).
           Caveat (../shared/data/README.md): several crops may come from one field, so the split can flatter
           the fine-tuned model; read it as a check of the mechanism on tissue the shipped model never saw.
  consep   CoNSeP with its own four classes (other, inflammatory, epithelial, spindle): train images 1-24 to
           fine-tune, 25-27 to validate, the 14 test images (224 patches of 256²) to score.
  monuseg8 eight MoNuSeg training images of 1000² (one class) to fine-tune, two to validate: the README's timing
           case ("8 images of 1000²"); its scores are not evidence (the shipped model trained on these images).

    python benchmarks/lab_finetune_check.py --lab dsb --work /tmp/labs [--tag lr5e-4] [bundle overrides...]

Unknown options go to the fine-tuning run (e.g. --learning_rate 0.001 --epochs 10).  Results: <work>/<lab>/<tag>/
result.json (minutes, machine, scores for "shipped" and "finetuned").
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

import numpy as np
import tifffile
import torch
from synthetic_folds import cpu_name

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(BUNDLE))
from scripts.data.pannuke.annotations import annotations_geojson  # noqa: E402
from scripts.data.pannuke.convert import instance_types  # noqa: E402
from scripts.workflows.evaluate.official_protocol import bundle_command  # noqa: E402
from scripts.workflows.evaluate.pq import aggregate_scores, score_image  # noqa: E402

SHIPPED = BUNDLE / "models" / "pretrained" / "model_fp16.pt"
CONSEP_NAMES = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle"}


def consep_image(stem: str) -> int:
    return int(stem.split("_")[1])  # train_<image>_<patch>


def lab_split(lab: str, dsb_train: int) -> tuple[Path, dict[str, list[str]], dict[int, str] | None]:
    """(source folder, {"train"|"val"|"test": stems}, class names by source type id or None for one class)."""
    if lab == "dsb":
        source = SHARED / "dsb2018_histo"
        stems = sorted(p.stem for p in (source / "images").iterdir())
        order = [stems[i] for i in np.random.default_rng(0).permutation(len(stems))]
        return source, {"train": order[:dsb_train], "val": order[70:82], "test": order[82:]}, None
    if lab == "consep":
        train = sorted(p.stem for p in (SHARED / "consep/train/images").iterdir())
        test = sorted(p.stem for p in (SHARED / "consep/test/images").iterdir())
        split = {
            "train": [s for s in train if consep_image(s) <= 24],
            "val": [s for s in train if consep_image(s) > 24],
            "test": test,
        }
        return SHARED / "consep", split, CONSEP_NAMES
    if lab == "monuseg8":
        source = SHARED / "monuseg_train"
        stems = sorted(p.stem for p in (source / "images").iterdir())
        return source, {"train": stems[:8], "val": stems[27:29], "test": stems[29:]}, None
    raise SystemExit(f"unknown lab {lab!r}")


def source_files(source: Path, split: str, stem: str) -> tuple[Path, Path]:
    folder = source / ("test" if split == "test" else "train") if source.name == "consep" else source
    image = next((folder / "images").glob(f"{stem}.*"))
    return image, folder / "labels" / f"{stem}.npz"


def write_lab(work: Path, lab: str, dsb_train: int) -> tuple[Path, Path, dict]:
    """QuPath exports of the lab's images, the converted folds, and the held-out images to score."""
    source, split, names = lab_split(lab, dsb_train)
    data, test_dir = work / "data", work / "test_images"
    if (data / "Fold 2").is_dir():
        return data, test_dir, split
    for part in ("train", "val", "test"):
        images, geojson = work / "qupath" / part / "images", work / "qupath" / part / "geojson"
        images.mkdir(parents=True, exist_ok=True)
        geojson.mkdir(parents=True, exist_ok=True)
        for stem in split[part]:
            image, labels = source_files(source, part, stem)
            if not (images / image.name).exists():
                (images / image.name).symlink_to(image)
            label = np.load(labels)
            inst = label["inst_map"]
            if names is None:
                classes = {int(i): None for i in np.unique(inst[inst > 0])}
            else:
                classes = {i: names[t] for i, t in instance_types(inst, label["type_map"]).items()}
            (geojson / f"{stem}.geojson").write_text(json.dumps(annotations_geojson(inst, classes)))
    for fold, part in ((1, "train"), (2, "val")):
        folder = work / "qupath" / part
        cmd = [sys.executable, str(BUNDLE / "scripts/data/pannuke/convert.py"), "--images", str(folder / "images")]
        cmd += ["--annotations", str(folder / "geojson"), "--output_dir", str(data), "--fold", str(fold)]
        cmd += ["--tissue", lab]
        if names is not None:
            cmd += ["--classes", ",".join(sorted(names.values()))]
        subprocess.run(cmd, check=True)
    test_dir.symlink_to(work / "qupath" / "test" / "images")
    return data, test_dir, split


def infer(test_dir: Path, checkpoint: Path, out: Path, threads: int) -> float:
    """The README's tile inference on the held-out images; returns its wall-clock seconds."""
    overrides = ["--input_dir", str(test_dir), "--output_dir", str(out), "--checkpoint", str(checkpoint)]
    overrides += ["--overwrite", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.time()
    cmd = bundle_command("run", ["train.json", "inference.json"], overrides)
    subprocess.run(cmd, check=True, cwd=BUNDLE, env=env, stdout=subprocess.DEVNULL)
    return time.time() - start


def score(out: Path, source: Path, stems: list[str], names: dict[int, str] | None, model_names: list[str]) -> dict:
    """Per-image PQ/AJI of the inference outputs against the truth, aggregated like the official protocol."""
    lab_names = sorted(names.values()) if names else ["Nucleus"]
    typed = names is not None and model_names == lab_names
    rows, counts = [], [0, 0]
    for stem in stems:
        _, labels = source_files(source, "test", stem)
        label = np.load(labels)
        true_inst = label["inst_map"].astype(np.int64)
        true_type = np.zeros_like(true_inst)
        if names is not None:  # source ids -> the lab's sorted class ids
            lut = {src: lab_names.index(name) + 1 for src, name in names.items()}
            per_id = np.zeros(int(true_inst.max()) + 1, dtype=np.int64)
            for i, source_type in instance_types(true_inst, label["type_map"]).items():
                per_id[i] = lut.get(source_type, 0)
            true_type = per_id[true_inst]
        else:
            true_type[true_inst > 0] = 1
        pred_inst = tifffile.imread(out / stem / f"{stem}_instances.tif").astype(np.int64)
        pred_type = tifffile.imread(out / stem / f"{stem}_types.tif").astype(np.int64)
        if not typed:
            pred_type = (pred_inst > 0).astype(np.int64)
        row = score_image(true_inst, true_type if typed else (true_inst > 0), pred_inst, pred_type,
                          class_names=lab_names if typed else ["Nucleus"])  # fmt: skip
        rows.append(row)
        counts[0] += len(np.unique(true_inst[true_inst > 0]))
        counts[1] += len(np.unique(pred_inst[pred_inst > 0]))
    agg = aggregate_scores(rows, ["lab"] * len(rows))
    result = {k: round(float(v), 4) for k, v in agg["overall"].items() if k not in ("n_tissues",)}
    result["per_class"] = {k: round(float(v), 4) for k, v in agg["per_class"].items()}
    result.update(true_nuclei=counts[0], predicted_nuclei=counts[1], count_ratio=round(counts[1] / counts[0], 3))
    result["typed"] = typed
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab", choices=("dsb", "consep", "monuseg8"), required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/labs"))
    parser.add_argument("--tag", default="default")
    parser.add_argument("--dsb_train", type=int, default=60, help="dsb images to fine-tune on")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip_shipped", action="store_true", help="do not run the shipped model again")
    args, extra = parser.parse_known_args()
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: nothing to check")
        return 1
    lab_work = args.work / args.lab
    data, test_dir, split = write_lab(lab_work, args.lab, args.dsb_train)
    source, _, names = lab_split(args.lab, args.dsb_train)
    run_dir = lab_work / args.tag
    overrides = ["--dataset_dir", str(data), "--cache_dir", str(lab_work / "cache")]
    overrides += ["--ckpt_dir", str(run_dir / "models"), "--output_dir", str(run_dir / "eval"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.time()
    cmd = bundle_command("training", ["train.json", "finetune.json"], overrides)
    subprocess.run(cmd, check=True, cwd=BUNDLE, env=env)
    minutes = (time.time() - start) / 60
    model_names = json.loads((data / "classes.json").read_text())["names"]
    results = {}
    shipped_json = lab_work / "shipped.json"
    if shipped_json.is_file() and args.skip_shipped:
        results["shipped"] = json.loads(shipped_json.read_text())
    else:
        seconds = infer(test_dir, SHIPPED, lab_work / "shipped_out", args.threads)
        results["shipped"] = score(lab_work / "shipped_out", source, split["test"], names, ["PanNuke"])
        results["shipped"]["inference_s"] = round(seconds, 1)
        shipped_json.write_text(json.dumps(results["shipped"], indent=1))
    seconds = infer(test_dir, run_dir / "models" / "model.pt", run_dir / "out", args.threads)
    results["finetuned"] = score(run_dir / "out", source, split["test"], names, model_names)
    results["finetuned"]["inference_s"] = round(seconds, 1)
    cpu = f"CPU {cpu_name()} ({os.cpu_count()} cores)"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    record = {
        "lab": args.lab,
        "tag": args.tag,
        "overrides": extra,
        "images": {k: len(v) for k, v in split.items()},
        "classes": model_names,
        "finetune_minutes": round(minutes, 1),
        "machine": f"{device}, torch {torch.__version__}, python {platform.python_version()}",
        **results,
    }
    (run_dir / "result.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
