"""Run the bundle's real configs with every output under a temp folder: in this process, as the Model Zoo's
ci/unit_tests do, or as real processes where a test needs one (the excepthook and exit status, torchrun, a kill).

In-process runs go through `monai.bundle.run` with the same arguments the command line would give it (values parsed
by fire's own parser), the same option check, and the same report of an error (`report_bundle_errors`, the
excepthook a process installs), so what a test reads is what a user would see.  They save the 8-12 s a process
spends importing torch and MONAI.

Each real process gets one OpenMP thread: test runs share two cores with each other, and two threads per process on
a busy machine made a small training run several times slower in our measurements (threads spin-wait).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from scripts.workflows.evaluate.official_protocol import bundle_command

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def command(run_id: str, configs: list[str], work: Path, overrides: tuple[str, ...], ranks: int = 1) -> list[str]:
    """`python -m monai.bundle run ...` with every output under `work`; through torchrun when ranks > 1."""
    cmd = bundle_command(
        run_id,
        configs,
        [
            "--ckpt_dir",
            str(work / "models"),
            "--output_dir",
            str(work / "eval"),
            "--cache_dir",
            str(work / "cache"),
            "--num_workers",
            "0",
            *overrides,
        ],
    )
    if ranks == 1:
        return cmd
    launcher = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        "--log-dir",
        str(work / "rank_logs"),
        "--redirects",
        "3",
    ]
    return [cmd[0], *launcher, *cmd[1:]]


def rank_logs(work: Path, ranks: int) -> dict[int, str]:
    """What each torchrun rank printed (stdout and stderr)."""
    logs = work / "rank_logs"
    return {r: "".join(p.read_text() for p in sorted(logs.glob(f"*/attempt_*/{r}/std*.log"))) for r in range(ranks)}


def in_process(cmd: list[str], work: Path) -> subprocess.CompletedProcess:
    """Run a `python -m monai.bundle run ...` command line in this process; its exit status and output."""
    from fire.parser import DefaultParseValue
    from monai.bundle import run

    from scripts.core.errors import report_bundle_errors
    from scripts.core.flags import check_overrides
    from scripts.core.locks import release_held

    argv = cmd[cmd.index("monai.bundle") + 2 :]  # after `run`: the run id, then --name value pairs
    kwargs: dict = {"run_id": argv[0]}
    tokens = iter(argv[1:])
    for token in tokens:
        name, _, value = token[2:].partition("=")
        kwargs[name] = DefaultParseValue(value if _ else next(tokens))
    out, err = io.StringIO(), io.StringIO()
    with (
        _one_thread(),
        contextlib.chdir(work),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        _logs_to(out),
    ):
        try:
            check_overrides(argv)
            run(**kwargs)
            code = 0
        except SystemExit as stop:  # as Python's own exit: a message goes to stderr with status 1
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            if not isinstance(stop.code, int | None):
                print(stop.code, file=sys.stderr)
        except Exception as error:  # noqa: BLE001 - reported as the process's excepthook would
            report_bundle_errors(type(error), error, error.__traceback__)
            code = 1
        finally:
            release_held()
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread for the run, as a process launched here gets (`ENV`): a run's numbers then do not
    depend on how it was launched (a training resumed in-process ends on the weights of one never interrupted)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _logs_to(stream: io.StringIO):
    """Every console log handler writes to `stream` for the run: MONAI's and ignite's loggers keep handlers made
    by earlier runs, bound to the console of their time."""
    import logging

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if hasattr(v, "handlers"))]
    consoles = {h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler}
    # and console handlers held by other handlers, such as absl's (imported by openvino), whose close() closes a
    # stream that is no longer sys.stderr: a run's logging.fileConfig would close pytest's capture stream with it
    live = (ref() for ref in logging._handlerList)  # type: ignore[attr-defined]
    consoles |= {
        h
        for h in live
        if isinstance(h, logging.StreamHandler)
        and vars(h).get("stream") is not None  # not lastResort (stream is sys.stderr's), nor an unopened file
        and not isinstance(h, logging.FileHandler)
        and not type(h).__module__.startswith("_pytest")
    }
    before = {h: h.stream for h in consoles}
    for handler in consoles:
        handler.setStream(stream)
    try:
        yield
    finally:
        for handler, original in before.items():
            handler.setStream(original)


def run_bundle(
    run_id: str, configs: list[str], work: Path, *overrides: str, check: bool = True, process: bool = False
) -> subprocess.CompletedProcess:
    """Run to the end, in this process unless `process`; a failed run raises with its output when `check`, else it
    is returned for the test to read."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = command(run_id, configs, work, overrides)
    if process:
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=ENV, timeout=900)
    else:
        proc = in_process(cmd, work)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def launch(run_id: str, configs: list[str], work: Path, *overrides: str, ranks: int = 1) -> str:
    """Run to the end and return the log (every rank's, rank by rank; torchrun when ranks > 1, else in this
    process); fail with the log's tail on a non-zero exit."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = command(run_id, configs, work, overrides, ranks)
    if ranks == 1:
        proc = in_process(cmd, work)
    else:
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=ENV, timeout=600)
    log = proc.stdout + proc.stderr
    if ranks > 1:
        log = "\n".join(f"===== rank {r} =====\n{text}" for r, text in rank_logs(work, ranks).items()) + "\n" + log
    if proc.returncode != 0:
        raise AssertionError(f"{run_id} {configs} exited with {proc.returncode}:\n{log[-8000:]}")
    return log


def start(run_id: str, configs: list[str], work: Path, *overrides: str) -> subprocess.Popen:
    """Start one process in the background, its output in work/log.txt (so a pipe never fills up and blocks it)."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "log.txt", "w") as log:  # the child keeps its own copy of the file handle
        return subprocess.Popen(
            command(run_id, configs, work, overrides), cwd=work, stdout=log, stderr=subprocess.STDOUT, env=ENV
        )
