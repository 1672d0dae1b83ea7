"""One mechanism for expected errors: a BundleError anywhere in the chain is one line; anything else a traceback."""

from __future__ import annotations

import subprocess
import sys

from conftest import BUNDLE_ROOT

from scripts.core.errors import BundleError, DataError, ModelError, bundle_error_in, report_bundle_errors


def _raise_wrapped():
    try:
        raise DataError("/data/Fold 3/masks.npy: NaN in tile 2; re-export the masks")
    except DataError as e:
        raise RuntimeError("Failed to instantiate component 'pannuke' with keywords: ...") from e


def test_a_wrapped_bundle_error_is_found():
    try:
        _raise_wrapped()
    except RuntimeError as e:
        assert isinstance(bundle_error_in(e), DataError)
    assert bundle_error_in(ValueError("plain")) is None
    assert issubclass(ModelError, BundleError)


def test_the_hook_prints_one_line_for_expected_errors(capsys):
    try:
        _raise_wrapped()
    except RuntimeError as e:
        report_bundle_errors(type(e), e, e.__traceback__)
    err = capsys.readouterr().err
    assert err == "error: /data/Fold 3/masks.npy: NaN in tile 2; re-export the masks\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=60)


def test_importing_scripts_installs_it_and_unexpected_errors_keep_their_traceback():
    proc = _run("import scripts\nfrom scripts.core.errors import ModelError\nraise ModelError('no weights at m.pt')")
    assert proc.returncode == 1 and proc.stderr == "error: no weights at m.pt\n"
    proc = _run("import scripts\nraise KeyError('bug')")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError" in proc.stderr
