"""Every YAML shipped in experiments/ (and experiments/full/) is a valid config: it resolves against the
registries (names, parameters, types, per-strategy train overrides) without loading any data."""

from __future__ import annotations

from pathlib import Path

import pytest

from cltoolbox.config import load_yaml, validate
from cltoolbox.registry import import_plugins
from cltoolbox.sweep import expand

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CONFIGS = sorted([*EXPERIMENTS.glob("*.yaml"), *(EXPERIMENTS / "full").glob("*.yaml")])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_shipped_config_is_valid(path: Path) -> None:
    raw = load_yaml(path)
    import_plugins([i for i in raw.get("imports") or [] if not i.endswith(".py")])
    if "search" in raw:  # a search (Optuna): its space's corners must resolve
        from cltoolbox.search import Search, split_raw

        base, spec = split_raw({k: v for k, v in raw.items() if k not in ("evaluation", "select")})
        assert Search(base, spec).corner_points()
    elif "grid" in raw or "evaluation" in raw:  # sweeps and tuning: every point of the grid must resolve
        base = {k: v for k, v in raw.items() if k not in ("evaluation", "select")}
        assert expand(base)
    else:
        resolved = validate(raw)
        assert resolved["strategy"] and resolved["seeds"]


def test_every_strategy_has_an_example() -> None:
    from cltoolbox.registry import STRATEGIES

    text = "\n".join(p.read_text() for p in CONFIGS)
    missing = [n for n in STRATEGIES.names() if not n.startswith("test_") and f"name: {n}" not in text]
    assert not missing, f"no example YAML uses {missing}"
