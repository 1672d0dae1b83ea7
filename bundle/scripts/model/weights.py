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

from scripts.core.classes import NucleusClasses, check_same_classes, checkpoint_classes
from scripts.core.errors import ModelError

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
    """Refuse NaN or infinite floating-point tensors (a diverged training, not a model) and impossible statistics."""
    bad = [
        k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise ModelError(
            f"{path}: {len(bad)} {what} tensors hold NaN or infinity (first: {bad[0]}); the training that wrote "
            "them diverged. Train again, e.g. with a lower --learning_rate"
        )
    # a normalisation layer divides by sqrt(running_var + eps): a negative variance, which no training can produce,
    # silently turns every output into NaN (a run then reports "done" and 0 nuclei)
    negative = [
        k
        for k, v in state.items()
        if k.endswith("running_var") and isinstance(v, torch.Tensor) and v.is_floating_point() and (v < 0).any()
    ]
    if negative:
        raise ModelError(
            f"{path}: {len(negative)} normalisation layers have a negative running variance (first: {negative[0]}), "
            f"which no training writes: the file was altered or damaged. {RETRAIN}"
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


def load_state_dict_file(
    network: torch.nn.Module,
    path: str | os.PathLike,
    map_location: Any = "cpu",
    classes: NucleusClasses | None = None,
) -> None:
    """Read, check and load the weights at `path` into `network`; with `classes`, refuse a file of other classes."""
    state = read_checkpoint(path, map_location)
    check_finite(state, path)
    if classes is not None:
        found = checkpoint_classes(state, path)
        if found.names != classes.names:
            raise ModelError(
                f"{path} was trained on the classes {list(found.names)}, but this run's data has "
                f"{list(classes.names)}; evaluate it on data of those classes, or pass the checkpoint trained on "
                "this data (--checkpoint)"
            )
    load_into(network, state, path)


def classes_of_checkpoint(path: str, class_names: Any = None) -> NucleusClasses:
    """The classes inference uses: those the checkpoint was trained on (PanNuke's five for older files).

    Args:
        path: the weights inference loads (`@checkpoint`).
        class_names: optional names the user expects (`--class_names`); a checkpoint of other classes is refused.
    """
    return check_same_classes(checkpoint_classes(read_checkpoint(path), path), class_names, str(path))


class WeightsLoader:
    """Load checked weights into the network when attached to an engine (before it runs).

    Args:
        load_path: the state dict (`@checkpoint`).
        network: the configured network (`@network`).
        map_location: where tensors are loaded (`@device`).
        classes: the classes the run expects (`@classes`); a checkpoint trained on others is refused.
    """

    def __init__(
        self,
        load_path: str,
        network: torch.nn.Module,
        map_location: Any = "cpu",
        classes: NucleusClasses | None = None,
    ) -> None:
        self.load_path, self.network, self.map_location = load_path, network, map_location
        self.classes = classes

    def attach(self, engine: Engine) -> None:
        load_state_dict_file(self.network, self.load_path, self.map_location, self.classes)
        logger.info(f"loaded weights from {self.load_path}")


def _output_layer(state: Mapping[str, Any]) -> str:
    """The module prefix of the last weight in a state dict: the network's 1x1 output convolution."""
    weights = [k for k in state if k.endswith(".weight")]
    if not weights:
        raise ModelError("the network has no weights")
    return weights[-1].rsplit(".", 1)[0]


def start_from(network: torch.nn.Module, path: str, classes: NucleusClasses | None = None) -> None:
    """Initialise a training's network from earlier weights (fine-tuning), before the first step.

    Every layer is copied but the type channels of the output layer, which follow the class names: a class the file
    was trained on (same name, any case) keeps its channel, a new class starts from the fresh initialisation.  The
    background and the HV (or outline) channels are always kept, so the network finds nuclei from the first step and
    only has to learn the new types.  Another width or target is refused with the file's name.  An empty `path`
    does nothing (training from scratch).  The output layer is background, the K types, then the target's own
    channels (HV maps or the outline class): their count follows from each side's rows and classes.

    Args:
        network: the configured network (`@network`).
        path: the weights to start from (`@init_checkpoint`); "" trains from scratch.
        classes: the training data's classes (`@classes`); None: the file's own.
    """
    if not path:
        return
    state = read_checkpoint(path)
    check_finite(state, path)
    theirs_classes = checkpoint_classes(state, path)
    classes = classes or theirs_classes
    module = getattr(network, "module", network)
    own = module.state_dict()
    head = _output_layer(own)
    heads = {k for k in own if k.startswith(head + ".")}
    weight = head + ".weight"
    extra = own[weight].shape[0] - 1 - classes.num_types  # channels after the types: HV maps, or the outline class
    if weight in state and state[weight].shape[0] - 1 - theirs_classes.num_types != extra:
        raise ModelError(
            f"{path} was trained for another target (its output layer has {state[weight].shape[0]} channels for "
            f"{theirs_classes.num_types} classes, this network {own[weight].shape[0]} for {classes.num_types}); "
            "pass the --target it was trained with"
        )
    body_differs = any(state[k].shape != own[k].shape for k in own if k in state and k not in heads)
    if body_differs or set(own) != set(state) or any(state[k].shape[1:] != own[k].shape[1:] for k in heads):
        load_into(network, state, path)  # raises, explaining the other width or target
    index = {name.lower(): t for t, name in enumerate(theirs_classes.names)}
    kept = [name for name in classes.names if name.lower() in index]
    merged = dict(state)
    for key in heads:
        mine, theirs = own[key].clone(), state[key].to(own[key].dtype)
        mine[0] = theirs[0]
        mine[mine.shape[0] - extra :] = theirs[theirs.shape[0] - extra :]
        for t, name in enumerate(classes.names):
            if name.lower() in index:
                mine[1 + t] = theirs[1 + index[name.lower()]]
        merged[key] = mine
    module.load_state_dict(merged, strict=True)
    new = [name for name in classes.names if name.lower() not in index]
    detail = "every layer kept" if not new else f"new type channels for {', '.join(new)}"
    logger.info(
        f"training starts from {path} ({detail}; classes kept from it: {', '.join(kept) or 'none'}; "
        f"it was trained on {', '.join(theirs_classes.names)})"
    )
