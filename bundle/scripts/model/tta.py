"""Test-time augmentation: average the network's output over flips and 90-degree rotations before post-processing.

Class logits are simply mapped back and averaged.  HV maps are vectors, not images: after a rotation the network's
horizontal map measures along what were the rows, so each output is mapped back in space *and* its two components
are rotated and sign-flipped back (a quarter turn counter-clockwise maps (h, v) to (v, -h); a column flip maps h to
-h) before the average.  The test compares with HV maps computed on the original instance map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

from scripts.core.flags import as_bool
from scripts.model.head import split_output
from scripts.model.targets import check_target

# (quarter turns, flip columns first) for the 8 symmetries of the square, or the 4 flips only
_SYMMETRIES = {8: [(k, f) for f in (False, True) for k in range(4)], 4: [(0, False), (0, True), (2, False), (2, True)]}


def _forward(x: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    return torch.rot90(x.flip(-1) if flip else x, turns, dims=(-2, -1))


def _backward(y: torch.Tensor, turns: int, flip: bool, target: str) -> torch.Tensor:
    """Map one output (B, C, H, W) computed on _forward(x) back to x's frame, HV components included."""
    y = torch.rot90(y, -turns, dims=(-2, -1))
    y = y.flip(-1) if flip else y
    logits, hv = split_output(y, target)
    if hv is None:
        return y
    h, v = hv[:, 0], hv[:, 1]
    for _ in range(turns % 4):  # undo each counter-clockwise quarter turn: (h', v') = (v, -h)  =>  (h, v) = (-v', h')
        h, v = -v, h
    if flip:
        h = -h
    return torch.cat([logits, h[:, None], v[:, None]], dim=1)


class FlipRotateInferer(Inferer):
    """Run `inferer` on each flipped/rotated copy of the input and average the outputs mapped back.

    Args:
        inferer: the inferer that runs the network on one copy (SimpleInferer, SlidingWindowInferer, ...).
        target: "hv" or "boundary", so the HV channels are recognised.
        copies: 8 (every flip and quarter turn) or 4 (flips only: cheaper).
    """

    def __init__(self, inferer: Inferer, target: str = "hv", copies: int = 8) -> None:
        super().__init__()
        if copies not in _SYMMETRIES:
            raise ValueError(f"copies must be one of {sorted(_SYMMETRIES)}, got {copies}")
        self.inferer, self.target, self.symmetries = inferer, check_target(target), _SYMMETRIES[copies]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        total = None
        for turns, flip in self.symmetries:
            out = self.inferer(_forward(inputs, turns, flip), network, *args, **kwargs)
            out = _backward(out, turns, flip, self.target).float()
            total = out if total is None else total + out
        return total / len(self.symmetries)


def with_tta(inferer: Inferer, target: str = "hv", tta: bool | str = False, copies: int = 8) -> Inferer:
    """`inferer` itself, or wrapped in FlipRotateInferer when `tta` is true (command-line strings accepted)."""
    return FlipRotateInferer(inferer, target, copies) if as_bool(tta, "tta") else inferer
