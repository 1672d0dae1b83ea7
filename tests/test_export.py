"""`python -m monai.bundle ckpt_export` (TorchScript) and `onnx_export` on this bundle, as docs/inference.md gives them.

The exported models must compute what the PyTorch network computes: TorchScript to 1e-6, ONNX Runtime to
atol 1e-5 + rtol 1e-4 (float32 kernels differ; observed differences are ~1e-7).  The ONNX export uses torch's
dynamo exporter (the default since torch 2.9), which needs `onnxscript`; `onnx` and `onnxruntime` load and run it.
TorchScript goes through the command line; ONNX through the same function called in-process (`monai.bundle`'s
command line is python-fire over these functions), which saves a second interpreter start on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT

pytestmark = pytest.mark.slow

DYNAMIC_AXES = {"image": {0: "batch", 2: "height", 3: "width"}, "pred": {0: "batch", 2: "height", 3: "width"}}
ONNX_KWARGS = {"input_names": ["image"], "output_names": ["pred"], "dynamic_axes": DYNAMIC_AXES}


def network() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    return parser.get_parsed_content("network_def")


def export_cli(command: str, net_file: Path, ckpt: Path) -> None:
    """The documented command line, run from bundle/ like a user would."""
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        command,
        "network_def",
        "--filepath",
        str(net_file),
        "--ckpt_file",
        str(ckpt),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/train.json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert net_file.is_file()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A random-init checkpoint of the real architecture, with non-trivial BatchNorm statistics."""
    work = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    net = network()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), work / "model.pt")
    return work, net.eval()


def inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(2, 3, 64, 64, generator=generator), torch.rand(1, 3, 96, 80, generator=generator)]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_matches_pytorch(trained):
    work, net = trained
    export_cli("ckpt_export", work / "model.ts", work / "model.pt")
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(work / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["name"].startswith("PanNuke")
    with torch.no_grad():
        for x in inputs():
            torch.testing.assert_close(scripted(x), net(x), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:# 'dynamic_axes' is not recommended:UserWarning")
@pytest.mark.filterwarnings("ignore:from_dynamic_axes_to_dynamic_shapes is deprecated:DeprecationWarning")
def test_onnx_export_matches_pytorch(trained):
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (pip install '.[test]')")
    ort = pytest.importorskip("onnxruntime", reason="pip install '.[test]' for onnxruntime")
    work, net = trained
    from monai.bundle import onnx_export

    cwd = os.getcwd()
    os.chdir(BUNDLE_ROOT)
    try:
        onnx_export(
            net_id="network_def",
            filepath=str(work / "model.onnx"),
            ckpt_file=str(work / "model.pt"),
            meta_file="configs/metadata.json",
            config_file="configs/train.json",
            converter_kwargs=ONNX_KWARGS,
        )
    finally:
        os.chdir(cwd)
    session = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    with torch.no_grad():
        for x in inputs():  # batch 2 and a non-square size: the axes are dynamic, as sliding windows need
            (out,) = session.run(["pred"], {"image": x.numpy()})
            expected = net(x).numpy()
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
            assert (out.argmax(1) == expected.argmax(1)).mean() > 0.999
