"""The tiled inferer: tiles laid as the slide workflow lays them, one network call per window, only cores kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scripts.core.errors import ConfigError
from scripts.model.tiled import NETWORK_STRIDE, TiledInferer, run_window, tile_spans


class Blur:
    """A 5x5 mean per channel (zeros past the input's edge) that records the sizes it was called with."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape))
        return F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=True)


@pytest.mark.parametrize("extent", [100, 1000, 1100, 1152, 1153, 2100, 3000])
def test_cores_cover_the_image_once_and_windows_stay_inside_with_one_length(extent):
    spans = tile_spans(extent, 1024, 64)
    covered = [i for start, length, _, _ in spans for i in range(start, start + length)]
    assert covered == list(range(extent))
    assert len({length for _, _, _, length in spans}) == 1
    assert len({window for _, _, window, _ in spans}) == len(spans)  # no window twice (2100: the last two share one)
    for start, length, window, window_length in spans:
        assert 0 <= window <= start and start + length <= window + window_length <= extent
        if extent > 1152 and 64 <= start and start + length + 64 <= extent:
            assert window == start - 64  # margin on both sides where the image allows


def test_an_image_up_to_one_window_is_one_call_on_exactly_its_pixels():
    x = torch.rand(1, 3, 1000, 1100)
    blur = Blur()
    out = TiledInferer(1024, 64)(x, blur)
    assert blur.sizes == [(1, 3, 1008, 1104)]  # padded to the network's stride, once
    torch.testing.assert_close(out, run_window(Blur(), x), rtol=0, atol=0)
    inside = F.avg_pool2d(x, 5, stride=1, padding=2)[..., :-2, :-2]
    torch.testing.assert_close(out[..., :-2, :-2], inside, rtol=0, atol=0)  # the stride's padding only at the end


@pytest.mark.parametrize("batch_size", [1, 3])
def test_tiles_give_what_one_pass_gives_and_the_network_sees_only_whole_strides(batch_size):
    x = torch.rand(2, 3, 208, 336)  # two images; tiles of 64 with margins of 8, wider than the blur reaches
    blur = Blur()
    out = TiledInferer(64, 8, batch_size=batch_size)(x, blur)
    torch.testing.assert_close(out, run_window(Blur(), x), rtol=0, atol=0)
    assert all(h % NETWORK_STRIDE == 0 and w % NETWORK_STRIDE == 0 for _, _, h, w in blur.sizes)
    assert sum(n for n, *_ in blur.sizes) == 2 * 4 * 6  # each of the 4 x 6 windows once per image


def test_a_margin_wider_than_the_tile_is_refused():
    with pytest.raises(ConfigError, match=r"^--tile_margin must be from 0 to --tile_size \(64\).*got 65$"):
        TiledInferer(64, 65)
