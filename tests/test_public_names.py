"""No module of the project reaches into another's private names (``from cltoolbox.x import _y`` or
``module._y``): what modules share is public, so that a refactor of one module's internals breaks no other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("cltoolbox", "strategies", "scenarios", "experiments")
OURS = ("cltoolbox", "strategies", "scenarios")


def _ours(module: str) -> bool:
    return module.split(".")[0] in OURS


def private_uses(path: Path) -> list[str]:
    """``line: what`` for every private name of another first-party module that ``path`` imports or reads."""
    tree = ast.parse(path.read_text(), str(path))
    modules: dict[str, str] = {}  # local name -> first-party module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (_ours(node.module) or node.level):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{node.lineno}: from {node.module or '.'} import {a.name}")
                modules[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if _ours(a.name):
                    modules[a.asname or a.name.split(".")[0]] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, (ast.Name, ast.Attribute))):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    bad = [f"{p.relative_to(ROOT)}:{use}" for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))
           for use in private_uses(p)]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_check_finds_private_imports_and_attributes(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from cltoolbox.runner import _env\nimport cltoolbox.report as r\nr._save(1)\n"
                   "from cltoolbox import runner\nrunner.run()\nimport numpy\nnumpy._core\n")
    assert private_uses(src) == ["1: from cltoolbox.runner import _env", "3: r._save"]
