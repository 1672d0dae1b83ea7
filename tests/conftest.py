"""Make the bundle's `scripts` package importable, as monai.bundle does when a workflow runs."""

import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE_ROOT))

REPO_ROOT = BUNDLE_ROOT.parent
_ROOT_BEFORE = {p.name for p in REPO_ROOT.iterdir()}


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a test left files in the repository root (a config parsed without --bundle_root writes its
    demo data and cache under the working directory)."""
    left = sorted({p.name for p in REPO_ROOT.iterdir()} - _ROOT_BEFORE - {".pytest_cache", ".ruff_cache"})
    if left:
        print(f"\nerror: the tests left {left} in {REPO_ROOT}; pass a temp folder or --bundle_root", file=sys.stderr)
        session.exitstatus = 1
