"""The pretrained model that ships with the bundle, and how inference picks between it and a trained one.

`models/pretrained/model_fp16.pt` is a half-precision state dict committed on purpose (provenance, scores and
licence in `models/pretrained/README.md`): a lab runs inference on its own images right after the install, with no
training step.  Inference uses `models/model.pt` when a training run has written one, the shipped file otherwise,
and logs which.  Training writes only under `ckpt_dir` (`model.pt`, `training_state.pt`) and never opens the
shipped file; a new release replaces it by a deliberate commit made with `export_half_precision`:

    python -m scripts.workflows.engine.pretrained --checkpoint /path/to/models/model.pt \
        --output models/pretrained/model_fp16.pt
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from scripts.core.classes import checkpoint_classes, with_classes
from scripts.workflows.engine.checkpointing import atomic_save
from scripts.core.errors import ModelError
from scripts.model.weights import check_finite

logger = logging.getLogger(__name__)

SHIPPED_LICENCE = "CC BY-NC-SA 4.0 (inherited from the CoNSeP and MoNuSeg training data): non-commercial research use"


def trained_or_shipped(trained: str | os.PathLike, shipped: str | os.PathLike) -> str:
    """The trained weights if a training run wrote them, else the shipped pretrained model; an error naming both.

    Args:
        trained: the weights a training run writes (`ckpt_dir/model.pt`).
        shipped: the committed pretrained model (`models/pretrained/model_fp16.pt`).
    """
    if Path(trained).is_file():
        logger.info(f"using the trained model {trained}")
        return str(trained)
    if Path(shipped).is_file():
        logger.info(f"no trained model at {trained}: using the shipped pretrained model {shipped} ({SHIPPED_LICENCE})")
        return str(shipped)
    raise ModelError(
        f"no trained weights at {trained} and no shipped pretrained model at {shipped}. Train first (python -m "
        "monai.bundle run training --config_file configs/train.json ...), or pass --checkpoint /path/to/model.pt."
    )


def export_half_precision(checkpoint: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write a trained state dict as float16 (halves the size; inference casts back to the network's dtype).

    Only floating-point tensors are converted; integer buffers (BatchNorm's num_batches_tracked) stay as they are.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint} is not a plain state dict of tensors (save model.state_dict())")
    check_finite(state, checkpoint)  # what inference would refuse is never shipped
    limit = torch.finfo(torch.float16).max
    beyond = [k for k, v in state.items() if v.is_floating_point() and v.numel() and v.abs().max() > limit]
    if beyond:  # float16 would hold them as infinity
        raise ModelError(
            f"{checkpoint}: {len(beyond)} tensors hold values beyond float16's range (first: {beyond[0]}); ship the "
            "float32 file instead"
        )
    half = with_classes(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()}, checkpoint_classes(state, checkpoint)
    )
    atomic_save(half, output)
    return Path(output)


def main() -> None:
    parser = argparse.ArgumentParser(description="Export a trained model.pt as the half-precision shipped model")
    parser.add_argument("--checkpoint", required=True, help="trained state dict (models/model.pt)")
    parser.add_argument("--output", default="models/pretrained/model_fp16.pt")
    args = parser.parse_args()
    out = export_half_precision(args.checkpoint, args.output)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MB)")


if __name__ == "__main__":
    main()
