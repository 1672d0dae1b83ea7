"""H&E stain jitter: the colour augmentation that matters most for pathology models.

Slides from different labs differ mainly in how much hematoxylin and eosin they took up and in the scanner's
colour response.  Following Tellez et al. (2018, "Whole-slide mitosis detection in H&E breast histology using PHH3
as a reference"), the RGB tile is deconvolved into hematoxylin / eosin / residual optical densities (Ruifrok &
Johnston vectors), each density is scaled and shifted by a small random amount, and the tile is recomposed.
Written in torch so the same code runs on CPU workers or on batches already on the GPU.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from skimage.color import rgb_from_hed

# rows: hematoxylin, eosin, residual (DAB) optical-density vectors over R, G, B; scikit-image's Ruifrok & Johnston
# matrix is the one source of the stain vectors (the demo data paints its nuclei with the same rows)
RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_EPS = 1.0 / 255.0


def jitter_stains(image: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """image (3, H, W) or (B, 3, H, W) RGB in 0..1; scale/shift (3,) or (B, 3) per stain. Returns RGB in 0..1."""
    od = -torch.log(image.clamp(min=_EPS))
    hed = torch.einsum("...chw,cd->...dhw", od, HED_FROM_RGB.to(image))
    hed = hed * scale[..., :, None, None] + shift[..., :, None, None]
    od = torch.einsum("...dhw,dc->...chw", hed, RGB_FROM_HED.to(image))
    return torch.exp(-od).clamp(0.0, 1.0)


class RandHEStainJitterd(RandomizableTransform, MapTransform):
    """Randomly rescale (1 +- scale_range) and shift (+- shift_range) the H, E and residual stain densities."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.8,
        scale_range: float = 0.05,
        shift_range: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.scale_range, self.shift_range = scale_range, shift_range

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._scale = 1.0 + self.R.uniform(-self.scale_range, self.scale_range, 3)
        self._shift = self.R.uniform(-self.shift_range, self.shift_range, 3)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            scale = torch.as_tensor(self._scale, dtype=img.dtype, device=img.device)
            shift = torch.as_tensor(self._shift, dtype=img.dtype, device=img.device)
            d[key] = jitter_stains(img, scale, shift)
        return d
