"""Would int8 pay on a CPU? ONNX Runtime's dynamic and static (QDQ, calibrated) int8 against the float32 export.

    python benchmarks/int8_trial.py [--work /tmp/int8_trial] [--count 14]

The shipped model is exported as `--backend onnxruntime` exports it, then quantized with onnxruntime.quantization
(needs the `onnx` package: pip install -e ".[test]"): dynamic (int8 weights, activations quantized on the fly) and
static QDQ (int8 weights and activations, ranges calibrated on 256² tiles of MoNuSeg training images 1-8).  Printed
per variant: tiles of 256² per second on batches of 4 x 256² (best of 3), the largest output difference from
float32, and the binary PQ of the whole sliding-window + post-processing pipeline on the last --count real 1000²
MoNuSeg images, against float32's.  The bundle keeps an int8 option only if PQ moves by at most 0.005.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from backend_speed import SHARED, shipped_network  # noqa: E402
from synthetic_folds import cpu_name  # noqa: E402  (postprocess_speed pins one thread at import)
from scripts.model.backends import export_onnx  # noqa: E402
from scripts.workflows.evaluate.pq import pq_counts  # noqa: E402

IMAGES = SHARED / "monuseg_train" / "images"
LABELS = SHARED / "monuseg_train" / "labels"


def read(path: Path) -> torch.Tensor:
    """(1, 3, H, W) float in 0-1, as inference preprocessing hands it to the network."""
    rgb = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


class Calibration:
    """onnxruntime's CalibrationDataReader over 256² tiles of a few training images."""

    def __init__(self, paths: list[Path]) -> None:
        tiles = [read(p)[..., r : r + 256, c : c + 256] for p in paths for r in (0, 372, 744) for c in (0, 372, 744)]
        self.batches = iter([{"image": t.numpy()} for t in tiles])

    def get_next(self):
        return next(self.batches, None)


class Session(torch.nn.Module):
    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"image": x.numpy()})[0])


def main() -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/int8_trial"))
    parser.add_argument("--count", type=int, default=14)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    os.chdir(args.work)  # the quantization tools leave temporary files in the working directory
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    paths = sorted(IMAGES.iterdir())
    float_path, pre = args.work / "float32.onnx", args.work / "pre.onnx"
    export_onnx(shipped_network(), float_path)
    quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)  # that pass fails on dynamic sizes
    variants = {"float32": float_path}
    quantize_dynamic(str(pre), str(args.work / "dynamic.onnx"), weight_type=QuantType.QInt8)
    variants["int8 dynamic"] = args.work / "dynamic.onnx"
    quantize_static(
        str(pre),
        str(args.work / "static.onnx"),
        Calibration(paths[:8]),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    variants["int8 static (QDQ)"] = args.work / "static.onnx"

    inferer = SlidingWindowInferer(roi_size=(256, 256), sw_batch_size=4, overlap=0.25, mode="gaussian", cval=1.0)
    config = ConfigParser()
    config.read_config(str(ROOT / "bundle" / "configs" / "train.json"))
    instances = config.get_parsed_content("instances")  # the bundle's post-processing, as configured
    batch = torch.rand(4, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    tests = paths[-args.count :]
    reference = None
    for name, path in variants.items():
        try:
            net = Session(path)
        except Exception as err:  # noqa: BLE001 - a variant ONNX Runtime cannot run is reported, not fatal
            print(f"  {name:20s} does not load in ONNX Runtime: {type(err).__name__}: {str(err)[:150]}")
            continue
        out = net(batch)
        reference = out if reference is None else reference
        best = min(_timed(net, batch) for _ in range(3))
        scores = []
        with torch.no_grad():
            for image in tests:
                pred = inferer(read(image), net)[0]
                inst = instances.instances(pred)[0]
                truth = np.load(LABELS / f"{image.stem}.npz")["inst_map"]
                scores.append(pq_counts(truth, inst)[2])
        diff = float((out - reference).abs().max())
        print(f"  {name:20s} {4 / best:6.1f} tiles/s   max |diff| {diff:8.2e}   binary PQ {np.mean(scores):.4f}")


def _timed(net: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    net(x)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
