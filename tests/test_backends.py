"""The inference backends: OpenVINO and ONNX Runtime compute what PyTorch computes (shipped model, TTA, any class
count), their export is cached under the weights' hash, refreshed when they change and rebuilt when the cached file is
damaged."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT
from scripts.core.errors import ConfigError, ModelError
from scripts.data.pannuke.demo_data import make_tile
from scripts.model.backends import CPU_RUNTIMES, InferenceNetwork
from scripts.model.tiled import TiledInferer
from scripts.model.tta import with_tta
from scripts.model.weights import load_state_dict_file

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

SHIPPED = BUNDLE_ROOT / "models" / "pretrained" / "model_fp16.pt"
ATOL = 1e-4  # float32 kernels of two libraries; observed differences are ~1e-5 on logits of magnitude ~10


def network(**overrides) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("network_def").eval()


@pytest.fixture(scope="module")
def shipped():
    net = network()
    load_state_dict_file(net, SHIPPED)
    return net


@pytest.fixture(scope="module")
def tile() -> torch.Tensor:
    """A synthetic H&E tile, 1 x 3 x 256 x 256 in 0-1, as preprocessing hands it to the network."""
    image, _ = make_tile(np.random.default_rng(3))
    return torch.from_numpy(image / 255.0).float().permute(2, 0, 1)[None]


def run(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_each_cpu_runtime_computes_what_pytorch_computes_on_the_shipped_model(shipped, tile, tmp_path, runtime):
    reference = run(shipped, tile)
    ort = InferenceNetwork(shipped, runtime, str(tmp_path)).eval()
    torch.testing.assert_close(run(ort, tile), reference, atol=ATOL, rtol=0)
    other = torch.rand(3, 3, 320, 192)  # another batch size and a non-square window: the export's sizes are dynamic
    torch.testing.assert_close(run(ort, other), run(shipped, other), atol=ATOL, rtol=0)
    assert len(list(tmp_path.glob("network-*.onnx"))) == 1


def test_pytorch_backend_in_channels_last_memory_gives_the_same_numbers(shipped, tile):
    reference = run(shipped, tile)
    fast = InferenceNetwork(network(), "torch").eval()
    fast.network.load_state_dict(shipped.state_dict())
    torch.testing.assert_close(run(fast, tile), reference, atol=1e-5, rtol=1e-5)


def test_auto_picks_openvino_on_a_cpu_then_onnxruntime_then_pytorch(shipped, tile, tmp_path, monkeypatch, caplog):
    auto = InferenceNetwork(shipped, "auto", str(tmp_path)).eval()
    run(auto, tile[..., :64, :64])
    assert auto.chosen == "openvino"
    assert auto.resolve(torch.device("cuda")) == "torch"
    missing: set[str] = set()
    monkeypatch.setattr("scripts.model.backends._installed", lambda runtime: runtime not in missing)
    missing.add("openvino")
    assert auto.resolve(torch.device("cpu")) == "onnxruntime"
    missing.add("onnxruntime")
    with caplog.at_level(logging.WARNING):
        assert auto.resolve(torch.device("cpu")) == "torch"
    assert "neither openvino nor onnxruntime is installed" in caplog.text
    with pytest.raises(ConfigError, match="--backend openvino needs OpenVINO: pip install openvino"):
        InferenceNetwork(shipped, "openvino").resolve(torch.device("cpu"))


def test_a_runtime_that_cannot_run_here_gives_way_under_auto_and_is_one_line_when_asked_for(
    tile, tmp_path, monkeypatch, caplog
):
    """An installed runtime that fails on this machine (a native library or CPU its plugin does not support) used
    to stop auto with a traceback after deleting a good cached export."""
    net = network(features=[8, 8, 16, 32, 64, 8])

    def broken(path, threads):
        raise RuntimeError("no CPU plugin for this processor")

    monkeypatch.setattr("scripts.model.backends._openvino", broken)
    with caplog.at_level(logging.WARNING):
        auto = InferenceNetwork(net, "auto", str(tmp_path)).eval()
        torch.testing.assert_close(run(auto, tile), run(net, tile), atol=ATOL, rtol=0)
    assert auto.chosen == "onnxruntime"
    assert "OpenVINO cannot run the network here (RuntimeError: no CPU plugin for this processor)" in caplog.text
    with pytest.raises(ModelError, match="^--backend openvino: OpenVINO cannot run the network here .*--backend auto"):
        run(InferenceNetwork(net, "openvino", str(tmp_path)).eval(), tile)
    monkeypatch.setattr("scripts.model.backends._onnxruntime", broken)
    last = InferenceNetwork(net, "auto", str(tmp_path)).eval()
    torch.testing.assert_close(run(last, tile), run(net, tile), atol=1e-5, rtol=1e-5)
    assert last.chosen == "torch"


@pytest.mark.parametrize("backend", ["torch", *CPU_RUNTIMES])
def test_tta_works_on_every_backend(shipped, tile, tmp_path, backend):
    inferer = TiledInferer(96, 16, batch_size=2)  # several windows per image, two per network call
    tta = with_tta(inferer, target="hv", tta=True)
    reference = run_inferer(tta, tile, shipped)
    wrapped = InferenceNetwork(shipped, backend, str(tmp_path)).eval()
    torch.testing.assert_close(run_inferer(tta, tile, wrapped), reference, atol=ATOL, rtol=0)


def run_inferer(inferer, x, net):
    with torch.no_grad():
        return inferer(x, net)


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_export_follows_the_class_count_of_the_weights(tmp_path, runtime):
    three = network(num_types=3)
    out = run(InferenceNetwork(three, runtime, str(tmp_path)).eval(), torch.rand(1, 3, 64, 96))
    assert out.shape == run(three, torch.rand(1, 3, 64, 96)).shape == (1, 6, 64, 96)  # background + 3 + HV


def test_new_weights_get_a_new_export_and_the_old_one_is_not_used(tmp_path, tile):
    net = network(features=[8, 8, 16, 32, 64, 8])
    first = InferenceNetwork(net, "onnxruntime", str(tmp_path)).eval()
    run(first, tile)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    second = InferenceNetwork(net, "onnxruntime", str(tmp_path)).eval()
    torch.testing.assert_close(run(second, tile), run(net, tile), atol=ATOL, rtol=0)
    assert len(list(tmp_path.glob("network-*.onnx"))) == 2


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_a_damaged_cached_export_is_rebuilt_with_a_log_line(tmp_path, tile, caplog, runtime):
    net = network(features=[8, 8, 16, 32, 64, 8])
    run(InferenceNetwork(net, runtime, str(tmp_path)).eval(), tile)
    (cached,) = tmp_path.glob("network-*.onnx")
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 3])  # a copy cut short
    with caplog.at_level(logging.WARNING):
        again = InferenceNetwork(net, runtime, str(tmp_path)).eval()
        torch.testing.assert_close(run(again, tile), run(net, tile), atol=ATOL, rtol=0)
    assert f"{cached}: cached ONNX export unusable" in caplog.text
    assert cached.is_file()


def test_an_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="--backend 'openvn' is not one of auto, torch, openvino, onnxruntime"):
        InferenceNetwork(torch.nn.Identity(), "openvn")


@pytest.mark.slow
def test_a_torch_without_the_torchscript_exporter_exports_through_torch_export(tmp_path, tile, monkeypatch):
    pytest.importorskip("onnxscript")
    export = torch.onnx.export

    def torch_export_only(*args, **kwargs):
        if not kwargs.get("dynamo", True):
            raise TypeError("export() got an unexpected keyword argument 'dynamo'")
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", torch_export_only)
    net = network(features=[8, 8, 16, 32, 64, 8])
    ort = InferenceNetwork(net, "onnxruntime", str(tmp_path)).eval()
    torch.testing.assert_close(run(ort, tile), run(net, tile), atol=ATOL, rtol=0)
    other = torch.rand(3, 3, 96, 160)
    torch.testing.assert_close(run(ort, other), run(net, other), atol=ATOL, rtol=0)


def test_an_unwritable_cache_folder_is_one_error_naming_it(tmp_path, tile):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the cache folder should be")
    ort = InferenceNetwork(network(features=[8, 8, 16, 32, 64, 8]), "onnxruntime", str(blocked)).eval()
    with pytest.raises(ModelError, match=f"cannot write the ONNX export to {blocked}/network-.*--onnx_cache_dir"):
        run(ort, tile)
