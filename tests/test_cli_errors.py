"""Bad input through the real CLI: every user error is exit code 2 and ONE stderr line ``error: <field>: ...; <fix>``.

Most cases call ``cltoolbox.cli.main`` in-process (fast); a few go through ``python -m cltoolbox.cli`` in a
subprocess to prove the exit code and the absence of a traceback end to end. No case may leave a finished run
(a DONE file) under --out; validation errors must leave nothing there at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cltoolbox.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
    "model": {"name": "mlp", "hidden": [16]},
    "strategy": {"name": "naive"},
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    "seeds": [0],
}


def write_config(tmp_path: Path, config: dict | None = None, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(TINY if config is None else config, sort_keys=False))
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def cli_subprocess(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "cltoolbox.cli", *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def assert_user_error(rc: int, err: str, *fragments: str) -> str:
    """Exit 2, exactly one stderr line ``error: ...`` holding every fragment, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def assert_no_output(out: Path) -> None:
    """Validation errors happen before anything is written."""
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


# (overrides, fragments the one error line must hold: the field, the problem, the fix)
BAD_OVERRIDES = {
    "misspelt scenario key": (["scenario.n_experience=5"],
                              ["scenario.n_experience", "unknown key", "did you mean 'n_experiences'"]),
    "misspelt model key": (["model.hiden=[8]"], ["model.hiden", "did you mean 'hidden'"]),
    "misspelt strategy key": (["strategy.name=er", "strategy.memroy_size=10"],
                              ["strategy.memroy_size", "did you mean 'memory_size'"]),
    "misspelt train key": (["train.lrr=0.1"], ["train.lrr", "did you mean 'lr'"]),
    "param of a strategy without params": (["strategy.memory_size=10"], ["strategy.memory_size", "remove it"]),
    "lr not a number": (["train.lr=fast"], ["train.lr", "expected float", "'fast'", "lr: 0.1"]),
    "epochs not an int": (["train.epochs=1.5"], ["train.epochs", "expected int", "1.5", "epochs: 1"]),
    "epochs zero": (["train.epochs=0"], ["train.epochs", ">= 1"]),
    "lr negative": (["train.lr=-0.1"], ["train.lr", "> 0"]),
    "momentum negative": (["train.momentum=-0.5"], ["train.momentum", ">= 0"]),
    "optimizer misspelt": (["train.optimizer=adm"], ["train.optimizer", "did you mean 'adam'"]),
    "seeds a string": (["seeds='0'"], ["seeds", "'0'", "list"]),
    "seeds repeated": (["seeds=[1,1]"], ["seeds", "repeats"]),
    "hidden not a list": (["model.hidden=400"], ["model.hidden", "list", "hidden: [400, 400]"]),
    "hidden entry not an int": (["model.hidden=[a]"], ["model.hidden[0]", "expected int"]),
    "3 experiences on 10 classes": (["scenario.n_experiences=3"],
                                    ["scenario.n_experiences", "10 classes", "divisor of 10"]),
    "first_classes 11": (["scenario.first_classes=11"], ["scenario.first_classes", "1..10", "11"]),
    "first_classes leaves classes": (["scenario.first_classes=4", "scenario.n_experiences=1"],
                                     ["scenario.first_classes", "raise n_experiences"]),
    "classes_per_exp 3": (["scenario.classes_per_exp=3", "scenario.n_experiences=null"],
                          ["scenario.classes_per_exp", "divisor of 10"]),
    "classes_per_exp contradicts": (["scenario.classes_per_exp=5"], ["scenario.n_experiences", "set only one"]),
    "class_order too short": (["scenario.class_order=[0,1,2]"], ["scenario.class_order", "permutation of 0..9"]),
    "class_order repeats": (["scenario.class_order=[0,0,1,2,3,4,5,6,7,8]"], ["scenario.class_order", "permutation"]),
    "class_order unknown word": (["scenario.class_order=seded"], ["scenario.class_order", "fixed"]),
    "unknown strategy": (["strategy.name=nave"],
                         ["strategy.name", "'nave'", "did you mean 'naive'", "cltoolbox list strategies"]),
    "unknown scenario": (["scenario.name=class_incremntal"],
                         ["scenario.name", "did you mean 'class_incremental'", "cltoolbox list scenarios"]),
    "unknown dataset": (["scenario.dataset=digts"], ["scenario.dataset", "did you mean 'digits'"]),
    "unknown model": (["model.name=mpl"], ["model.name", "did you mean 'mlp'", "cltoolbox list models"]),
    "rotated angles mismatch": (["scenario.name=rotated", "scenario.n_experiences=3", "scenario.angles=[0, 90]"],
                                ["scenario.angles", "one per experience"]),
    "override without =": (["train.lr"], ["train.lr", "key.sub=value"]),
    "override value wrong type": (["train.epochs=abc"], ["train.epochs", "expected int", "'abc'"]),
    "override value bad YAML": (["seeds=[0,"], ["seeds=[0,", "not valid YAML"]),
    "override indexes a mapping": (["strategy.0.memory_size=10"], ["'strategy'", "single mapping"]),
    "override lacks a list index": (["strategy=[{name: naive}, {name: er}]", "strategy.memory_size=10"],
                                    ["'strategy' is a list", "strategy.0.memory_size=10"]),
}


@pytest.mark.parametrize("case", list(BAD_OVERRIDES))
def test_bad_config_is_one_line_error(case, tmp_path, capsys):
    overrides, fragments = BAD_OVERRIDES[case]
    cfg, out = write_config(tmp_path), tmp_path / "out"
    rc, _, err = cli(capsys, "run", str(cfg), "--out", str(out), "-q", *overrides)
    assert_user_error(rc, err, *fragments)
    assert_no_output(out)


def test_bad_override_after_options_is_one_line_error(tmp_path, capsys):
    """argparse leaves overrides that follow options over; a malformed one still gets the override message."""
    cfg, out = write_config(tmp_path), tmp_path / "out"
    rc, _, err = cli(capsys, "run", str(cfg), "--out", str(out), "--seeds", "0", "-q", "train.lr")
    assert_user_error(rc, err, "train.lr", "key.sub=value")


def test_unknown_top_level_key(tmp_path, capsys):
    config = {k: v for k, v in TINY.items() if k != "strategy"}
    config["strategies"] = {"name": "naive"}  # plural: a common slip
    cfg, out = write_config(tmp_path, config), tmp_path / "out"
    rc, _, err = cli(capsys, "run", str(cfg), "--out", str(out))
    assert_user_error(rc, err, "strategies", "unknown top-level key", "did you mean 'strategy'")
    assert_no_output(out)


def test_missing_section_and_name(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {k: v for k, v in TINY.items() if k != "model"})
    assert_user_error(*cli(capsys, "run", str(cfg), "--out", str(out))[::2], "model", "missing")
    cfg = write_config(tmp_path, {k: v for k, v in TINY.items() if k != "name"})
    assert_user_error(*cli(capsys, "run", str(cfg), "--out", str(out))[::2], "name", "missing")
    assert_no_output(out)


def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("name: tiny\nscenario:\n  name: class_incremental\n   dataset: digits\nseeds: [0]\n")
    rc, _, err = cli(capsys, "run", str(cfg), "--out", str(tmp_path / "out"))
    assert_user_error(rc, err, str(cfg), "not valid YAML", "line 4", "fix the syntax")
    assert_no_output(tmp_path / "out")


def test_yaml_unclosed_bracket_names_where_it_opened(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("name: tiny\nmodel: {name: mlp, hidden: [16]\ntrain: {epochs: 1}\n")
    rc, _, err = cli(capsys, "run", str(cfg))
    assert_user_error(rc, err, "not valid YAML", "line 2")


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    rc, _, err = cli(capsys, "run", str(missing), "--out", str(tmp_path / "out"))
    assert_user_error(rc, err, str(missing), "not found")
    assert_no_output(tmp_path / "out")


def test_config_that_is_not_a_mapping(tmp_path, capsys):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- name: tiny\n")
    rc, _, err = cli(capsys, "run", str(cfg))
    assert_user_error(rc, err, str(cfg), "mapping")


def test_duplicate_strategy_labels(tmp_path, capsys):
    cfg = write_config(tmp_path)
    rc, _, err = cli(capsys, "run", str(cfg), "--out", str(tmp_path / "out"),
                     "strategy=[{name: er, memory_size: 10}, {name: er, memory_size: 20}]")
    assert_user_error(rc, err, "strategy", "'er'", "label")
    assert_no_output(tmp_path / "out")


def test_missing_torchvision_data_names_root_and_download(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    cfg, out = write_config(tmp_path), tmp_path / "out"
    rc, _, err = cli(capsys, "run", str(cfg), "--out", str(out), "-q",
                     "scenario.dataset=cifar10", f"scenario.root={empty}")
    assert_user_error(rc, err, "cifar10", str(empty), "scenario.root", "download: true")
    assert_no_output(out)


def test_existing_runs_are_refused_and_left_untouched(tmp_path, capsys):
    """A finished run needs --overwrite (or --resume to skip it); an unfinished one needs --resume."""
    cfg, out = write_config(tmp_path), tmp_path / "out"
    fast = ["scenario.n_experiences=2"]
    rc, _, err = cli(capsys, "run", str(cfg), "--out", str(out), "-q", *fast)
    assert rc == 0, err
    (done,) = out.rglob("DONE")
    run_dir = done.parent
    before = snapshot(out)

    rc, _, err = cli(capsys, "run", str(cfg), "--out", str(out), "-q", *fast)
    assert_user_error(rc, err, str(run_dir), "finished run", "--overwrite", "--resume")
    assert snapshot(out) == before  # same bytes, same mtimes: nothing was rewritten

    rc, _, err = cli(capsys, "run", str(cfg), "--out", str(out), "-q", "--resume", *fast)
    assert rc == 0 and err == ""
    assert snapshot(out) == before  # --resume skips a finished run without touching it

    done.unlink()  # now it looks like a run killed before its end
    before = snapshot(out)
    rc, _, err = cli(capsys, "run", str(cfg), "--out", str(out), "-q", *fast)
    assert_user_error(rc, err, str(run_dir), "unfinished run", "--resume", "--overwrite")
    assert snapshot(out) == before
    assert not list(out.rglob("DONE"))


def test_debug_shows_the_traceback(tmp_path, capsys):
    from cltoolbox.errors import ConfigError

    cfg = write_config(tmp_path)
    with pytest.raises(ConfigError, match="train.lr"):
        main(["--debug", "run", str(cfg), "train.lr=fast"])
    with pytest.raises(ConfigError, match="train.lr"):  # also accepted after the command
        main(["run", str(cfg), "train.lr=fast", "--debug"])


def test_list_strategies_shows_parameters(capsys):
    rc, out, err = cli(capsys, "list", "strategies")
    assert rc == 0 and err == ""
    names = {line.split()[0] for line in out.splitlines() if line and not line[0].isspace()}
    assert {"naive", "er", "joint", "cumulative"} <= names
    assert "memory_size: int >= 1 = 500" in out  # er's parameters and limits, read from its signature
    er_line = next(line for line in out.splitlines() if line.startswith("er "))
    assert "Chaudhry" in er_line  # the docstring's first line


def test_list_unknown_kind_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["list", "strategy"])
    assert exc.value.code == 2


# -- end to end, in a fresh interpreter (each start imports torch: keep these few) ------------------


def test_subprocess_type_error_exit_code_and_one_line(tmp_path):
    cfg, out = write_config(tmp_path), tmp_path / "out"
    p = cli_subprocess("run", str(cfg), "--out", str(out), "train.lr=fast", cwd=tmp_path)
    assert_user_error(p.returncode, p.stderr, "train.lr", "expected float", "lr: 0.1")
    assert p.stdout == ""
    assert_no_output(out)


def test_subprocess_missing_data(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    cfg = write_config(tmp_path, {**TINY, "scenario": {**TINY["scenario"], "dataset": "cifar10", "root": str(empty)}})
    p = cli_subprocess("run", str(cfg), "--out", str(tmp_path / "out"), "-q", cwd=tmp_path)
    assert_user_error(p.returncode, p.stderr, str(empty), "download: true")
    assert_no_output(tmp_path / "out")


def test_subprocess_debug_traceback(tmp_path):
    cfg = write_config(tmp_path)
    p = cli_subprocess("--debug", "run", str(cfg), "model.hiden=[8]", cwd=tmp_path)
    assert p.returncode != 0
    assert "Traceback" in p.stderr and "did you mean 'hidden'" in p.stderr


def test_help_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from cltoolbox.cli import main\n"
        "for argv in (['--help'], ['run', '--help'], ['list', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert "usage: cltoolbox" in p.stdout and "run" in p.stdout and "--overwrite" in p.stdout


def test_threads_option(tmp_path, capsys):
    import json

    import torch

    cfg = write_config(tmp_path)
    rc, _, err = cli(capsys, "run", str(cfg), "--threads", "0", "--out", str(tmp_path / "a"))
    assert_user_error(rc, err, "--threads: must be >= 1, got 0")
    assert not (tmp_path / "a").exists()
    before = torch.get_num_threads()
    try:
        assert cli(capsys, "run", str(cfg), "--threads", "1", "-q", "--out", str(tmp_path / "b"))[0] == 0
    finally:
        torch.set_num_threads(before)
    (env,) = (tmp_path / "b").rglob("env.json")
    assert json.loads(env.read_text())["torch_threads"] == 1
