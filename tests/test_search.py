"""``search: {method: random | tpe, trials: N}`` (cltoolbox.search, on Optuna) for sweep and tune: one-line
validation, deterministic trials, a killed search resumed with the same trials, tune's two phases, Ray."""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cltoolbox.cli import main
from cltoolbox.errors import ConfigError
from cltoolbox.search import check_search
from cltoolbox.sweep import sweep
from cltoolbox.tuning import tune

BASE = {
    "name": "srch",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 3, "classes_per_exp": 3,
                 "first_classes": 4},
    "model": {"name": "mlp", "hidden": [16]},
    "strategy": [{"name": "er", "memory_size": 30}],
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    "seeds": [0],
    "grid": {"train.lr": {"low": 0.001, "high": 0.5, "log": True}, "strategy.memory_size": [10, 30, 90]},
    "search": {"method": "tpe", "trials": 12},
}


def trials(out: Path) -> list[dict]:
    with open(out / "srch" / "search_trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("spec, grid, msg", [
    ({"method": "grid", "trials": 5}, {"train.lr": [0.1]}, "search.method: 'grid' is not a search method"),
    ({"method": "tpe", "trials": 0}, {"train.lr": [0.1]}, r"search.trials: expected an integer >= 1"),
    ({"method": "tpe", "trials": "5"}, {"train.lr": [0.1]}, r"search.trials: expected an integer >= 1"),
    ({"method": "tpe", "trials": 5, "sampler": 1}, {"train.lr": [0.1]}, "search.sampler: unknown key"),
    ({"method": "random", "trials": 5}, {"train.lr": {"low": 0.0, "high": 1.0, "log": True}},
     r"grid.train.lr.low: a log range needs low > 0"),
    ({"method": "random", "trials": 5}, {"train.lr": {"low": 1.0, "high": 0.5}}, r"low \(1.0\) must be below high"),
    ({"method": "random", "trials": 5}, {"train.lr": {"low": 0.1, "hi": 0.5}}, "grid.train.lr.hi: unknown range key"),
    ({"method": "random", "trials": 5}, {"lr": [0.1]}, "grid.lr: expected a dotted key"),
    ({"method": "random", "trials": 5}, None, "grid: a search needs its space"),
    ({"method": "random", "trials": 5, "metric": "accuracy"}, {"train.lr": [0.1]}, "search.metric: unknown metric"),
])
def test_bad_search_is_one_line(spec: dict, grid: dict | None, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg) as e:
        check_search(spec, grid)
    assert "\n" not in str(e.value)


def test_bad_search_through_the_cli(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "search": {"method": "bayes", "trials": 3}}))
    assert main(["sweep", str(cfg), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: search.method: 'bayes' is not a search method; use one of: random, tpe (or drop "
                   "`search:` for a full grid)"]
    # a key no strategy has, and a value no trial may take, are found before anything runs
    cfg.write_text(yaml.safe_dump({**BASE, "grid": {"strategy.alpha": [0.1]}}))
    assert main(["sweep", str(cfg), "--out", str(tmp_path)]) == 2
    assert "grid.strategy.alpha: none of the strategies (er) has a parameter 'alpha'" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({**BASE, "grid": {"train.epochs": {"low": 0, "high": 3}}}))
    assert main(["sweep", str(cfg), "--out", str(tmp_path)]) == 2
    assert "train.epochs: must be >= 1, got 0" in capsys.readouterr().err
    assert not list(tmp_path.glob("srch/*"))


def test_search_runs_trials_and_skips_them_on_resume(tmp_path: Path, one_thread) -> None:
    cfg = {**copy.deepcopy(BASE), "search": {"method": "random", "trials": 4, "seed": 3}}
    res = sweep(copy.deepcopy(cfg), out=str(tmp_path), workers=1, quiet=True)
    rows = trials(tmp_path)
    assert [r["point"] for r in rows] == ["er-t000", "er-t001", "er-t002", "er-t003"]
    assert len(res) == 4 and all(r["status"] == "done" for r in res)
    lrs = [float(r["value:train.lr"]) for r in rows]
    assert all(0.001 <= v <= 0.5 for v in lrs) and len(set(lrs)) == 4
    assert {r["value:strategy.memory_size"] for r in rows} <= {"10", "30", "90"}
    for r, folder in zip(rows, sorted((tmp_path / "srch").glob("er-t*")), strict=True):
        run_cfg = yaml.safe_load(next(folder.glob("*/seed_0/config.yaml")).read_text())
        assert run_cfg["train"]["lr"] == float(r["value:train.lr"])
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("srch/*/*/seed_0/DONE")}
    with pytest.raises(Exception, match="finished run is already there"):
        sweep(copy.deepcopy(cfg), out=str(tmp_path), workers=1, quiet=True)
    sweep(copy.deepcopy(cfg), out=str(tmp_path), workers=1, quiet=True, resume=True)
    assert trials(tmp_path) == rows  # the same trials, read back from their run folders
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("srch/*/*/seed_0/DONE")} == mtimes


@pytest.mark.slow
def test_killed_tpe_search_resumes_with_the_same_trials(tmp_path: Path, one_thread) -> None:
    # an uninterrupted 12-trial TPE search (10 random start-up trials, then TPE's proposals) as the reference
    ref = tmp_path / "ref"
    sweep(copy.deepcopy(BASE), out=str(ref), workers=1, quiet=True)
    expected = trials(ref)
    assert len(expected) == 12
    # the same search in a process killed after its 5th trial, then resumed
    out = tmp_path / "killed"
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    proc = subprocess.Popen([sys.executable, "-m", "cltoolbox.cli", "sweep", str(cfg), "--out", str(out), "-q",
                             "--workers", "1"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "srch" / "search_trials.csv").exists() and len(trials(out)) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the search finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(trials(out))
    assert 5 <= done_before < 12
    sweep(copy.deepcopy(BASE), out=str(out), workers=1, quiet=True, resume=True)
    assert trials(out) == expected


def test_tune_with_a_search(tmp_path: Path, one_thread) -> None:
    cfg = {**copy.deepcopy(BASE), "search": {"method": "random", "trials": 3},
           "evaluation": {"scenario": {"class_order": "seeded"}}}
    result = tune(cfg, out=str(tmp_path), workers=1, quiet=True)
    assert result["selected"]["er"] in {"er-t000", "er-t001", "er-t002"}
    assert len(result["tuning"]) == 3 and len(result["evaluation"]) == 1
    report = (tmp_path / "srch" / "tuning_report.md").read_text()
    assert f"**{result['selected']['er']}** (selected)" in report
    assert (tmp_path / "srch" / "tuning" / "search_trials.csv").is_file()
    # the selected trial's values are applied unchanged on the evaluation scenario
    sel = result["selected"]["er"]
    t_cfg = yaml.safe_load(next((tmp_path / "srch" / "tuning" / sel).glob("*/seed_0/config.yaml")).read_text())
    e_cfg = yaml.safe_load(next((tmp_path / "srch" / "evaluation" / sel).glob("*/seed_0/config.yaml")).read_text())
    assert e_cfg["train"]["lr"] == t_cfg["train"]["lr"]
    assert e_cfg["strategy"]["memory_size"] == t_cfg["strategy"]["memory_size"]
    assert e_cfg["scenario"]["class_order"] == "seeded" != t_cfg["scenario"]["class_order"]


@pytest.mark.slow
def test_search_on_ray_proposes_the_same_trials(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    cfg = {**copy.deepcopy(BASE), "search": {"method": "tpe", "trials": 2, "batch": 2}, "seeds": [0, 1]}
    sweep(copy.deepcopy(cfg), out=str(tmp_path / "local"), workers=1, quiet=True)
    sweep(copy.deepcopy(cfg), out=str(tmp_path / "ray"), backend="ray", workers=2, quiet=True)
    assert trials(tmp_path / "ray") == trials(tmp_path / "local")


def test_a_repeated_proposal_reuses_its_trials_runs(tmp_path: Path, one_thread) -> None:
    # two choices, five trials: proposals repeat, and a repeat runs nothing new
    cfg = {**copy.deepcopy(BASE), "grid": {"strategy.memory_size": [10, 30]},
           "search": {"method": "random", "trials": 5, "seed": 1}}
    sweep(copy.deepcopy(cfg), out=str(tmp_path), workers=1, quiet=True)
    rows = trials(tmp_path)
    assert len(rows) == 5
    firsts = {r["value:strategy.memory_size"]: r["point"] for r in rows if not r["same_as"]}
    assert len(firsts) == len({r["value:strategy.memory_size"] for r in rows}) <= 2
    for r in rows:
        if r["same_as"]:
            assert r["same_as"] == firsts[r["value:strategy.memory_size"]] and r["acc_mean"] == next(
                x["acc_mean"] for x in rows if x["point"] == r["same_as"])
    assert sorted(p.name for p in (tmp_path / "srch").glob("er-t*")) == sorted(firsts.values())


@pytest.mark.slow  # two worker processes start: ~10-20 s on 2 busy cores
def test_local_workers_share_one_pool_and_propose_the_same_trials(tmp_path: Path, monkeypatch) -> None:
    from cltoolbox import sweep as sweep_module

    made = []
    real = sweep_module._new_pool
    monkeypatch.setattr(sweep_module, "_new_pool", lambda n: made.append(n) or real(n))
    cfg = {**copy.deepcopy(BASE), "search": {"method": "tpe", "trials": 3}, "seeds": [0, 1]}
    sweep(copy.deepcopy(cfg), out=str(tmp_path / "two"), workers=2, quiet=True)
    assert made == [2]  # one pool for the 3 rounds
    sweep(copy.deepcopy(cfg), out=str(tmp_path / "one"), workers=1, quiet=True)
    assert trials(tmp_path / "two") == trials(tmp_path / "one")
