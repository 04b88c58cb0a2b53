"""One contract, checked on every built-in strategy and scenario with `cltoolbox.testing` (the kit plugin
authors use): learning on a small stream, hooks in the documented order, every result file, determinism,
another seed giving other results, resume equality after a kill, memory accounting and errors on bad
parameters. Scenarios: seeded, well-formed streams that the loop can run. Each plugin's small settings are
declared at its registration (``test_params``, ``test_model``)."""

from __future__ import annotations

import pytest

from cltoolbox.data import load_dataset
from cltoolbox.registry import SCENARIOS, registered_by
from cltoolbox.testing import check_scenario, check_strategy, scenario_cases, strategy_cases

BUILTIN_STRATEGIES = strategy_cases("cltoolbox.strategies")
# Scenarios of one dataset's own protocol (CORe50's sessions, test_dataset=None) cannot run on digits;
# tests/test_catalogue.py checks them on a CORe50 layout, end to end. multi_label needs multi-hot labels:
# tests/test_multilabel.py checks it. avalanche needs a user's benchmark function: tests/test_avalanche_scenario.py.
BUILTIN_SCENARIOS = scenario_cases("cltoolbox.scenarios")


def test_every_builtin_is_covered() -> None:
    assert len(BUILTIN_STRATEGIES) > 20 and {"naive", "er", "l2p", "gdumb"} <= set(BUILTIN_STRATEGIES)
    assert set(registered_by("cltoolbox.scenarios")["scenarios"]) - set(BUILTIN_SCENARIOS) == {"core50_ni",
                                                                                                 "core50_nc",
                                                                                                 "multi_label",
                                                                                                 "avalanche"}


@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
def test_strategy_contract(name: str) -> None:
    check_strategy(name)


@pytest.mark.parametrize("name", BUILTIN_SCENARIOS)
def test_scenario_contract(name: str) -> None:
    check_scenario(name)
    if name != "domain_incremental":  # the built-ins keep the dataset's classes, except domain-IL's relabelling
        entry = SCENARIOS.get(name)
        assert entry.factory(load_dataset("digits"), 0, **entry.test_params).n_classes == 10
