"""Weights that cannot be trusted are refused with the file's name and the reason, before any work starts."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from monai.networks.nets import BasicUNet

from scripts.model.weights import WeightsLoader, load_state_dict_file
from scripts.core.errors import ModelError

FEATURES = (8, 8, 16, 32, 64, 8)


def net(out_channels: int = 8, features=FEATURES) -> torch.nn.Module:
    return BasicUNet(spatial_dims=2, in_channels=3, out_channels=out_channels, features=features, norm="batch")


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(net().state_dict(), path)
    return path


def test_good_and_half_precision_weights_load(good, tmp_path):
    load_state_dict_file(net(), good)
    half = tmp_path / "half.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in net().state_dict().items()}, half)
    target = net()
    load_state_dict_file(target, half)
    assert next(target.parameters()).dtype == torch.float32


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", *[f"random{seed}" for seed in range(40)]])
def test_damaged_files_are_named(good, damage):
    data = good.read_bytes()
    noise = np.random.default_rng(int(damage[6:]) if damage.startswith("random") else 0).bytes(5000)
    good.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"weights"}.get(damage, noise))
    with pytest.raises(ModelError, match=r"model\.pt: not a readable PyTorch checkpoint.*train again"):
        load_state_dict_file(net(), good)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelError, match="evil.pt: not a readable"):
        load_state_dict_file(net(), path)
    assert not (tmp_path / "pwned").exists()


def test_other_class_count_or_width_is_explained(good):
    with pytest.raises(
        ModelError, match=r"model\.pt was not made for this network.*another shape.*--target, --features"
    ):
        load_state_dict_file(net(out_channels=9), good)
    with pytest.raises(ModelError, match="was not made for this network"):
        load_state_dict_file(net(features=(16, 16, 32, 64, 128, 16)), good)


def test_nan_weights_are_refused(tmp_path):
    state = net().state_dict()
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ModelError, match="nan.pt: 1 weights tensors hold NaN"):
        load_state_dict_file(net(), tmp_path / "nan.pt")


def test_impossible_statistics_are_refused(tmp_path):
    """Finite but impossible weights (a negative BatchNorm variance) made every output NaN: 'done', 0 nuclei."""
    state = net().state_dict()
    next(v for k, v in state.items() if k.endswith("running_var")).fill_(-1.0)
    torch.save(state, tmp_path / "bad_var.pt")
    with pytest.raises(ModelError, match="bad_var.pt: 1 normalisation layers have a negative running variance"):
        load_state_dict_file(net(), tmp_path / "bad_var.pt")


def test_not_a_state_dict_and_missing_file(tmp_path):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="expected a dict"):
        load_state_dict_file(net(), tmp_path / "list.pt")
    with pytest.raises(ModelError, match="no weights at"):
        WeightsLoader(str(tmp_path / "absent.pt"), net()).attach(None)
