"""Plugin mistakes are loud: a misspelled hook, a taken name, an untyped parameter and two plugins answering the
same first-answer-wins hook each give one line and exit 2 through the CLI. Also ``list --imports``/``--json``,
``--version`` and the plugin provenance in env.json."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import yaml
from test_cli_errors import TINY, assert_user_error, cli, cli_subprocess

import cltoolbox
from cltoolbox.errors import PluginError
from cltoolbox.plugin import Plugin
from cltoolbox.registry import STRATEGIES, register_strategy

HEADER = "import torch\nfrom cltoolbox.plugin import Plugin\nfrom cltoolbox.registry import register_strategy\n\n"


def plugin_config(tmp_path: Path, code: str, strategy: dict) -> Path:
    """A plugin file and a tiny config that imports it and runs ``strategy``."""
    (tmp_path / "mine.py").write_text(HEADER + textwrap.dedent(code))
    path = tmp_path / "cfg.yaml"
    config = {**TINY, "imports": ["mine.py"], "strategy": strategy, "out": str(tmp_path / "runs")}
    path.write_text(yaml.safe_dump(config))
    return path


def test_misspelled_hook_is_one_line_and_exit_2_end_to_end(tmp_path: Path) -> None:
    cfg = plugin_config(tmp_path, """
        class Anchor(Plugin):
            def after_experiance(self, learner, exp):
                pass

        @register_strategy("pm_typo")
        def pm_typo() -> list[Plugin]:
            return [Anchor()]
    """, {"name": "pm_typo"})
    proc = cli_subprocess("run", str(cfg), "-q", cwd=tmp_path)
    assert_user_error(proc.returncode, proc.stderr, "mine.py", "Anchor.after_experiance", "'after_experience'")
    assert not (tmp_path / "runs").exists()


def test_hook_like_names_that_are_helpers_are_fine() -> None:
    class Helper(Plugin):
        def update_memory(self) -> None: ...

        def _after_experiance(self) -> None: ...  # private: never taken for a hook

    with pytest.raises(PluginError, match=r"Typo.before_epoc .*'before_epoch'"):
        class Typo(Plugin):
            def before_epoc(self, learner, exp, epoch) -> None: ...
    with pytest.raises(PluginError, match=r"Shares.composes: 'froward' is not a first-answer hook"):
        class Shares(Plugin):
            composes = {"froward"}


def test_shadowed_builtin_name_is_an_error(tmp_path: Path, capsys) -> None:
    cfg = plugin_config(tmp_path, """
        @register_strategy("naive")
        def my_naive() -> list[Plugin]:
            return []
    """, {"name": "naive"})
    rc, _, err = cli(capsys, "run", str(cfg), "-q")
    assert_user_error(rc, err, "strategy 'naive' is already registered", "override=True")
    assert STRATEGIES.get("naive").factory.__module__ == "cltoolbox.strategies.baselines"


def test_override_replaces_and_the_same_definition_may_register_again() -> None:
    def make(doc: str):
        def factory() -> list[Plugin]:
            return []
        factory.__doc__ = doc
        return factory

    register_strategy("pm_twice")(make("first"))
    register_strategy("pm_twice")(make("same definition again"))  # a module imported twice: same qualname

    def factory() -> list[Plugin]:  # another definition under a taken name
        return []

    with pytest.raises(PluginError, match="strategy 'pm_twice' is already registered"):
        register_strategy("pm_twice")(factory)
    register_strategy("pm_twice", override=True)(factory)
    assert STRATEGIES.get("pm_twice").factory is factory


def test_untyped_parameter_is_an_error(tmp_path: Path, capsys) -> None:
    cfg = plugin_config(tmp_path, """
        @register_strategy("pm_untyped")
        def pm_untyped(strength=0.1) -> list[Plugin]:
            return []
    """, {"name": "pm_untyped", "strength": "a lot"})
    rc, _, err = cli(capsys, "run", str(cfg), "-q")
    assert_user_error(rc, err, "parameter 'strength' has no type annotation", "`strength: float = 0.1`")


FORWARD_PLUGINS = """
    class Big(Plugin):
        def forward(self, learner, x, t):
            return learner.model(x) * 2

    class Small(Plugin):
        {composes}
        def forward(self, learner, x, t):
            return None

    @register_strategy("pm_big_{tag}")
    def pm_big() -> list[Plugin]:
        return [Big()]

    @register_strategy("pm_small_{tag}")
    def pm_small() -> list[Plugin]:
        return [Small()]
"""


def test_two_forward_plugins_are_refused_before_any_run(tmp_path: Path, capsys) -> None:
    cfg = plugin_config(tmp_path, FORWARD_PLUGINS.format(composes="", tag="a"),
                        {"name": "pm_big_a", "plugins": [{"name": "pm_small_a"}]})
    rc, _, err = cli(capsys, "run", str(cfg), "-q")
    assert_user_error(rc, err, "strategy: Big and Small both override 'forward'", "composes")
    assert not list((tmp_path / "runs").rglob("DONE"))


def test_a_plugin_that_declares_it_composes_runs(tmp_path: Path, capsys) -> None:
    cfg = plugin_config(tmp_path, FORWARD_PLUGINS.format(composes='composes = {"forward"}', tag="b"),
                        {"name": "pm_big_b", "plugins": [{"name": "pm_small_b"}]})
    rc, _, err = cli(capsys, "run", str(cfg), "-q")
    assert rc == 0, err
    (env,) = (tmp_path / "runs").rglob("env.json")
    sources = json.loads(env.read_text())["plugins"]
    mine = tmp_path / "mine.py"
    assert sources["imports"][str(mine.resolve())] == hashlib.sha256(mine.read_bytes()).hexdigest()
    assert "entry_points" in sources


def test_list_imports_a_file_or_a_config_and_prints_json(tmp_path: Path, capsys) -> None:
    cfg = plugin_config(tmp_path, '''
        @register_strategy("pm_listed")
        def pm_listed(strength: float = 0.5) -> list[Plugin]:
            """Listed through --imports."""
            return []
    ''', {"name": "pm_listed"})
    rc, out, err = cli(capsys, "list", "strategies", "--imports", str(tmp_path / "mine.py"))
    assert rc == 0, err
    assert "pm_listed" in out and "strength: float = 0.5" in out
    rc, out, err = cli(capsys, "list", "strategies", "--imports", str(cfg), "--json")
    assert rc == 0, err
    listed = {e["name"]: e for e in json.loads(out)}
    assert listed["pm_listed"] == {"name": "pm_listed", "description": "Listed through --imports.",
                                   "params": [{"name": "strength", "type": "float", "required": False,
                                               "limits": [], "default": 0.5}]}
    assert "naive" in listed


def test_list_imports_reports_a_plugin_mistake(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.py").write_text(HEADER + "class P(Plugin):\n    def predcit(self, learner, x, t):\n        pass\n")
    rc, _, err = cli(capsys, "list", "strategies", "--imports", str(tmp_path / "bad.py"))
    assert_user_error(rc, err, "P.predcit", "'predict'")


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli(capsys, "--version")
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"cltoolbox {cltoolbox.__version__}"
