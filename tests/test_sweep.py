"""Sweeps: grid expansion and validation, parallel local workers, Ray, skip/resume/lock, report over a sweep."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cltoolbox import report
from cltoolbox.cli import main
from cltoolbox.errors import ConfigError, RunExistsError
from cltoolbox.runfolder import RunLock
from cltoolbox.sweep import available_cores, expand, prepare, sweep

SWEEP = {
    "name": "sw",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
    "model": {"name": "mlp", "hidden": [16]},
    "strategy": [{"name": "naive"}, {"name": "er", "memory_size": 50}],
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "seeds": [0, 1],
}
RESULT_FILES = ("accuracy.csv", "per_class.csv", "matrices/accuracy_class_il.csv", "matrices/accuracy_task_il.csv",
                "matrices/forgetting_class_il.csv", "matrices/transfer_task_il.csv")


def run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.rglob("config.yaml"))


def results_bytes(out: Path) -> dict[str, bytes]:
    return {f"{d.relative_to(out)}/{f}": (d / f).read_bytes() for d in run_dirs(out) for f in RESULT_FILES}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> tuple[Path, list[dict]]:
    """2 strategies x 2 seeds on digits through the local backend with 2 worker processes."""
    out = tmp_path_factory.mktemp("sweep")
    results = sweep(copy.deepcopy(SWEEP), out=str(out), backend="local", workers=2, quiet=True)
    return out, results


def test_grid_expansion_labels_and_applicability() -> None:
    cfg = {**SWEEP, "grid": {"train.lr": [0.01, 0.1], "strategy.memory_size": [20, 100]}}
    points = expand(prepare(cfg, out="/tmp/unused"))
    # memory_size applies to er only: naive gets the 2 lr points, er the 2 x 2 product
    assert [p.label for p in points] == ["naive-lr0.01", "naive-lr0.1", "er-lr0.01-memory_size20",
                                         "er-lr0.01-memory_size100", "er-lr0.1-memory_size20",
                                         "er-lr0.1-memory_size100"]
    er = points[3]
    assert er.values == {"train.lr": 0.01, "strategy.memory_size": 100}
    assert er.resolved["train"]["lr"] == 0.01 and er.strategy["memory_size"] == 100
    assert er.strategy["label"] == "er-lr0.01-memory_size100" and er.base_label == "er"
    # lists and a model key: folder-safe labels
    points = expand(prepare({**SWEEP, "strategy": {"name": "naive"}, "grid": {"model.hidden": [[8], [8, 8]]}},
                            out="/tmp/unused"))
    assert [p.label for p in points] == ["naive-hidden8", "naive-hidden8x8"]


BAD_GRIDS = {
    "bad value in one point": ({"train.lr": [0.1, -1.0]}, ["grid point 'naive-lr-1.0'", "train.lr", "> 0"]),
    "wrong type in one point": ({"strategy.memory_size": [10, "many"]},
                                ["grid point 'er-memory_sizemany'", "strategy.memory_size", "expected int"]),
    "impossible split in one point": ({"scenario.n_experiences": [5, 3]},
                                      ["grid point 'naive-n_experiences3'", "scenario.n_experiences", "divisor"]),
    "no strategy has the parameter": ({"strategy.memroy_size": [1, 2]}, ["grid.strategy.memroy_size", "none of"]),
    "values not a list": ({"train.lr": 0.1}, ["grid.train.lr", "list"]),
    "unknown section": ({"seeds": [0, 1]}, ["grid.seeds", "dotted key"]),
    "misspelt key": ({"train.lrr": [0.1]}, ["train.lrr", "did you mean 'lr'"]),
    "repeated value": ({"train.lr": [0.1, 0.1]}, ["grid.train.lr", "twice"]),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_bad_grid_point_is_one_line_error_before_anything_runs(case, tmp_path, capsys) -> None:
    grid, fragments = BAD_GRIDS[case]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "grid": grid}, sort_keys=False))
    out = tmp_path / "out"
    rc = main(["sweep", str(path), "--out", str(out), "-q", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists() or not any(out.rglob("*"))


def test_bad_workers_and_backend(tmp_path, capsys) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--backend", "dask"])


def test_local_sweep_runs_every_strategy_and_seed(local_sweep) -> None:
    out, results = local_sweep
    dirs = run_dirs(out)
    assert [str(d.relative_to(out)) for d in dirs] == [
        f"sw/{s}/class_incremental-digits/seed_{k}" for s in ("er", "naive") for k in (0, 1)]
    assert all((d / "DONE").exists() and not (d / ".lock").exists() for d in dirs)
    assert len(results) == 4 and {r["labels"]["strategy"] for r in results} == {"naive", "er"}
    env = json.loads((dirs[0] / "env.json").read_text())
    assert env["torch_threads"] == max(1, available_cores() // 2)  # 2 workers split the cores


def test_report_over_a_sweep_folder(local_sweep, tmp_path, monkeypatch) -> None:
    """The tables of `cltoolbox report` over a sweep folder (figures are tested in test_report.py: skipped here
    for time)."""
    out, _ = local_sweep
    for name in ("plot_heatmaps", "plot_curves", "plot_bars", "plot_pareto"):
        monkeypatch.setattr(report, name, lambda *a, **k: [])
    written = report.report([out], tmp_path)
    table = pd.read_csv(tmp_path / "table_class_il.csv")
    assert set(table.strategy) == {"naive", "er"} and set(table.n_seeds) == {2}
    accs = [json.loads((d / "metrics.json").read_text())["class_il"]["acc"] for d in run_dirs(out) if "/er/" in str(d)]
    assert table.set_index("strategy").loc["er", "acc_mean"] == pytest.approx(sum(accs) / 2)
    assert {p.name for p in written["tables"]} >= {"table_class_il.md", "table_task_il.tex"}


def test_rerun_skips_finished_and_refuses_without_flags(local_sweep) -> None:
    out, _ = local_sweep
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunExistsError, match="--resume"):
        sweep(copy.deepcopy(SWEEP), out=str(out), workers=1, quiet=True)
    results = sweep(copy.deepcopy(SWEEP), out=str(out), workers=1, resume=True, quiet=True)
    assert len(results) == 4
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # a changed base config is not silently mixed with finished runs
    changed = copy.deepcopy(SWEEP)
    changed["train"]["epochs"] = 2
    with pytest.raises(RunExistsError, match="train.epochs"):
        sweep(changed, out=str(out), workers=1, resume=True, quiet=True)


def test_broken_runs_are_resumed_or_restarted_and_locked_ones_skipped(local_sweep, tmp_path, capsys) -> None:
    src, _ = local_sweep
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(src, out)
    expected = results_bytes(out)
    resumed, restarted, locked = run_dirs(out)[:3]
    (resumed / "DONE").unlink()  # finished but DONE lost: continues from its checkpoint
    (restarted / "DONE").unlink()
    shutil.rmtree(restarted / "checkpoint")  # no checkpoint: started again from scratch
    (restarted / "accuracy.csv").write_text("garbage")
    (locked / "DONE").unlink()
    with RunLock(locked):  # another live process holds this run: the worker skips it with a message
        results = sweep(copy.deepcopy(SWEEP), out=str(out), workers=1, threads=1, resume=True)
    captured = capsys.readouterr()
    assert f"warning: {locked}: skipped" in captured.err and "another process" in captured.err
    assert "resumed at experience 5" in captured.err and "restarted (no checkpoint)" in captured.err
    assert "3 to resume" in captured.err
    assert len(results) == 3 and not (locked / "DONE").exists()
    assert (resumed / "DONE").exists() and (restarted / "DONE").exists()
    got = results_bytes(out)
    assert {k: v for k, v in got.items() if not k.startswith(str(locked.relative_to(out)))} == \
        {k: v for k, v in expected.items() if not k.startswith(str(locked.relative_to(out)))}
    sweep(copy.deepcopy(SWEEP), out=str(out), workers=1, threads=1, resume=True, quiet=True)
    assert (locked / "DONE").exists() and results_bytes(out) == expected


def test_dry_run_lists_runs_and_writes_nothing(tmp_path, capsys) -> None:
    assert sweep({**SWEEP, "grid": {"train.lr": [0.01, 0.1]}}, out=str(tmp_path / "o"), dry_run=True) == []
    listing = capsys.readouterr().out
    assert listing.count("\nrun ") == 8 and "er-lr0.1/class_incremental-digits/seed_1" in listing
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ray_backend_matches_local(local_sweep, tmp_path, monkeypatch) -> None:
    """A real local Ray instance with 2 CPUs (started and shut down by the sweep): same bytes as local workers."""
    pytest.importorskip("ray")
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    src, _ = local_sweep
    out = tmp_path / "ray"
    results = sweep(copy.deepcopy(SWEEP), out=str(out), backend="ray", workers=2, quiet=True)
    assert not ray.is_initialized()  # the sweep started it, so it shut it down
    assert len(results) == 4 and len(run_dirs(out)) == 4
    assert results_bytes(out) == results_bytes(src)


def test_ray_missing_is_a_one_line_error(tmp_path, capsys, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--backend", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install" in err
    assert not (tmp_path / "o").exists()


def test_strategy_grid_without_matching_strategy_names_it() -> None:
    with pytest.raises(ConfigError, match="none of the strategies"):
        expand(prepare({**SWEEP, "strategy": {"name": "naive"}, "grid": {"strategy.memory_size": [1]}},
                       out="/tmp/unused"))
