"""Small CLI conveniences: shell completion through argcomplete, ``--loggers`` mixed with overrides, ``list
--json``. (``report``'s default ``--out``, ``<runs>/report``, is used by tests/test_html_report.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cltoolbox.cli import main


def complete(line: str, tmp_path: Path) -> list[str]:
    """What argcomplete answers a shell asking to complete ``line`` (its environment protocol)."""
    pytest.importorskip("argcomplete")
    out = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
           "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
    proc = subprocess.run([sys.executable, "-m", "cltoolbox.cli"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [c.strip() for c in out.read_text().split("\n")]


def test_shell_completion_of_commands_and_options(tmp_path: Path) -> None:
    assert complete("cltoolbox re", tmp_path) == ["report"]
    assert set(complete("cltoolbox ", tmp_path)) >= {"run", "sweep", "tune", "list", "report", "check", "transfer"}
    assert "--loggers" in complete("cltoolbox run x.yaml --lo", tmp_path)
    assert {"strategies", "scenarios", "datasets", "models"} <= set(complete("cltoolbox list ", tmp_path))
    assert complete("cltoolbox list sc", tmp_path) == ["scenarios"]


def test_loggers_option_leaves_overrides_after_it(tmp_path: Path, tiny_config: dict) -> None:
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config))
    # overrides may follow --loggers; `none` turns trackers off
    assert main(["run", str(cfg), "--out", str(tmp_path), "-q", "--loggers", "none", "train.lr=0.07"]) == 0
    run_cfg = yaml.safe_load(next(tmp_path.glob("tiny/*/*/seed_0/config.yaml")).read_text())
    assert run_cfg["train"]["lr"] == 0.07 and "loggers" not in run_cfg


def test_bad_logger_name_on_the_cli_is_one_line(tmp_path: Path, tiny_config: dict, capsys) -> None:
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config))
    assert main(["run", str(cfg), "--out", str(tmp_path), "--loggers", "tensorbord"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: loggers[0]: unknown tracker 'tensorbord'")


def test_list_json(capsys) -> None:
    assert main(["list", "scenarios", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert {p["name"] for p in entries["avalanche"]["params"]} == {"benchmark", "args"}
