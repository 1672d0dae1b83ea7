import numpy as np
import torch

from scripts.pannuke_format import BOUNDARY
from scripts.targets import label_map, masks_to_instances, nuclei_mask


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


def test_nuclei_mask():
    assert nuclei_mask(torch.tensor([[0, 3, 6]])).tolist() == [[False, True, True]]
