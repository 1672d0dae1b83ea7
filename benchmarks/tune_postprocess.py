"""Choose post-processing thresholds on the validation fold: one network pass, then a sweep of `instances` settings.

Runs the trained (or given) model once over a fold with the config's own validation preprocessing and network, keeps
the outputs in memory, and scores every value of the swept parameter with the per-image bPQ / mPQ of the official
protocol (mean over images).  Pick on the validation fold, never on the test fold.

    .venv/bin/python benchmarks/tune_postprocess.py --dataset_dir D --cache_dir C --checkpoint M --fold 2 \\
        --param energy_threshold --values 0.01 0.02 0.05 0.1 0.2 [--target hv] [--features "[16,16,32,64,128,16]"]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--fold", type=int, default=2)
    parser.add_argument("--param", default="energy_threshold")
    parser.add_argument("--values", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--target", default="")
    parser.add_argument("--features", default="")
    parser.add_argument("--base", default="{}", help="other instance settings held fixed, e.g. '{\"min_size\": 30}'")
    args = parser.parse_args()
    config = ConfigParser()
    config.read_config(str(BUNDLE / "configs" / "train.json"))
    config.update(
        {
            "bundle_root": str(BUNDLE),
            "dataset_dir": args.dataset_dir,
            "cache_dir": args.cache_dir,
            "device": "$torch.device('cpu')",
            "val_fold": args.fold,
            "train_folds": [args.fold],
            "test_fold": args.fold,
            "allow_fold_overlap": True,  # only the post-processing is tuned here, on the fold given
        }
    )
    if args.target:
        config["target"] = args.target
    if args.features:
        config["features"] = json.loads(args.features)
    for i in range(len(config["initialize"])):
        config.get_parsed_content(f"initialize#{i}")
    from scripts.workflows.evaluate.pq import score_image
    from scripts.model.postprocess import NucleiInstancesd

    network = config.get_parsed_content("network")
    network.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    network.eval()
    dataset = config.get_parsed_content("validate#dataset")
    outputs, truths = [], []
    with torch.inference_mode():
        for i in range(len(dataset)):
            item = dataset[i]
            outputs.append(network(item["image"][None].float())[0])
            truths.append((np.asarray(item["inst"])[0], np.asarray(item["type"])[0]))
    configured = config.get_parsed_content("instances")
    names = config.get_parsed_content("classes").names
    settings = {
        "keys": "pred",
        "target": configured.target,
        "min_size": configured.min_size,
        "energy_threshold": configured.energy_threshold,
        "marker_min_size": configured.marker_min_size,
        "seed_connectivity": configured.seed_connectivity,
        "min_nucleus_probability": configured.min_nucleus_probability,
        **json.loads(args.base),
    }
    print(f"{len(outputs)} tiles of fold {args.fold}; model {args.checkpoint}; target {config['target']}; {settings}")
    print(f"{args.param:>24}  bPQ     mPQ     AJI     predicted/true nuclei")
    best = None
    for value in args.values:
        transform = NucleiInstancesd(**{**settings, args.param: value})
        rows, counts = [], np.zeros(2)
        for out, (inst, types) in zip(outputs, truths, strict=True):
            pred = transform({"pred": out})
            pred_inst, pred_type = pred["inst_map"][0].numpy(), pred["type_map"][0].numpy()
            rows.append(score_image(inst, types, pred_inst, pred_type, class_names=names))
            counts += [np.unique(inst[inst > 0]).size, int(pred["inst_map"].max())]
        bpq = np.nanmean([r["bPQ"] for r in rows])
        mpq = np.nanmean([r["mPQ"] for r in rows])
        aji = np.nanmean([r["AJI"] for r in rows])
        print(f"{value:>24}  {bpq:.4f}  {mpq:.4f}  {aji:.4f}  {counts[1] / max(counts[0], 1):.3f}")
        best = max(best or (bpq, value), (bpq, value))
    print(f"best {args.param} on fold {args.fold}: {best[1]} (bPQ {best[0]:.4f})")


if __name__ == "__main__":
    sys.exit(main())
