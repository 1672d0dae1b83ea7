"""The network over an image in tiles, laid out the way the slide workflow lays its tiles.

An image is cut into cores of `tile_size` (the last ones clipped to the image) and each core is given `margin` of
context on every side: its window.  A window never leaves the image: at the image's edge it is shifted inwards (its
core keeps its place), and where the image is narrower than a window it is the image's whole width, so every window of
one image has one size.  Each window goes through the network whole, padded by repeating its last row and column to a
multiple of `NETWORK_STRIDE`, and only its core is kept.  An image no larger than a window is therefore one network
call on exactly its pixels: no window seams, no invented border.

The slide workflow's tiles are these windows (`slides/plan.py` calls `window_span`), so a field saved as an image and
the same pixels as a slide reach the network identically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer

from scripts.core.errors import ConfigError

# BasicUNet halves its input four times; PyTorch pads an odd half itself, but the ONNX export has that padding fixed
# for the size it was traced at, so every window is padded to a multiple of 2**4 before the network
NETWORK_STRIDE = 16


@dataclass(frozen=True)
class Tile:
    """One tile of an image or slide, in model pixels: the core whose nuclei it keeps and the window the network
    sees (the core plus its context). An image analysed whole is one tile whose core and window are the image."""

    index: int
    core: tuple[int, int, int, int]  # x, y, width, height
    window: tuple[int, int, int, int]


def check_tiles(tile_size: int, margin: int) -> None:
    """Refuse a margin the tiles cannot have (a margin wider than the tile reads far past its neighbours)."""
    if not 0 <= int(margin) <= int(tile_size):
        raise ConfigError(f"--tile_margin must be from 0 to --tile_size ({tile_size}) pixels of context, got {margin}")


def window_span(start: int, extent: int, tile: int, margin: int) -> tuple[int, int]:
    """(start, length) along one axis of the window around the core that starts at `start`: `margin` on each side,
    shifted inwards where that would leave the image's `extent`, the whole extent where the image is narrower than
    a window."""
    length = tile + 2 * margin
    if extent <= length:
        return 0, extent
    return min(max(start - margin, 0), extent - length), length


def tile_spans(extent: int, tile: int, margin: int) -> list[tuple[int, int, int, int]]:
    """(core start, core length, window start, window length) along one axis; neighbouring cores whose windows
    coincide (near the image's end, or on an image narrower than a window) are one core, so no window runs twice."""
    spans: list[tuple[int, int, int, int]] = []
    for start in range(0, extent, tile):
        length, window = min(tile, extent - start), window_span(start, extent, tile, margin)
        if spans and spans[-1][2:] == window:
            length, start = length + spans[-1][1], spans.pop()[0]
        spans.append((start, length, *window))
    return spans


def run_window(network: Callable[..., torch.Tensor], windows: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The network's output on a batch of windows of any size: padded to a multiple of NETWORK_STRIDE by repeating
    the last row and column, the padding cut off again."""
    h, w = windows.shape[-2:]
    pad_h, pad_w = -h % NETWORK_STRIDE, -w % NETWORK_STRIDE
    if pad_h or pad_w:
        windows = F.pad(windows, (0, pad_w, 0, pad_h), mode="replicate")
    return network(windows, *args, **kwargs)[..., :h, :w]


class TiledInferer(Inferer):
    """The network over (B, C, H, W) images in tiles with context (see the module docstring).

    Args:
        tile_size: the core of a tile, in pixels (`@tile_size`).
        margin: context around each core, in pixels (`@tile_margin`; wider than a nucleus).
        batch_size: windows per network call (`@sw_batch_size`).
        device: where the whole image's output is put together (`@stitch_device`; None: the network's device).
    """

    def __init__(
        self, tile_size: int = 1024, margin: int = 64, batch_size: int = 1, device: str | torch.device | None = None
    ) -> None:
        super().__init__()
        check_tiles(tile_size, margin)
        self.tile_size, self.margin, self.batch_size = int(tile_size), int(margin), max(1, int(batch_size))
        self.device = None if device is None else torch.device(device)

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        height, width = inputs.shape[-2:]
        cells = [
            (row, col)
            for row in tile_spans(height, self.tile_size, self.margin)
            for col in tile_spans(width, self.tile_size, self.margin)
        ]
        images, out = inputs.shape[0], None
        for first in range(0, len(cells), self.batch_size):
            chunk = cells[first : first + self.batch_size]
            windows = torch.cat([inputs[..., wy : wy + wh, wx : wx + ww] for (_, _, wy, wh), (_, _, wx, ww) in chunk])
            pred = run_window(network, windows, *args, **kwargs)
            if out is None:
                shape = (images, pred.shape[1], height, width)
                out = torch.empty(shape, dtype=pred.dtype, device=self.device or pred.device)
            for i, ((y, h, wy, _), (x, w, wx, _)) in enumerate(chunk):
                core = pred[i * images : (i + 1) * images, :, y - wy : y - wy + h, x - wx : x - wx + w]
                out[..., y : y + h, x : x + w] = core.to(out.device)
        return out
