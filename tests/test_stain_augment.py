import torch

from scripts.data.augment.stain import RandHEStainJitterd, jitter_stains


def test_identity_jitter_keeps_the_image():
    img = torch.rand(3, 16, 16) * 0.9 + 0.05
    out = jitter_stains(img, torch.ones(3), torch.zeros(3))
    assert torch.allclose(out, img, atol=1e-4)


def test_jitter_changes_colour_within_range_and_is_seeded():
    img = torch.rand(3, 16, 16) * 0.9 + 0.05
    t = RandHEStainJitterd("image", prob=1.0, scale_range=0.2, shift_range=0.1)
    t.set_random_state(0)
    a = t({"image": img})["image"]
    t.set_random_state(0)
    b = t({"image": img})["image"]
    assert torch.equal(a, b) and not torch.allclose(a, img, atol=1e-3)
    assert a.min() >= 0 and a.max() <= 1 and a.shape == img.shape


def test_batched_form():
    img = torch.rand(2, 3, 8, 8)
    out = jitter_stains(img, torch.ones(2, 3), torch.zeros(2, 3))
    assert torch.allclose(out, img.clamp(min=1 / 255), atol=1e-4)
