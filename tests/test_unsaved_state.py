"""A plugin that keeps tensors it did not have as built, but has no ``state_dict``, is flagged: a warning in the
run (at its first checkpoint) and a failure of the conformance kit (``cltoolbox check``); --resume would lose
that state silently otherwise."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_cli_errors import TINY

import cltoolbox
from cltoolbox.plugin import Plugin, held_tensors, unsaved_tensors
from cltoolbox.registry import STRATEGIES, register_strategy
from cltoolbox.testing import check_strategy


class Forgets(Plugin):
    """Keeps the mean input of the last experience, without state_dict()."""

    def __init__(self) -> None:
        self.fixed = torch.ones(3)  # made by the factory: a resumed run makes it again
        self.scale = 2.0

    def after_experience(self, learner, exp) -> None:
        self.mean = [exp.x_train.float().mean(0)]


class Saves(Forgets):
    def state_dict(self) -> dict:
        return {"mean": getattr(self, "mean", None)}

    def load_state_dict(self, state: dict) -> None:
        self.mean = state["mean"]


class Borrows(Plugin):
    """Holds only the learner's own model, which the learner saves."""

    def before_fit(self, learner, stream) -> None:
        self.model = learner.model


def test_tensors_set_after_the_build_without_state_dict_are_named() -> None:
    plugin, built = Forgets(), held_tensors(Forgets())
    assert unsaved_tensors(plugin, built) == []  # as built
    plugin.mean = [torch.zeros(2)]
    plugin.fixed = torch.ones(3)  # equal to the built one: not state
    assert unsaved_tensors(plugin, built) == ["mean"]
    plugin.fixed.add_(1)  # changed in place: state
    assert unsaved_tensors(plugin, built) == ["fixed", "mean"]
    saves = Saves()
    saves.mean = [torch.zeros(2)]
    assert unsaved_tensors(saves, held_tensors(Saves())) == []
    model = torch.nn.Linear(2, 2)
    borrows = Borrows()
    borrows.model = model
    assert unsaved_tensors(borrows, held_tensors(Borrows()), model) == []


@pytest.fixture
def forgetful(monkeypatch) -> str:
    STRATEGIES.names()  # the built-ins first
    monkeypatch.setattr(STRATEGIES, "_entries", dict(STRATEGIES._entries))

    @register_strategy("us_forgets", override=True)
    def us_forgets() -> list[Plugin]:
        """Keeps a tensor without state_dict()."""
        return [Forgets()]

    @register_strategy("us_saves", override=True)
    def us_saves() -> list[Plugin]:
        """Keeps a tensor with state_dict()."""
        return [Saves()]

    return "us_forgets"


def test_a_run_warns_once_and_a_plugin_with_state_dict_does_not(forgetful: str, tmp_path) -> None:
    config = {**copy.deepcopy(TINY), "out": str(tmp_path), "strategy": [{"name": forgetful}, {"name": "us_saves"}]}
    with pytest.warns(UserWarning) as caught:
        cltoolbox.run(config, quiet=True)
    mine = [str(w.message) for w in caught if "state_dict" in str(w.message)]
    assert mine == ["Forgets holds tensors in self.mean but has no state_dict(): --resume would lose them; "
                    "implement state_dict() and load_state_dict()"]


def test_builtin_strategies_that_hold_state_do_not_warn(tmp_path) -> None:
    config = {**copy.deepcopy(TINY), "out": str(tmp_path),
              "strategy": [{"name": "er", "memory_size": 20}, {"name": "lwf"}, {"name": "ewc"}]}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*has no state_dict")
        cltoolbox.run(config, quiet=True)


@pytest.mark.filterwarnings("ignore:Forgets holds tensors")  # the run's own warning; the kit's line is tested
def test_the_kit_fails_such_a_plugin_in_one_line(forgetful: str) -> None:
    with pytest.raises(AssertionError, match=r"^strategy 'us_forgets': Forgets holds tensors in self.mean but has "
                                             r"no state_dict\(\)"):
        check_strategy(forgetful)
