"""The GPU-friendly training path (configs/train_fast.json), checked on the CPU: batched augmentation, the folds held
as uint8 tensors, and real runs through monai.bundle, alone and under torchrun with the multi-GPU overlay."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.data import DistributedSampler as MonaiDistributedSampler
from monai.transforms import RandFlipd, RandRotate90d

from bundle_launch import launch
from pannuke_fixtures import write_dataset
from scripts.data.augment.batch import BatchAffine, BatchFlipRotate90, BatchStainJitter
from scripts.data.pannuke.device_tiles import DeviceTiles, identity_collate
from scripts.data.pannuke.datasets import PanNuke, PanNukeDataset

pytestmark = pytest.mark.slow

SMALL = ["--network_def#features", "[8, 8, 16, 32, 64, 8]", "--epochs", "2", "--batch_size", "2"]


def coded_batch(n: int = 64, size: int = 16) -> dict[str, torch.Tensor]:
    """Tiles whose image encodes the label (red channel = label / 6), so any misalignment between the two shows."""
    label = torch.randint(0, 7, (n, 1, size, size)).float()
    image = torch.cat([label / 6, torch.rand(n, 2, size, size)], dim=1)
    return {"image": image, "label": label}


def dihedral_index(tile: torch.Tensor, original: torch.Tensor) -> int:
    """Which of the 8 flips/rotations of `original` `tile` is (-1 if none)."""
    candidates = [original, original.flip(-1)]
    candidates = [c.rot90(k, (-2, -1)) for c in candidates for k in range(4)]
    return next((i for i, c in enumerate(candidates) if torch.equal(c, tile)), -1)


def test_flips_and_rotations_move_image_and_label_together():
    torch.manual_seed(0)
    batch = coded_batch()
    out = BatchFlipRotate90()(batch)
    assert torch.equal(out["image"][:, :1] * 6, out["label"])
    seen = {dihedral_index(out["label"][i], batch["label"][i]) for i in range(len(batch["label"]))}
    assert seen == set(range(8))  # every tile gets its own draw, and all 8 outcomes occur
    assert torch.equal(BatchFlipRotate90(flip_prob=0.0, rotate_prob=0.0)(batch)["image"], batch["image"])


def test_flip_rotate_draws_like_the_monai_transforms_it_replaces():
    """Same distribution over the 8 outcomes as RandFlipd x2 + RandRotate90d (identity ~ 1/16, others ~ 5/32)."""
    torch.manual_seed(0)
    tile = torch.arange(16.0).reshape(1, 4, 4)
    batched = BatchFlipRotate90(keys=["image"])({"image": tile.repeat(2000, 1, 1, 1)})["image"]
    ours = np.bincount([dihedral_index(t, tile) for t in batched], minlength=8) / 2000
    monai = [RandFlipd("image", 0.5, 0), RandFlipd("image", 0.5, 1), RandRotate90d("image", 0.75, 3)]
    for i, t in enumerate(monai):
        t.set_random_state(seed=i)
    counts = np.zeros(8)
    for _ in range(2000):
        item = {"image": tile}
        for t in monai:
            item = t(item)
        counts[dihedral_index(torch.as_tensor(item["image"]), tile)] += 1
    assert np.abs(ours - counts / 2000).max() < 0.03


def test_affine_uses_one_grid_for_image_and_label():
    torch.manual_seed(0)
    batch = coded_batch()
    out = BatchAffine(modes=["nearest", "nearest"], prob=1.0, rotate_range=0.5, scale_range=0.2)(batch)
    assert torch.equal(out["image"][:, :1] * 6, out["label"])
    assert (out["label"] != batch["label"]).flatten(1).any(1).float().mean() > 0.9  # nearly every tile moved
    default = BatchAffine(prob=1.0)(batch)
    assert set(default["label"].unique().tolist()) <= set(range(7))  # labels stay classes (nearest)
    assert torch.equal(BatchAffine(prob=0.0)(batch)["image"], batch["image"])


def test_affine_applies_to_about_prob_of_the_tiles():
    torch.manual_seed(0)
    batch = coded_batch(n=1000, size=8)
    moved = (BatchAffine(prob=0.3)(batch)["image"] != batch["image"]).flatten(1).any(1).float().mean()
    assert 0.25 < moved < 0.35


def test_stain_jitter_draws_per_tile_and_keeps_the_range():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 8, 8).repeat(200, 1, 1, 1) * 0.8 + 0.1
    out = BatchStainJitter(prob=0.8)({"image": image, "label": torch.zeros(200, 1, 8, 8)})
    changed = (out["image"] != image).flatten(1).any(1)
    assert 0.7 < changed.float().mean() < 0.9
    assert len({tuple(t.flatten()[:3].tolist()) for t in out["image"][changed]}) == int(changed.sum())
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    assert torch.equal(out["label"], torch.zeros(200, 1, 8, 8))


@pytest.fixture(scope="module")
def pannuke(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    return PanNuke(write_dataset(root / "data", tiles=(5, 2, 1)), root / "cache"), root


def test_device_tiles_hold_what_the_cpu_path_reads(pannuke):
    data, _ = pannuke
    tiles = DeviceTiles(data, folds=[1], device="cpu", memory_format=torch.channels_last, chunk_tiles=2)
    reference = PanNukeDataset(data, folds=[1], keys=("image", "inst", "type"))
    batch = tiles.__getitems__([4, 0, 3])
    for row, index in enumerate([4, 0, 3]):
        item = reference[index]
        assert torch.equal(batch["image"][row], torch.from_numpy(item["image"]).permute(2, 0, 1).float() / 255)
        assert torch.equal(batch["inst"][row, 0], torch.from_numpy(item["inst"].astype(np.int64)).float())
        assert torch.equal(batch["type"][row, 0], torch.from_numpy(item["type"]).float())
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert tiles[2]["image"].shape == (3, 256, 256)


def test_device_tiles_work_with_the_samplers_of_both_configs(pannuke):
    data, _ = pannuke
    tiles = DeviceTiles(data, folds=[1], device="cpu")
    shuffled = DataLoader(tiles, batch_size=2, shuffle=True, num_workers=0, collate_fn=identity_collate)
    assert [b["image"].shape[0] for b in shuffled] == [2, 2, 1]
    per_rank = [MonaiDistributedSampler(tiles, num_replicas=2, rank=r, shuffle=True, seed=0) for r in (0, 1)]
    indices = [list(s) for s in per_rank]
    assert sorted(itertools.chain(*indices))[:5] == [0, 1, 2, 3, 4]
    loader = DataLoader(tiles, batch_size=2, sampler=per_rank[0], num_workers=0, collate_fn=identity_collate)
    assert sum(b["inst"].shape[0] for b in loader) == len(indices[0])


def test_fast_config_trains_through_monai_bundle(pannuke):
    data, root = pannuke
    log = launch(
        "training", ["train.json", "train_fast.json"], root / "single", "--dataset_dir", str(data.dataset_dir), *SMALL
    )
    assert "tiles held on cpu" in log and "Epoch: 2/2" in log
    state = torch.load(root / "single" / "models" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_fast_config_composes_with_the_multi_gpu_overlay(pannuke):
    data, root = pannuke
    launch(
        "training",
        ["train.json", "train_fast.json", "multi_gpu_train.json"],
        root / "multi",
        "--dataset_dir",
        str(data.dataset_dir),
        *SMALL,
        ranks=2,
    )
    final = torch.load(root / "multi" / "models" / "training_state.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 2 * 2  # 5 tiles over 2 ranks, padded to 3 each: 2 steps of 2 per epoch


def test_compile_flag_from_the_command_line_is_a_real_bool():
    from monai.bundle import ConfigParser

    from conftest import BUNDLE_ROOT

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / c) for c in ("train.json", "train_fast.json")])
    parser["compile"] = "false"  # what `--compile false` hands over
    assert parser.get_parsed_content("train#trainer#compile") is False


def test_both_training_paths_read_one_set_of_augmentation_numbers():
    """train.json's `augmentation` is the only place the numbers live: change one there and both pipelines follow."""
    from monai.bundle import ConfigParser

    from conftest import BUNDLE_ROOT

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / c) for c in ("train.json", "train_fast.json")])
    parser["augmentation"]["affine_prob"] = 0.123
    parser["augmentation"]["stain_shift_range"] = 0.0456
    parser.parse()
    cpu = {type(t).__name__: t for t in parser.get_parsed_content("train#random_transforms")}
    fast = {type(t).__name__: t for t in parser.get_parsed_content("train#device_transforms").transforms}
    assert cpu["RandAffined"].prob == fast["BatchAffine"].prob == 0.123
    assert cpu["RandHEStainJitterd"].shift_range == fast["BatchStainJitter"].shift_range == 0.0456
    raw = (BUNDLE_ROOT / "configs" / "train_fast.json").read_text()
    assert "0.26" not in raw and "0.75" not in raw  # no copied numbers left to drift
