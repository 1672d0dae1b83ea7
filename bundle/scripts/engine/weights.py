"""Loading weights the bundle can vouch for: a readable plain state dict, finite, and made for this network.

MONAI's CheckpointLoader reports a truncated file as a zip-reader error, a checkpoint of another width or class count
as a page of size mismatches, and loads NaN weights without a word (an evaluation then reports loss 0 and all scores
0).  `load_state_dict_file` checks all three and says, in one `ModelError` naming the file, what was expected and
how to fix it; `WeightsLoader` is the handler evaluate.json and inference.json use, and it loads when it is attached,
before the first image is read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine

from scripts.errors import ModelError

logger = logging.getLogger(__name__)

RETRAIN = "copy the file again, or train again (python -m monai.bundle run training --config_file configs/train.json)"


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """torch.load(weights_only=True) of a dict, or a ModelError that names the file and the likely cause."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no weights at {path}; pass --checkpoint /path/to/model.pt or train first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - damaged bytes fail in many ways (Unpickling, Index, UnicodeDecode...)
        reason = (str(err).splitlines() or ["empty file"])[0][:200]
        raise ModelError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {reason}); it is truncated, corrupt, "
            f"or holds more than tensors and plain values. {RETRAIN}"
        ) from None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a dict (a state dict), found {type(state).__name__}. {RETRAIN}")
    return state


def check_finite(state: Mapping[str, Any], path: str | os.PathLike, what: str = "weights") -> None:
    """Refuse NaN or infinite floating-point tensors: a diverged training, not a model."""
    bad = [
        k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise ModelError(
            f"{path}: {len(bad)} {what} tensors hold NaN or infinity (first: {bad[0]}); the training that wrote "
            "them diverged. Train again, e.g. with a lower --learning_rate"
        )


def load_into(network: torch.nn.Module, state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """network.load_state_dict(state), strict, with a mismatch explained (another target, width or class count)."""
    module = getattr(network, "module", network)  # DistributedDataParallel / DataParallel
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: expected a plain state dict of tensors (save model.state_dict()). {RETRAIN}")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        detail = []
        if shapes:
            k = shapes[-1]
            detail.append(
                f"{len(shapes)} tensors of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                f"{tuple(expected[k].shape)} in this network)"
            )
        if missing:
            detail.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise ModelError(
            f"{path} was not made for this network: {'; '.join(detail)}. Use the settings it was trained with "
            "(--target, --features: a different output layer means another target or class count)"
        )
    module.load_state_dict(state, strict=True)


def load_state_dict_file(network: torch.nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> None:
    """Read, check and load the weights at `path` into `network`."""
    state = read_checkpoint(path, map_location)
    check_finite(state, path)
    load_into(network, state, path)


class WeightsLoader:
    """Load checked weights into the network when attached to an engine (before it runs).

    Args:
        load_path: the state dict (`@checkpoint`).
        network: the configured network (`@network`).
        map_location: where tensors are loaded (`@device`).
    """

    def __init__(self, load_path: str, network: torch.nn.Module, map_location: Any = "cpu") -> None:
        self.load_path, self.network, self.map_location = load_path, network, map_location

    def attach(self, engine: Engine) -> None:
        load_state_dict_file(self.network, self.load_path, self.map_location)
        logger.info(f"loaded weights from {self.load_path}")
