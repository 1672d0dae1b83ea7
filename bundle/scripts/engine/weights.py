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
from scripts.nuclei.targets import output_channels

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


def _output_layer(state: Mapping[str, Any]) -> str:
    """The module prefix of the last weight in a state dict: the network's 1x1 output convolution."""
    weights = [k for k in state if k.endswith(".weight")]
    if not weights:
        raise ModelError("the network has no weights")
    return weights[-1].rsplit(".", 1)[0]


def start_from(network: torch.nn.Module, path: str, target: str) -> None:
    """Initialise a training's network from earlier weights (fine-tuning), before the first step.

    Every tensor is copied.  When the file was trained on other classes, only the output layer differs: its
    background and its HV (or outline) channels are kept and its type channels keep their fresh initialisation, so
    the network still finds nuclei on the first step and learns the new types.  Any other difference (another
    width, another target) is refused with the file's name.  An empty `path` does nothing (training from scratch).

    Args:
        network: the configured network (`@network`).
        path: the weights to start from (`@init_checkpoint`); "" trains from scratch.
        target: the training target (`@target`), whose output layout both files share.
    """
    if not path:
        return
    state = read_checkpoint(path)
    check_finite(state, path)
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    module = getattr(network, "module", network)
    own = module.state_dict()
    head = _output_layer(own)
    extra = output_channels(target, 0) - 1  # channels after the types: HV maps, or the outline class
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    body = [k for k in mismatched if not k.startswith(head + ".")]
    if body or set(own) != set(state):
        load_into(network, state, path)  # raises, explaining the other width or target
    merged = dict(state)
    kept_types = True
    for key in mismatched:
        theirs, mine = state[key], own[key].clone()
        if theirs.shape[1:] != mine.shape[1:] or theirs.shape[0] <= extra or mine.shape[0] <= extra:
            load_into(network, state, path)
        mine[0] = theirs[0]
        mine[mine.shape[0] - extra :] = theirs[theirs.shape[0] - extra :]
        merged[key] = mine
        kept_types = False
    module.load_state_dict(merged, strict=True)
    if kept_types:
        logger.info(f"training starts from {path} (every layer kept)")
    else:
        logger.info(
            f"training starts from {path}: every layer kept except the type channels of {head}, re-initialised "
            f"for {own[head + '.weight'].shape[0] - 1 - extra} types (the file has "
            f"{state[head + '.weight'].shape[0] - 1 - extra})"
        )
