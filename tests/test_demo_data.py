import numpy as np

from pannuke_fixtures import fold_path
from scripts.data.pannuke.demo_data import make_tile, write_demo_dataset


def test_demo_dataset_has_the_pannuke_format(tmp_path):
    write_demo_dataset(tmp_path, (2, 1, 1), seed=3)
    images = np.load(fold_path(tmp_path, 1, "images"))
    masks = np.load(fold_path(tmp_path, 1, "masks"))
    types = np.load(fold_path(tmp_path, 1, "types"))
    assert images.shape == (2, 256, 256, 3) and images.dtype == np.float64
    assert masks.shape == (2, 256, 256, 6) and masks.dtype == np.float64
    assert types.shape == (2,) and types.dtype.kind == "U"
    assert 1.0 < images.max() <= 255 and images.min() >= 0
    ids = np.unique(masks[..., :5])
    assert ids.max() > len(ids)  # ids are not contiguous
    assert np.array_equal(masks[..., 5], (masks[..., :5].sum(-1) == 0).astype(float))


def test_demo_is_deterministic_and_has_touching_nuclei():
    a_img, a_mask = make_tile(np.random.default_rng(5))
    b_img, b_mask = make_tile(np.random.default_rng(5))
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    ids = a_mask[..., :5].max(-1) + 1000 * a_mask[..., :5].argmax(-1) * (a_mask[..., :5].max(-1) > 0)
    touching = (ids[:, 1:] != ids[:, :-1]) & (ids[:, 1:] > 0) & (ids[:, :-1] > 0)
    assert touching.any()
    # nuclei are darker than the background (hematoxylin)
    nuclei = a_mask[..., 5] == 0
    assert a_img[nuclei].mean() < a_img[~nuclei].mean() - 30
