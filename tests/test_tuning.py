"""Two-phase tuning (Cha & Cho 2024): select on the tuning scenario, evaluate unchanged on another one."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cltoolbox.cli import main

TUNING = {
    "name": "tun",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
    "model": {"name": "mlp", "hidden": [16]},
    "strategy": [{"name": "naive"}, {"name": "er", "memory_size": 50}],
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "seeds": [0, 1],
    "grid": {"train.lr": [0.01, 0.1, 1.0e12]},  # 1e12 diverges: such a point is reported, never selected
    # the evaluation phase: same scenario configuration, another class split, other seeds
    "evaluation": {"scenario": {"class_order": [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]}, "seeds": [3]},
}
FAST = ["--workers", "1", "--threads", "1", "-q"]


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "tuning.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tune")
    rc = main(["tune", str(write(tmp, TUNING)), "--out", str(tmp / "out"), *FAST])
    assert rc == 0
    return tmp


def test_selection_is_the_best_mean_over_seeds_and_is_evaluated_unchanged(tuned: Path) -> None:
    root = tuned / "out" / "tun"
    rows = pd.read_csv(root / "tuning_report.csv")
    tuning, evaluation = rows[rows.phase == "tuning"], rows[rows.phase == "evaluation"]
    assert len(tuning) == 6 and len(evaluation) == 2
    for strategy in ("naive", "er"):
        # recompute the selection from the run folders themselves
        means = {}
        for lr in ("0.01", "0.1"):
            accs = [json.loads(p.read_text())["class_il"]["acc"]
                    for p in (root / "tuning" / f"{strategy}-lr{lr}").rglob("metrics.json")]
            assert len(accs) == 2
            means[lr] = sum(accs) / 2
        best = max(means, key=means.get)
        chosen = tuning[(tuning.strategy == strategy) & tuning.selected]
        assert list(chosen.point) == [f"{strategy}-lr{best}"]
        assert chosen.acc_mean.iloc[0] == pytest.approx(means[best])
        diverged = tuning[(tuning.strategy == strategy) & (tuning.point == f"{strategy}-lr1000000000000.0")]
        assert list(diverged.status) == ["diverged"] and not diverged.selected.iloc[0]
        # the evaluation phase ran exactly the selected point, on the other class split and seeds
        ev = evaluation[evaluation.strategy == strategy]
        assert list(ev.point) == [f"{strategy}-lr{best}"] and list(ev.seeds) == [1]
        (cfg_path,) = (root / "evaluation" / f"{strategy}-lr{best}").rglob("config.yaml")
        cfg = yaml.safe_load(cfg_path.read_text())
        assert cfg["train"]["lr"] == float(best) and cfg["seed"] == 3
        assert cfg["scenario"]["class_order"] == list(range(9, -1, -1))
        if strategy == "er":
            assert cfg["strategy"]["memory_size"] == 50
        metrics = json.loads(cfg_path.with_name("metrics.json").read_text())
        assert ev.acc_mean.iloc[0] == pytest.approx(metrics["class_il"]["acc"])
    assert sorted(p.name for p in (root / "evaluation").iterdir()) == sorted(evaluation.point)
    md = (root / "tuning_report.md").read_text()
    assert md.count("(selected)") == 2 and "Hyperparameters in Continual Learning" in md
    assert "| naive | train.lr=" in md and "diverged" in md


def test_tune_resume_reruns_nothing(tuned: Path, capsys) -> None:
    out = tuned / "out"

    def finished_runs() -> dict:  # diverged runs have no DONE: --resume tries them again (and they diverge again)
        return {p: p.stat().st_mtime_ns for p in out.rglob("*")
                if p.is_file() and "tuning_report" not in p.name and "lr1000000000000.0" not in str(p)}

    runs = finished_runs()
    report = (out / "tun" / "tuning_report.csv").read_text()
    assert main(["tune", str(tuned / "tuning.yaml"), "--out", str(out), "--resume", *FAST]) == 0
    assert finished_runs() == runs
    assert (out / "tun" / "tuning_report.csv").read_text() == report
    assert main(["tune", str(tuned / "tuning.yaml"), "--out", str(out), *FAST]) == 2  # neither flag: refused
    assert "--resume" in capsys.readouterr().err


BAD = {
    "no evaluation": ({"evaluation": None}, ["evaluation", "missing"]),
    "no name": ({"name": None}, ["name: missing"]),
    "evaluation changes train": ({"evaluation": {"scenario": {"class_order": "seeded"}, "train": {"lr": 0.1}}},
                                 ["evaluation.train", "unchanged"]),
    "evaluation equals tuning": ({"evaluation": {"scenario": {"class_order": "fixed"}}},
                                 ["evaluation.scenario", "equals the tuning scenario"]),
    "bad evaluation scenario": ({"evaluation": {"scenario": {"n_experiences": 3}}},
                                ["evaluation phase", "scenario.n_experiences", "divisor"]),
    "unknown metric": ({"select": {"metric": "accuracy"}}, ["select.metric", "acc"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tuning_config_is_one_line_error_before_anything_runs(case, tmp_path, capsys) -> None:
    change, fragments = BAD[case]
    cfg = {**TUNING, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    rc = main(["tune", str(write(tmp_path, cfg)), "--out", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "out").exists()


def test_validation_protocol_selects_on_held_out_training_data(tmp_path: Path) -> None:
    from cltoolbox.tuning import tune

    config = {
        "name": "tv", "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5,
                                   "validation": 0.2},
        "model": {"name": "mlp", "hidden": [16]}, "strategy": [{"name": "naive"}],
        "grid": {"train.lr": [0.01, 0.1]}, "train": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "seeds": [0], "evaluation": {"scenario": {"validation": 0.0}, "seeds": [0]}, "out": str(tmp_path),
    }
    tune(config, quiet=True, workers=1)
    tuning_streams = list((tmp_path / "tv").rglob("tuning/**/stream.json"))
    eval_streams = list((tmp_path / "tv").rglob("evaluation/**/stream.json"))
    assert tuning_streams and eval_streams
    import json

    val = json.loads(tuning_streams[0].read_text())["eval_experiences"][0]
    test = json.loads(eval_streams[0].read_text())["eval_experiences"][0]
    # tuning evaluated on 20% of the training data; evaluation on the real test set
    assert val["n_test"] + val["n_train"] == test["n_train"] and test["n_test"] != val["n_test"]


def test_tune_dry_run_lists_both_phases_with_cli_seeds_and_runs_nothing(tmp_path: Path, capsys) -> None:
    rc = main(["tune", str(write(tmp_path, TUNING)), "--out", str(tmp_path / "out"), "--seeds", "7",
               "--dry-run", "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    tuning, evaluation = out.split("evaluation phase")
    # --seeds replaces both phases' seeds (the YAML's evaluation.seeds [3] too): 6 tuning + 6 evaluation runs
    assert tuning.count("seed_7") == 6 and evaluation.count("seed_7") == 6
    assert "seed_0" not in out and "seed_3" not in out
    assert "the selected grid point of each of the 2 strategies" in out
    assert not (tmp_path / "out").exists()


def test_tune_gpus_per_run_needs_ray(tmp_path: Path, capsys) -> None:
    rc = main(["tune", str(write(tmp_path, TUNING)), "--out", str(tmp_path / "out"), "--gpus-per-run", "1", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--gpus-per-run" in err and "--backend ray" in err
    assert not (tmp_path / "out").exists()
