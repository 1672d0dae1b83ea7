"""The output layout (split_output), the loss terms and the class-map transform of scripts/model/head.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.model.head import ClassPredictiond, NucleiLoss, loss_class_weights, split_output
from scripts.model.targets import nuclei_targets


def two_nuclei_target(target: str = "hv") -> torch.Tensor:
    inst = torch.zeros(2, 32, 32, dtype=torch.long)
    inst[:, 4:12, 4:14] = 3
    inst[:, 12:20, 4:14] = 5  # touches nucleus 3 along a row
    return nuclei_targets(inst, 2 * (inst > 0).long(), target)


def perfect_prediction(label: torch.Tensor, classes: int) -> torch.Tensor:
    logits = 30.0 * torch.nn.functional.one_hot(label[:, 0].long(), classes).permute(0, 3, 1, 2).float()
    return torch.cat([logits, label[:, 1:]], dim=1)


def test_split_output_by_target():
    pred = torch.arange(8.0).view(1, 8, 1, 1).expand(2, 8, 4, 4)
    logits, hv = split_output(pred, "hv")
    assert logits.shape == (2, 6, 4, 4) and hv.shape == (2, 2, 4, 4) and hv[0, :, 0, 0].tolist() == [6.0, 7.0]
    logits, hv = split_output(pred[0], "hv")  # one decollated item
    assert logits.shape == (6, 4, 4) and hv.shape == (2, 4, 4)
    logits, hv = split_output(pred[:, :7], "boundary")
    assert logits.shape == (2, 7, 4, 4) and hv is None
    logits, hv = split_output(pred[:, :5], "hv")  # a lab's two classes: background, 2 types, 2 maps
    assert logits.shape == (2, 3, 4, 4) and hv[0, :, 0, 0].tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="3 channels, the 'hv' target needs at least 4"):
        split_output(pred[:, :3], "hv")


def test_hv_loss_terms_are_zero_for_the_truth_and_grow_with_the_error():
    label = two_nuclei_target()
    perfect = perfect_prediction(label, 6)
    only_hv = NucleiLoss(hv_mse_weight=1.0, hv_gradient_weight=0.0)
    only_gradient = NucleiLoss(hv_mse_weight=0.0, hv_gradient_weight=1.0)
    classes_only = NucleiLoss(hv_mse_weight=0.0, hv_gradient_weight=0.0)
    base = classes_only(perfect, label)
    assert only_hv(perfect, label) == pytest.approx(float(base), abs=1e-6)
    assert only_gradient(perfect, label) == pytest.approx(float(base), abs=1e-6)
    shifted = perfect.clone()
    shifted[:, 6:] += 0.5  # a constant error: MSE sees it, the gradient term does not
    assert float(only_hv(shifted, label) - base) == pytest.approx(0.25, rel=1e-4)
    assert float(only_gradient(shifted, label) - base) == pytest.approx(0.0, abs=1e-5)
    flat = perfect.clone()
    flat[:, 6:] = 0.0  # no sign change between the nuclei: the gradient term sees it
    assert float(only_gradient(flat, label) - base) > 0.01


def test_hv_errors_outside_nuclei_do_not_count():
    label = two_nuclei_target()
    pred = perfect_prediction(label, 6)
    noisy = pred.clone()
    outside = label[:, :1].expand(-1, 2, -1, -1) == 0
    noisy[:, 6:][outside] = 5.0
    loss = NucleiLoss(hv_gradient_weight=0.0)
    assert float(loss(noisy, label)) == pytest.approx(float(loss(pred, label)), abs=1e-6)


def test_hv_gradient_is_the_slope_per_pixel():
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 2, 16, 16) * 0.1
    grads = NucleiLoss().hv_gradients(ramp)
    assert torch.allclose(grads[0, 0, 4:12, 4:12], torch.tensor(0.1), atol=1e-6)  # d(h)/d(column)
    assert torch.allclose(grads[0, 1, 4:12, 4:12], torch.tensor(0.0), atol=1e-6)  # d(v)/d(row) of a column ramp


def test_boundary_loss_and_class_weights():
    label = two_nuclei_target("boundary")
    loss = NucleiLoss("boundary", class_weights=loss_class_weights("boundary", [1.0] * 5, 3.0))
    assert float(loss(perfect_prediction(label, 7), label)) < 0.05
    assert loss_class_weights("hv", [1, 2, 3, 4, 5], 3.0) == [1.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert loss_class_weights("boundary", [1.0] * 5, 3.0)[-1] == 3.0
    with pytest.raises(ValueError, match="--type_weights needs one weight of at least 0 per nucleus type"):
        loss_class_weights("hv", [1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="class_weights needs 6"):
        NucleiLoss("hv", class_weights=[1.0] * 7)


def test_loss_trains_a_tiny_network_towards_the_hv_target():
    torch.manual_seed(0)
    label = two_nuclei_target()
    image = torch.cat([label[:, :1] / 2, label[:, 1:]], dim=1)  # the answer is in the input: must be learnable
    net = torch.nn.Conv2d(3, 8, 3, padding=1)
    loss = NucleiLoss()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    first = float(loss(net(image), label).detach())
    for _ in range(60):
        opt.zero_grad()
        value = loss(net(image), label)
        value.backward()
        opt.step()
    assert float(value) < 0.5 * first


def test_class_prediction_transform():
    label = two_nuclei_target()
    pred = perfect_prediction(label, 6)[0]
    out = ClassPredictiond(keys="pred", target="hv")({"pred": pred})
    assert out["pred_class"].shape == (1, 32, 32)
    np.testing.assert_array_equal(out["pred_class"][0].numpy(), label[0, 0].numpy())


def test_balanced_type_weights_count_nuclei_per_type_in_the_training_folds(tmp_path):
    from pannuke_fixtures import write_dataset
    from scripts.model.head import balanced_type_weights
    from scripts.data.pannuke.cache import open_fold_cache
    from scripts.data.pannuke.datasets import PanNuke

    data = PanNuke(write_dataset(tmp_path / "data"), tmp_path / "cache", folds=[1, 2, 3])
    cache = open_fold_cache(data.cache(1))
    counts = np.zeros(6, np.int64)
    for inst, types in zip(cache["inst"], cache["type"], strict=True):  # the slow, obvious count
        for i in np.unique(inst[inst > 0]):
            counts[types[inst == i][0]] += 1
    present = counts[1:]
    expected = [(present.max() / c) ** 0.5 if c else 1.0 for c in present]
    np.testing.assert_allclose(balanced_type_weights(data, [1]), expected, rtol=1e-3)
    assert balanced_type_weights(data, [1], power=0.0) == [1.0] * 5
