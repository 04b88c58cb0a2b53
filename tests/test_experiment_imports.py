"""Every name an experiments/ script imports from cltoolbox exists (a moved helper breaks scripts no test runs)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
SCRIPTS = sorted(EXPERIMENTS.rglob("*.py"))


def _cltoolbox_imports(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cltoolbox":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "cltoolbox"]
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_script_imports_resolve(script: Path) -> None:
    for module_name, name in _cltoolbox_imports(script):
        module = importlib.import_module(module_name)
        if name and not hasattr(module, name):
            importlib.import_module(f"{module_name}.{name}")  # a submodule imported by name
