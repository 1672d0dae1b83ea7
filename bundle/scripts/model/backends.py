"""Where the network runs at inference: PyTorch, or OpenVINO or ONNX Runtime on a CPU, behind one `torch.nn.Module`.

Inference, slide inference and evaluation hand the evaluator `InferenceNetwork` instead of the bare network.  It
looks like the network (a module taking and returning (B, C, H, W) tensors), so the tiled inferer, TTA and
the post-processing are the same on every backend.  It reads the network's weights at the first forward, when the
run's weights loader has put them in, so any weights work (shipped, trained, fine-tuned, any class count or width):

- "torch": the PyTorch network, in channels-last memory on a CPU, where the convolutions run faster that way.
- "openvino", "onnxruntime": the network exported to ONNX (dynamic batch and spatial sizes) and run in float32 by
  OpenVINO's or ONNX Runtime's CPU runtime.  The export is cached in `cache_dir` under the hash of the weights, so a
  second run starts at once and new weights get a new export; a cached file that does not load, or does not compute
  what the PyTorch network computes on a probe input, is exported again (with a log line).  Both runtimes read the
  same file.
- "auto": on a CPU the first of `CPU_RUNTIMES` that imports and runs the network here (PyTorch if neither does,
  with a warning), PyTorch on CUDA.  A runtime asked for by name that cannot run is one error naming it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import importlib.util
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.core.atomic import atomic_write
from scripts.core.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
CPU_RUNTIMES = ("openvino", "onnxruntime")  # what "auto" tries on a CPU, the fastest here first (docs/results.md)
RUNTIME_NAMES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}  # the pip package is the backend's name
EXPORT_VERSION = "1"  # part of the cache key: bump when the export's settings change
KEEP_EXPORTS = 8  # exports kept in the cache folder, most recently used first
PROBE = (1, 3, 64, 64)  # the input on which a loaded export must match the PyTorch network
PROBE_TOLERANCE = 1e-3


def check_backend(backend: str) -> str:
    """The backend name, or a ConfigError listing the choices."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def weights_hash(network: torch.nn.Module) -> str:
    """A hash of the network's structure (its repr) and its parameters and buffers (names, shapes, dtypes, values)."""
    digest = hashlib.sha256(EXPORT_VERSION.encode())
    digest.update(repr(network).encode())
    for name, tensor in network.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_onnx(network: torch.nn.Module, path: Path) -> None:
    """Export `network` (float32, eval mode) to ONNX at `path`, batch, height and width dynamic.

    torch's TorchScript-based exporter takes a few seconds for this network and needs no package beyond torch; the
    newer torch.export-based one (`dynamo=True`, torch's default since 2.9) takes several times longer and needs
    onnxscript, so it is used only where the first is gone from torch.
    """
    # a copy in contiguous float32: the exporters trace the module as it is, memory format and dtype included
    network = copy.deepcopy(network).to(memory_format=torch.contiguous_format).float().eval()
    probe = torch.rand(2, *PROBE[1:])
    sizes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters' notes on their own internals are not the user's business
        try:
            atomic_write(
                path,
                lambda tmp: torch.onnx.export(
                    network,
                    (probe,),
                    str(tmp),
                    dynamo=False,
                    input_names=["image"],
                    output_names=["pred"],
                    dynamic_axes={"image": sizes, "pred": sizes},
                    opset_version=17,
                ),
            )
        except (TypeError, ValueError, RuntimeError) as err:  # a torch without the TorchScript-based exporter
            logger.info(f"TorchScript-based ONNX export unavailable ({_first_line(err)}); using torch.export")
            dim = torch.export.Dim
            program = torch.onnx.export(
                network,
                (probe,),
                dynamo=True,
                input_names=["image"],
                output_names=["pred"],
                dynamic_shapes={"x": {0: dim("batch"), 2: 16 * dim("height"), 3: 16 * dim("width")}},
                external_data=False,
                verbose=False,
            )
            atomic_write(path, lambda tmp: program.save(str(tmp), external_data=False))


class InferenceNetwork(torch.nn.Module):
    """The network as the evaluator runs it, on the backend asked for (see the module docstring).

    Args:
        network: the configured PyTorch network (`@network`); its weights are read at the first forward.
        backend: "auto", "torch", "openvino" or "onnxruntime" (`--backend`).
        cache_dir: where ONNX exports are kept (`@onnx_cache_dir`).
        threads: CPU threads for OpenVINO or ONNX Runtime; 0: OMP_NUM_THREADS where set, else every core
            (`--cpu_threads`).
    """

    def __init__(self, network: torch.nn.Module, backend: str = "auto", cache_dir: str = "", threads: int = 0):
        super().__init__()
        self.network = network
        self.backend = check_backend(backend)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.threads = int(threads)
        self.run: Callable[[np.ndarray], np.ndarray] | None = None  # the CPU runtime, once loaded
        self.chosen: str | None = None

    def resolve(self, device: torch.device) -> str:
        """The backend that runs on `device`: the one asked for, or what "auto" stands for there."""
        if self.backend == "torch" or (self.backend == "auto" and device.type != "cpu"):
            return "torch"
        if self.backend in CPU_RUNTIMES:
            if not _installed(self.backend):
                name = RUNTIME_NAMES[self.backend]
                raise ConfigError(f"--backend {self.backend} needs {name}: pip install {self.backend}")
            return self.backend
        found = next((runtime for runtime in CPU_RUNTIMES if _installed(runtime)), None)
        if found is None:
            logger.warning("neither openvino nor onnxruntime is installed: the network runs in PyTorch")
            return "torch"
        return found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chosen is None:
            self.chosen = self.resolve(x.device)
            if self.chosen != "torch":
                self.run = self._first_runtime_that_works()
            if self.chosen == "torch" and x.device.type == "cpu":  # the same numbers, faster convolutions
                self.network.to(memory_format=torch.channels_last)
            logger.info(f"network backend: {self.chosen}")
        if self.run is None:
            return self._torch(x)
        return torch.from_numpy(self.run(np.ascontiguousarray(x.detach().float().cpu().numpy()))).to(x.device)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.network(x).contiguous()

    def _first_runtime_that_works(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The chosen runtime; under "auto", one that fails to run the network here (a broken install, a CPU its
        plugin does not support) gives way to the next one, and in the end to PyTorch (None), with a warning."""
        order = [str(self.chosen)]
        if self.backend == "auto":
            order += [r for r in CPU_RUNTIMES if r != self.chosen and _installed(r)]
        for runtime in order:
            self.chosen = runtime
            try:
                return self._runtime()
            except ModelError as err:
                if "cannot write the ONNX export" in str(err):  # the folder, not the runtime: say so
                    raise
                failure = _first_line(err)
            except Exception as err:  # noqa: BLE001 - native runtimes fail in many ways
                failure = f"{type(err).__name__}: {_first_line(err)}"
            if self.backend != "auto":
                raise ModelError(
                    f"--backend {runtime}: {RUNTIME_NAMES[runtime]} cannot run the network here ({failure}); "
                    "use --backend auto or torch"
                ) from None
            logger.warning(f"{RUNTIME_NAMES[runtime]} cannot run the network here ({failure}); trying the next backend")
        self.chosen = "torch"
        return None

    def _runtime(self) -> Callable[[np.ndarray], np.ndarray]:
        """The chosen CPU runtime on the current weights' ONNX export, from the cache or a fresh export."""
        self.network.eval()
        key = weights_hash(self.network)[:16]
        folder = self.cache_dir or Path(tempfile.mkdtemp(prefix="nuclei-onnx-"))
        path = folder / f"network-{key}.onnx"
        if path.is_file():
            try:
                run = self._load(path)
            except Exception as err:  # noqa: BLE001 - a damaged protobuf fails in many ways
                logger.warning(f"{path}: cached ONNX export unusable ({_first_line(err)}); exporting it again")
                path.unlink(missing_ok=True)
            else:
                path.touch()
                return run
        logger.info(f"exporting the network to ONNX for {RUNTIME_NAMES[str(self.chosen)]}: {path}")
        try:
            export_onnx(self.network, path)
        except OSError as err:
            raise ModelError(
                f"cannot write the ONNX export to {path} ({err.strerror or err}); pass a writable --onnx_cache_dir "
                "or --backend torch"
            ) from None
        _prune(folder, keep=path)
        return self._load(path)

    def _load(self, path: Path) -> Callable[[np.ndarray], np.ndarray]:
        """The chosen runtime on `path`, checked to compute what the PyTorch network computes on a probe input."""
        threads = self.threads if self.threads > 0 else _default_threads()
        run = _openvino(path, threads) if self.chosen == "openvino" else _onnxruntime(path, threads)
        probe = torch.rand(*PROBE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            device = next((t.device for t in self.network.state_dict().values()), torch.device("cpu"))
            expected = self.network(probe.to(device)).float().cpu().numpy()
        found = run(probe.numpy())
        if found.shape != expected.shape or not np.allclose(found, expected, atol=PROBE_TOLERANCE, rtol=1e-3):
            raise ModelError(f"{path} does not compute what the network computes")
        return run


def _installed(runtime: str) -> bool:
    """Whether `runtime` imports here (a package whose native library fails to load counts as missing)."""
    if importlib.util.find_spec(runtime) is None:
        return False
    try:
        importlib.import_module(runtime)
    except Exception:  # noqa: BLE001 - ImportError, OSError from a missing shared library, ...
        return False
    return True


def _openvino(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """OpenVINO's CPU plugin on the export, in float32 (left to itself it may pick bfloat16 on CPUs that have it)."""
    core = _openvino_core()
    settings = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", settings)
    request, output = compiled.create_infer_request(), compiled.output(0)
    # the result is a view of the request's own buffer, overwritten by the next call: copy it out
    return lambda image: request.infer({0: image})[output].copy()


@functools.cache
def _openvino_core() -> Any:
    """One OpenVINO Core for the process, as OpenVINO advises: each Core loads the CPU plugin and its thread pool, and
    a Core dropped while its pool's threads live on can take the process down later."""
    import openvino as ov

    return ov.Core()


def _onnxruntime(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """ONNX Runtime's CPU provider on the export."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda image: session.run(None, {name: image})[0]


def _default_threads() -> int:
    """OMP_NUM_THREADS where it is set (torchrun sets 1 per process, so ranks sharing a machine do not fight over
    its cores), else every core this process may use."""
    try:
        return max(int(os.environ.get("OMP_NUM_THREADS", "")), 1)
    except ValueError:
        pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def _prune(folder: Path, keep: Path) -> None:
    """Keep the `KEEP_EXPORTS` most recently used exports in `folder`."""
    exports = sorted(folder.glob("network-*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in exports if p != keep][KEEP_EXPORTS - 1 :]:
        old.unlink(missing_ok=True)
