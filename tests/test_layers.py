"""The layers of bundle/scripts only look down: core <- data <- model <- workflows.

Every `import scripts.X` and `from scripts.X import ...` in every module, at the top or inside a function, is
checked: a module may import its own layer and the layers below it, never one above.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "bundle" / "scripts"
LAYERS = ("core", "data", "model", "workflows")


def layer_of(module: str) -> int:
    """The layer index of a dotted module name under `scripts` (scripts.model.head -> 2)."""
    parts = module.split(".")
    if parts[0] != "scripts" or len(parts) < 2 or parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer; bundle/scripts holds only {', '.join(LAYERS)}")
    return LAYERS.index(parts[1])


def scripts_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the bundle's own code in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("scripts.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("scripts"):
            if node.module == "scripts" or node.module.count(".") == 1:  # `from scripts.model import head`
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(SCRIPTS.rglob("*.py")):
        relative = path.relative_to(SCRIPTS.parent).with_suffix("")
        if relative.parts[-1] == "__init__" and len(relative.parts) == 2:
            continue  # scripts/__init__.py only installs core's error report
        module = ".".join(p for p in relative.parts if p != "__init__")
        own = layer_of(module)
        for line, imported in scripts_imports(path):
            if layer_of(imported) > own:
                bad.append(f"{path.relative_to(SCRIPTS.parent)}:{line} ({LAYERS[own]}) imports {imported}")
    return bad


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a data module importing the model layer is reported, with its file and line."""
    fake = tmp_path / "scripts"
    for layer in LAYERS:
        (fake / layer).mkdir(parents=True)
    (fake / "data" / "reader.py").write_text("import numpy\n\ndef f():\n    from scripts.model.head import x\n")
    (fake / "model" / "head.py").write_text("from scripts.core import errors\nfrom scripts.data import reader\n")
    monkeypatch.setattr(sys.modules[__name__], "SCRIPTS", fake)
    assert upward_imports() == ["scripts/data/reader.py:4 (data) imports scripts.model.head"]
