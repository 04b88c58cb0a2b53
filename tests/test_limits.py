"""Limits in signatures: ``Annotated[int, Min(1)]`` / ``Interval`` are enforced when parameters are resolved (one
line naming field, value and limit), shown by ``cltoolbox list`` (text and --json), and checked by the kit."""

from __future__ import annotations

import json
import math
from typing import Annotated

import pytest

from cltoolbox.cli import main
from cltoolbox.errors import ConfigError
from cltoolbox.params import Interval, Max, Min, resolve, signature_params
from cltoolbox.plugin import Plugin
from cltoolbox.registry import STRATEGIES, register_strategy


def limited(
    n: Annotated[int, Min(1)] = 2,
    rate: Annotated[float, Interval(0, 1, low_open=True)] = 0.5,
    decay: Annotated[float, Min(0, why="0 disables it")] = 0.0,
    cap: Annotated[float, Max(10, strict=True)] = 1.0,
    hidden: list[Annotated[int, Min(1)]] | None = None,
    size: Annotated[int, Min(1)] | None = None,
) -> None:
    """A factory with limits."""


PARAMS = signature_params(limited)


def check(**given):
    return resolve(PARAMS, given, "strategy")


@pytest.mark.parametrize(("given", "message"), [
    ({"n": 0}, "strategy.n: must be >= 1, got 0"),
    ({"rate": 0.0}, "strategy.rate: must be in (0, 1], got 0.0"),
    ({"rate": 1.5}, "strategy.rate: must be in (0, 1], got 1.5"),
    ({"rate": math.nan}, "strategy.rate: must be in (0, 1], got nan"),
    ({"decay": -0.1}, "strategy.decay: must be >= 0, got -0.1; 0 disables it"),
    ({"cap": 10}, "strategy.cap: must be < 10, got 10.0"),
    ({"hidden": [4, 0]}, "strategy.hidden[1]: must be >= 1, got 0"),
    ({"size": -3}, "strategy.size: must be >= 1, got -3"),
])
def test_values_outside_a_limit_are_one_line_errors(given: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check(**given)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text


def test_values_on_the_closed_ends_and_defaults_pass() -> None:
    assert check(n=1, rate=1, decay=0, cap=9.99, hidden=[1], size=None) == {
        "n": 1, "rate": 1.0, "decay": 0.0, "cap": 9.99, "hidden": [1], "size": None}
    assert check() == {"n": 2, "rate": 0.5, "decay": 0.0, "cap": 1.0, "hidden": None, "size": None}
    type_error = str(pytest.raises(ConfigError, check, size="big").value)  # a wrong type is still a type error
    assert "expected int (>= 1) or null" in type_error


def test_the_param_keeps_its_type_and_its_limits_apart() -> None:
    p = PARAMS["rate"]
    assert p.annotation is float and [lim.describe() for lim in p.limits] == ["in (0, 1]"]
    assert p.describe() == "rate: float in (0, 1] = 0.5"
    assert PARAMS["hidden"].describe() == "hidden: list[int (>= 1)] or null = None"


@pytest.fixture
def limited_strategy(monkeypatch):
    STRATEGIES.names()  # the built-ins first
    monkeypatch.setattr(STRATEGIES, "_entries", dict(STRATEGIES._entries))  # the demo leaves with the test

    @register_strategy("lim_demo", override=True)
    def lim_demo(memory_size: Annotated[int, Min(1)] = 5,
                 alpha: Annotated[float, Interval(0, 1)] = 0.5) -> list[Plugin]:
        """A demo strategy with limits."""
        return []

    return "lim_demo"


def test_list_shows_limits_in_text_and_json(limited_strategy: str, capsys) -> None:
    assert main(["list", "strategies"]) == 0
    text = capsys.readouterr().out
    assert "memory_size: int >= 1 = 5" in text and "alpha: float in [0, 1] = 0.5" in text
    assert main(["list", "strategies", "--json"]) == 0
    entry = next(e for e in json.loads(capsys.readouterr().out) if e["name"] == limited_strategy)
    assert {p["name"]: p["limits"] for p in entry["params"]} == {"memory_size": [">= 1"], "alpha": ["in [0, 1]"]}


def test_direct_python_calls_of_a_registered_factory_check_its_limits(limited_strategy: str) -> None:
    factory = STRATEGIES.get(limited_strategy).factory
    assert factory(3, alpha=1.0) == []
    with pytest.raises(ConfigError, match=r"^strategy.memory_size: must be >= 1, got 0$"):
        factory(0)
    with pytest.raises(ConfigError, match=r"^strategy.alpha: must be in \[0, 1\], got -0.5$"):
        factory(alpha=-0.5)


def test_a_config_outside_a_builtin_limit_is_refused_before_training() -> None:
    from cltoolbox.config import validate

    config = {"name": "x", "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 2},
              "model": {"name": "mlp"}, "strategy": {"name": "er", "memory_size": 0}}
    with pytest.raises(ConfigError, match=r"^strategy.memory_size: must be >= 1, got 0"):
        validate(config)
