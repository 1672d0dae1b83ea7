import numpy as np
import pytest
import torch
from monai.transforms import ComputeHoVerMaps
from skimage.segmentation import find_boundaries

from scripts.data.pannuke.cache import masks_to_instances
from scripts.data.pannuke.format import BOUNDARY
from scripts.model.targets import (
    BatchNucleiTargets,
    NucleiTargetsd,
    class_count,
    hover_maps,
    inner_boundary,
    label_map,
    nuclei_mask,
    output_channels,
)


def _masks(h=12, w=12):
    return np.zeros((h, w, 6))


def test_non_contiguous_ids_across_channels_become_distinct_instances():
    m = _masks()
    m[1:4, 1:4, 0] = 917  # neoplastic
    m[5:8, 1:4, 0] = 3
    m[1:4, 6:9, 2] = 917  # same id, other channel: another nucleus
    inst, types = masks_to_instances(m)
    assert inst.dtype == np.uint16 and types.dtype == np.uint8
    assert sorted(np.unique(inst)) == [0, 1, 2, 3]
    assert len({inst[2, 2], inst[6, 2], inst[2, 7]}) == 3
    assert types[2, 2] == 1 and types[6, 2] == 1 and types[2, 7] == 3
    assert types[0, 0] == 0 and inst[0, 0] == 0


def test_tile_without_background_pixel():
    m = _masks(4, 4)
    m[..., 4] = 7
    inst, types = masks_to_instances(m)
    assert (inst == 1).all() and (types == 5).all()


def test_empty_tile():
    inst, types = masks_to_instances(_masks())
    assert not inst.any() and not types.any()


def test_label_map_interior_and_boundary():
    inst = np.zeros((9, 9), np.uint16)
    inst[1:6, 1:6] = 1
    inst[1:6, 6:8] = 2  # touches nucleus 1
    types = np.where(inst == 1, 2, np.where(inst == 2, 4, 0)).astype(np.uint8)
    label = label_map(inst, types)
    assert label[3, 3] == 2  # interior keeps its type
    assert label[1, 3] == BOUNDARY and label[3, 5] == BOUNDARY and label[3, 6] == BOUNDARY
    assert label[0, 0] == 0
    assert set(np.unique(label[inst == 2])) == {BOUNDARY}  # 2 px wide: all outline


def test_nuclei_mask_reads_the_class_channel_only():
    assert nuclei_mask(torch.tensor([[0, 3, 6]])).tolist() == [[False, True, True]]
    hv_target = torch.tensor([[[0.0, 2.0]], [[0.5, -1.0]], [[0.3, 0.0]]])  # class, h, v
    assert nuclei_mask(hv_target).tolist() == [[[False, True]]]


# ---- targets built after augmentation: HV maps, inner boundary, the transform and its batched twin ----


def two_nuclei() -> np.ndarray:
    """A 3x5 nucleus (id 9) touching a 5x3 nucleus (id 4) on its right, ids deliberately not contiguous."""
    inst = np.zeros((12, 14), np.int64)
    inst[2:5, 2:7] = 9
    inst[2:7, 7:10] = 4
    return inst


def test_hover_maps_sign_range_and_values_on_a_hand_made_map():
    inst = two_nuclei()
    hv = hover_maps(torch.from_numpy(inst)[None])[0].numpy()
    h, v = hv
    assert hv.shape == (2, 12, 14) and hv.dtype == np.float32
    assert np.abs(hv).max() <= 1.0 and (hv[:, inst == 0] == 0).all()
    # nucleus 9 spans columns 2..6 (centre 4): h = (col - 4) / 2, rows 2..4 (centre 3): v = row - 3
    np.testing.assert_allclose(h[3, 2:7], [-1, -0.5, 0, 0.5, 1], atol=1e-6)
    np.testing.assert_allclose(v[2:5, 4], [-1, 0, 1], atol=1e-6)
    # left of each centre negative, right positive; the touching edge jumps from +1 to -1
    assert h[3, 6] == pytest.approx(1.0) and h[3, 7] == pytest.approx(-1.0)


def test_hover_maps_match_monai_compute_hover_maps():
    rng = np.random.default_rng(0)
    inst = np.zeros((64, 64), np.int64)
    for k in range(1, 30):
        r, c = rng.integers(0, 58, 2)
        inst[r : r + rng.integers(1, 9), c : c + rng.integers(1, 9)] = 7 * k  # overlapping, cut, 1-px nuclei
    ours = hover_maps(torch.from_numpy(inst)[None])[0].numpy()
    np.testing.assert_allclose(ours, ComputeHoVerMaps()(inst[None]).numpy(), atol=1e-5)


def test_hover_maps_of_a_batch_equal_the_maps_of_each_tile():
    inst = torch.from_numpy(np.stack([two_nuclei(), np.fliplr(two_nuclei()) * 3, np.zeros((12, 14), np.int64)]))
    batched = hover_maps(inst.long())
    for i in range(3):
        torch.testing.assert_close(batched[i], hover_maps(inst[i : i + 1].long())[0])


@pytest.mark.parametrize("turns,flip", [(0, True), (1, False), (2, False), (3, True)])
def test_hover_maps_transform_as_vectors_under_flips_and_rotations(turns, flip):
    """Maps of a flipped/rotated instance map = the moved maps with components rotated, which is why an HV map
    cannot be augmented as an image and targets are built after augmentation."""
    inst = torch.from_numpy(two_nuclei())[None]
    moved = torch.rot90(inst.flip(-1) if flip else inst, turns, dims=(-2, -1))
    h, v = hover_maps(inst)[0]
    if flip:
        h = -h.flip(-1)
        v = v.flip(-1)
    for _ in range(turns):  # a counter-clockwise quarter turn maps (h, v) to (v, -h) at the moved pixel
        h, v = torch.rot90(v, 1), torch.rot90(-h, 1)
    expected = torch.stack([h, v])
    torch.testing.assert_close(hover_maps(moved)[0], expected)
    assert not torch.equal(hover_maps(moved)[0], torch.rot90(hover_maps(inst)[0], turns, dims=(-2, -1))) or turns == 0


def test_inner_boundary_equals_find_boundaries_inner():
    rng = np.random.default_rng(1)
    inst = rng.integers(0, 4, (20, 20))
    ours = inner_boundary(torch.from_numpy(inst)[None])[0].numpy()
    np.testing.assert_array_equal(ours, find_boundaries(inst, mode="inner") & (inst > 0))


def test_targets_transform_matches_the_cached_label_map_and_the_batched_version():
    inst = two_nuclei()
    types = np.where(inst == 9, 2, np.where(inst == 4, 5, 0))
    item = {"inst": torch.from_numpy(inst)[None].int(), "type": torch.from_numpy(types)[None].int()}
    boundary = NucleiTargetsd(target="boundary")(item)["label"]
    assert boundary.shape == (1, 12, 14)
    np.testing.assert_array_equal(boundary[0].numpy(), label_map(inst.astype(np.uint16), types.astype(np.uint8)))
    hv = NucleiTargetsd(target="hv")(item)["label"]
    assert hv.shape == (3, 12, 14)
    np.testing.assert_array_equal(hv[0].numpy(), types)
    batch = {"inst": item["inst"][None].float(), "type": item["type"][None].float()}
    torch.testing.assert_close(BatchNucleiTargets(target="hv")(batch)["label"][0], hv)
    with pytest.raises(ValueError, match="--target must be one of hv, boundary"):
        NucleiTargetsd(target="polygons")


def test_channel_counts_per_target():
    assert (class_count("hv"), output_channels("hv")) == (6, 8)
    assert (class_count("boundary"), output_channels("boundary")) == (7, 7)


def test_hover_maps_refuse_ids_the_cache_cannot_hold():
    with pytest.raises(ValueError, match="instance ids must lie in"):
        hover_maps(torch.tensor([[[0, 70000]]]))
