"""Make the bundle's `scripts` package importable, as monai.bundle does when a workflow runs."""

import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE_ROOT))
