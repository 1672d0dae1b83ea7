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


def test_synthetic_nuclei_touching_whole_or_overlapping_in_pieces():
    from scipy import ndimage as ndi

    from scripts.data.synthetic_nuclei import prediction_like, random_types, synthetic_nuclei

    rng = np.random.default_rng(5)
    touching = synthetic_nuclei(rng, 40, 128, min_distance=8.0, cluster_spread=9.0)
    assert set(np.unique(touching)) == set(range(41))  # every nucleus placed, ids 1..40
    assert all(ndi.label(touching == i)[1] == 1 for i in range(1, 41))  # each one whole
    shared_edges = (touching[:, :-1] != touching[:, 1:]) & (touching[:, :-1] > 0) & (touching[:, 1:] > 0)
    assert shared_edges.sum() > 40  # clustered: neighbours touch
    overlapping = synthetic_nuclei(rng, 60, 64, radii=(2.0, 7.0), min_distance=0.0, margin=0.0, touching=False)
    assert any(ndi.label(overlapping == i)[1] > 1 for i in range(1, 61))  # a later nucleus cut an earlier one
    types = random_types(rng, touching)
    assert types[touching == 0].max() == 0 and set(np.unique(types[touching > 0])) <= set(range(1, 6))
    pred, pred_types = prediction_like(rng, touching, types)
    kept = set(np.unique(pred)[1:].tolist()) - {99_999}
    assert kept <= {3 * i + 1 for i in range(1, 41)}  # ids 3 id + 1: not contiguous
    assert 0.6 * 40 < len(np.unique(pred)) - 1 <= 41 and (pred_types[pred > 0] > 0).all()
