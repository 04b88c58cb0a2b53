"""The public conformance kit from a plugin author's side: a strategy and a scenario written in a separate
folder pass `cltoolbox check` and `cltoolbox.testing` in their own pytest run; broken plugins fail with
one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cltoolbox.errors import PluginError
from cltoolbox.registry import Registry

PLUGINS = '''
import torch

from cltoolbox.plugin import Plugin
from cltoolbox.registry import SCENARIOS, register_scenario, register_strategy


class L2Anchor(Plugin):
    """Penalise the distance to the weights learned up to the previous experience."""

    def __init__(self, strength: float, keep: bool) -> None:
        self.strength = strength
        self.keep = keep
        self.anchor: list[torch.Tensor] = []

    def after_experience(self, learner, exp) -> None:
        self.anchor = [p.detach().clone() for p in learner.model.parameters()]

    def loss(self, learner, batch, logits):
        if not self.anchor:
            return 0.0
        return self.strength * sum(((p - a) ** 2).sum() for p, a in zip(learner.model.parameters(), self.anchor))

    def state_dict(self) -> dict:
        return {"anchor": self.anchor} if self.keep else {}  # keep=False: resume loses the anchor

    def load_state_dict(self, state: dict) -> None:
        self.anchor = list(state.get("anchor", []))


@register_strategy("kit_anchor", test_params={"strength": 0.5})
def kit_anchor(strength: float = 0.01) -> list[Plugin]:
    """An L2 anchor."""
    return [L2Anchor(strength, keep=True)]
'''
SCENARIO = '''

@register_scenario("kit_split", test_params={"n_experiences": 2})
def kit_split(data, seed: int, n_experiences: int = 5):
    """Class-incremental splits, by delegation."""
    return SCENARIOS.get("class_incremental").factory(data, seed, n_experiences=n_experiences)
'''
BROKEN = PLUGINS.replace("kit_anchor", "kit_forgetful").replace("keep=True", "keep=False")
LAZY = '''
from cltoolbox.plugin import Plugin
from cltoolbox.registry import register_strategy


class SkipTraining(Plugin):
    def train_experience(self, learner, exp) -> bool:
        return True  # "trained": the loop's own training never runs


@register_strategy("kit_lazy")
def kit_lazy() -> list[Plugin]:
    """Learns nothing."""
    return [SkipTraining()]
'''
MISSPELLED = PLUGINS.replace("def after_experience", "def after_experiance").replace("kit_anchor", "kit_typo")


def _cltoolbox(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cltoolbox.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "my_plugins.py").write_text(PLUGINS + SCENARIO)
    (tmp_path / "broken.py").write_text(BROKEN)
    (tmp_path / "misspelled.py").write_text(MISSPELLED)
    (tmp_path / "lazy.py").write_text(LAZY)
    return tmp_path


@pytest.mark.slow
def test_cltoolbox_check_passes_a_good_file_and_fails_a_broken_one(folder: Path) -> None:
    good = _cltoolbox("check", "my_plugins.py", cwd=folder)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.splitlines() == ["ok   strategy 'kit_anchor'", "ok   scenario 'kit_split'"]

    bad = _cltoolbox("check", "broken.py", cwd=folder)
    assert bad.returncode == 2
    assert bad.stdout.splitlines() == ["FAIL strategy 'kit_forgetful': resume changed accuracy.csv: "
                                       "state_dict()/load_state_dict() miss some state"]
    assert "Traceback" not in bad.stdout + bad.stderr

    typo = _cltoolbox("check", "misspelled.py", cwd=folder)  # refused at registration: one line, no traceback
    assert typo.returncode == 2 and typo.stdout == ""
    (line,) = typo.stderr.splitlines()
    assert "after_experiance" in line and "after_experience" in line


def test_the_kit_in_a_plugin_authors_own_pytest_run(folder: Path) -> None:
    (folder / "test_my_plugins.py").write_text(textwrap.dedent('''
        import pytest

        from cltoolbox.testing import check_scenario, check_strategy, scenario_cases, strategy_cases

        PLUGINS = "my_plugins.py"


        @pytest.mark.parametrize("name", strategy_cases(PLUGINS))
        def test_strategy(name):
            check_strategy(name, imports=[PLUGINS])


        @pytest.mark.parametrize("name", scenario_cases(PLUGINS))
        def test_scenario(name):
            check_scenario(name, imports=[PLUGINS])


        def test_a_broken_strategy_fails():
            with pytest.raises(AssertionError, match="kit_forgetful': resume changed accuracy.csv"):
                check_strategy("kit_forgetful", imports=["broken.py"])


        def test_a_strategy_that_does_not_learn_fails():
            with pytest.raises(AssertionError, match="kit_lazy': does not learn"):
                check_strategy("kit_lazy", imports=["lazy.py"])


        def test_a_diverging_setting_fails_in_one_line():
            with pytest.raises(AssertionError, match="kit_anchor': a run raised .* diverged"):
                check_strategy("kit_anchor", imports=[PLUGINS], params={"strength": 1e6})
    '''))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_plugins.py"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "5 passed" in done.stdout


def test_test_params_must_name_parameters() -> None:
    registry = Registry("strategies", "cltoolbox.strategies", skip=0)

    def mine(memory_size: int = 10) -> list:
        return []

    with pytest.raises(PluginError, match="test_params memroy_size is not a parameter of .*valid: memory_size"):
        registry.register("kit_typo_params", test_params={"memroy_size": 5})(mine)
    registry.register("kit_params", test_params={"memory_size": 5})(mine)
    assert registry.get("kit_params").test_params == {"memory_size": 5}
