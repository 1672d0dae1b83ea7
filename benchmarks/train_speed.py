"""Training speed: tiles/s of the bundle's training loop end to end against the network step alone.

End to end is the config's own trainer (configs/train.json, plus overlays such as train_fast.json) on generated
PanNuke-format folds: cached tiles read, augmented, moved to the device and trained on.  The model-only step is the
same trainer, network, loss, optimizer and AMP settings fed one synthetic batch that already sits on the device.
The ratio of the two is the figure: 1.0 means the data path never makes the device wait.  No validation, logging or
checkpoints run; the first --warmup steps of each are not timed.

    .venv/bin/python benchmarks/train_speed.py --device cpu --batch-size 4 --steps 8
    .venv/bin/python benchmarks/train_speed.py --device cuda --batch-size 16 --steps 100 --num-workers 8
    .venv/bin/python benchmarks/train_speed.py --device cuda --batch-size 16 --steps 100 --config train_fast.json
    .venv/bin/python benchmarks/train_speed.py --device cpu --target boundary --features "[32,32,64,128,256,32]"
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import monai
import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_folds import cpu_name, write_folds  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({cpu_name()}, {torch.get_num_threads()} torch threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(trainer: SupervisedTrainer, warmup: int, steps: int, batch_size: int) -> float:
    """Run `trainer` for warmup + steps iterations; tiles per second over the last `steps`."""
    device = trainer.state.device
    stamps: list[float] = []

    def stamp(engine) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())
        if len(stamps) == warmup + steps:
            engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    trainer.run()
    if len(stamps) < warmup + steps:
        raise RuntimeError(f"the trainer stopped after {len(stamps)} of {warmup + steps} steps")
    return steps * batch_size / (stamps[-1] - stamps[warmup - 1])


def bundle_parser(args: argparse.Namespace, work: Path) -> ConfigParser:
    """train.json (+ overlays) on generated folds, every output in `work`, without handlers."""
    tiles = args.batch_size * (args.warmup + args.steps)  # one epoch: DataLoader start-up stays out of the timing
    data = write_folds(work / "data", (tiles, 1, 1))
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in ["train.json", *args.config]])
    parser.update(
        {
            "bundle_root": str(BUNDLE),
            "dataset_dir": str(data),
            "cache_dir": str(work / "cache"),
            "ckpt_dir": str(work / "models"),
            "output_dir": str(work / "eval"),
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "device": f"$torch.device('{args.device}')",
            "epochs": 2,
            "amp": args.device.startswith("cuda") and not args.no_amp,
            "train#handlers": [],
        }
    )
    if args.target:
        parser["target"] = args.target
    if args.features:
        parser["features"] = json.loads(args.features)
    for i in range(len(parser["initialize"])):
        parser.get_parsed_content(f"initialize#{i}")
    return parser


def model_only_trainer(
    trainer: SupervisedTrainer, batch_size: int, memory_format, steps: int, target: str
) -> SupervisedTrainer:
    """The same step on one synthetic batch (image and the config's target) already on the device."""
    from scripts.model.targets import nuclei_targets

    device = trainer.state.device
    image = torch.rand(batch_size, 3, 256, 256, device=device).contiguous(memory_format=memory_format)
    inst = torch.randint(0, 40, (batch_size, 256, 256), device=device)
    label = nuclei_targets(inst, (inst > 0).long() * torch.randint(1, 6, (batch_size, 1, 1), device=device), target)
    return SupervisedTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[{"image": image, "label": label}] * steps,
        network=trainer.network,
        optimizer=trainer.optimizer,
        loss_function=trainer.loss_function,
        inferer=trainer.inferer,
        amp=trainer.amp,
        amp_kwargs=trainer.amp_kwargs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", nargs="*", default=[], help="overlays after train.json, e.g. train_fast.json")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--no-amp", action="store_true", help="float32 even on a GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--target", default="", help="hv or boundary (default: the config's)")
    parser.add_argument("--features", default="", help='BasicUNet widths as JSON, e.g. "[32,32,64,128,256,32]"')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        config = bundle_parser(args, Path(tmp))
        trainer = config.get_parsed_content("train#trainer")
        memory_format = config.get_parsed_content("memory_format")
        end_to_end = timed_run(trainer, args.warmup, args.steps, args.batch_size)
        peak_e2e = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
        target = config.get_parsed_content("target")
        model_only = model_only_trainer(trainer, args.batch_size, memory_format, args.warmup + args.steps, target)
        network_step = timed_run(model_only, args.warmup, args.steps, args.batch_size)
    dtype = trainer.amp_kwargs.get("dtype", torch.float16) if trainer.amp else torch.float32
    print(
        f"device: {device_name(device)}; python {platform.python_version()}, torch {torch.__version__}, "
        f"monai {monai.__version__}, numpy {np.__version__}"
    )
    print(
        f"configs: train.json {' '.join(args.config)}; target {target}, features {config['features']}; "
        f"batch {args.batch_size}, dtype {str(dtype).split('.')[-1]}, "
        f"{str(memory_format).split('.')[-1]}, num_workers {trainer.data_loader.num_workers}, "
        f"compile {trainer.compile}; {args.steps} timed steps after {args.warmup}"
    )
    print(
        f"end to end (data + step): {end_to_end:8.1f} tiles/s"
        + (f", peak GPU memory {peak_e2e:.1f} GiB" if device.type == "cuda" else "")
    )
    print(f"model-only step:          {network_step:8.1f} tiles/s")
    print(f"end-to-end / model-only:  {end_to_end / network_step:8.2f}")


if __name__ == "__main__":
    main()
