"""Test-time augmentation: outputs mapped back in space, HV maps rotated back as vectors."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SimpleInferer

from scripts.model.targets import hover_maps
from scripts.model.tta import FlipRotateInferer, with_tta


def coded_tiles() -> torch.Tensor:
    """(2, 3, 24, 24) "images" whose first channel is an instance map of non-square, off-centre nuclei."""
    inst = torch.zeros(2, 24, 24)
    inst[0, 2:7, 3:12] = 1
    inst[0, 7:20, 5:9] = 2
    inst[1, 10:22, 12:23] = 5
    return torch.stack([inst, torch.rand(2, 24, 24), torch.rand(2, 24, 24)], dim=1)


def oracle(x: torch.Tensor) -> torch.Tensor:
    """A "network" for the hv target: class logits from the pixel values, HV maps of its input's instance map."""
    inst = x[:, 0].round().long()
    logits = torch.nn.functional.one_hot((inst > 0).long() * 2, 6).permute(0, 3, 1, 2).float() + x[:, 1:2]
    return torch.cat([logits, hover_maps(inst)], dim=1)


@pytest.mark.parametrize("copies", [4, 8])
def test_tta_of_an_equivariant_network_equals_the_plain_output(copies):
    x = coded_tiles()
    plain = SimpleInferer()(x, oracle)
    torch.testing.assert_close(FlipRotateInferer(SimpleInferer(), "hv", copies)(x, oracle), plain, atol=1e-5, rtol=0)


def test_without_the_vector_correction_the_average_would_be_wrong():
    """The same average taken as if HV maps were images differs: the correction is what the first test checks."""
    x = coded_tiles()
    plain = oracle(x)
    naive = sum(torch.rot90(oracle(torch.rot90(x, k, (-2, -1))), -k, (-2, -1)) for k in range(4)) / 4
    assert (naive[:, 6:] - plain[:, 6:]).abs().max() > 0.5


def test_tta_averages_and_non_square_images_keep_their_shape():
    x = torch.rand(1, 3, 16, 24)
    out = FlipRotateInferer(SimpleInferer(), "boundary", 8)(x, lambda t: t.mean(1, keepdim=True).expand(-1, 7, -1, -1))
    assert out.shape == (1, 7, 16, 24)
    torch.testing.assert_close(out, x.mean(1, keepdim=True).expand(-1, 7, -1, -1))


def test_with_tta_switch():
    base = SimpleInferer()
    assert with_tta(base, "hv", False) is base and with_tta(base, "hv", "false") is base
    assert isinstance(with_tta(base, "hv", "true"), FlipRotateInferer)
    with pytest.raises(ValueError, match="copies"):
        FlipRotateInferer(base, "hv", 3)


def test_tta_wraps_the_tiled_inferer_of_inference_json():
    from monai.bundle import ConfigParser

    from conftest import BUNDLE_ROOT

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / c) for c in ("train.json", "inference.json")])
    parser["tta"] = "true"
    parser["tile_size"], parser["tile_margin"] = 32, 8  # several tiles, and windows of 48 px padded to the stride
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, FlipRotateInferer)
    x = torch.rand(1, 3, 40, 72)  # not square, not a multiple of the tile: rotations swap height and width
    pixelwise = lambda t: torch.cat([t, t[:, :1].expand(-1, 5, -1, -1)], dim=1)  # noqa: E731  8 channels
    out = inferer(x, pixelwise)
    assert out.shape == (1, 8, 40, 72)
    torch.testing.assert_close(out[:, :6], pixelwise(x)[:, :6], atol=1e-5, rtol=0)
