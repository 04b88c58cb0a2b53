"""Time to target: metrics.json section, null where never reached, no effect on training, the report figure."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cltoolbox
from cltoolbox.errors import ConfigError
from cltoolbox.time_to_target import FIELDS, TimeToTarget


def _config(tmp_path: Path, name: str, ttt: dict | None, strategies=None, scenario=None) -> dict:
    train = {"epochs": 2, "batch_size": 32, "lr": 0.05}
    if ttt is not None:
        train["time_to_target"] = ttt
    return {"name": name, "scenario": scenario or {"name": "class_incremental", "dataset": "digits",
                                                    "n_experiences": 3, "first_classes": 4},
            "model": {"name": "mlp", "hidden": [32]}, "strategy": strategies or {"name": "naive"},
            "train": train, "seeds": [0], "out": str(tmp_path)}


def test_reached_and_never_reached(tmp_path) -> None:
    (easy,) = cltoolbox.run(_config(tmp_path, "easy", {"target": 0.05, "every": 3}), quiet=True)
    t = easy["time_to_target"]
    assert t["target"] == 0.05 and t["every"] == 3 and t["metric"] == "accuracy"
    assert t["n_reached"] == 3 and t["checks_excluded_from_timing"] is True
    for r in t["per_experience"]:  # checks every 3 steps: the hit is at a multiple of 3 (or the last step)
        assert r["reached"] and r["steps"] % 3 == 0 and r["samples"] == 32 * r["steps"]
        assert r["cpu_s"] > 0 and r["wall_s"] > 0
    assert t["per_experience"][0]["steps"] == 3  # 4 new classes from scratch: above 5% at the first check
    assert t["total_steps"] == sum(r["steps"] for r in t["per_experience"])
    cum = [r["cum_cpu_s"] for r in t["per_experience"]]
    assert cum == sorted(cum) and cum[0] > 0
    on_disk = json.loads((Path(easy["run_dir"]) / "metrics.json").read_text())["time_to_target"]
    assert on_disk["per_experience"][0]["steps"] == 3

    (hard,) = cltoolbox.run(_config(tmp_path, "hard", {"target": 1.0, "every": 1000}, {"name": "naive",
                                                                                         "train": {"lr": 1e-6}}),
                            quiet=True)
    t = hard["time_to_target"]
    assert t["n_reached"] == 0 and all(t[f"total_{k}"] is None for k in FIELDS)
    for r in t["per_experience"]:  # never reached: null, not 0, and the score of the end-of-experience check
        assert r["reached"] is False and all(r[k] is None for k in FIELDS)
        assert r["score_at_end_or_hit"] < 1.0
    raw = (Path(hard["run_dir"]) / "metrics.json").read_text()
    assert '"steps": null' in raw


def test_checks_do_not_change_training(tmp_path) -> None:
    strategies = [{"name": "naive"}, {"name": "er", "memory_size": 30}]
    plain = cltoolbox.run(_config(tmp_path / "a", "same", None, strategies), quiet=True)
    watched = cltoolbox.run(_config(tmp_path / "b", "same", {"target": 0.9, "every": 2}, strategies), quiet=True)
    for p, w in zip(plain, watched, strict=True):
        assert "time_to_target" not in p
        A = np.loadtxt(Path(p["run_dir"]) / "matrices" / "accuracy_class_il.csv", delimiter=",", skiprows=1)
        B = np.loadtxt(Path(w["run_dir"]) / "matrices" / "accuracy_class_il.csv", delimiter=",", skiprows=1)
        assert np.array_equal(A, B)


def test_report_draws_acc_against_cost(tmp_path, monkeypatch) -> None:
    strategies = [{"name": "naive"}, {"name": "er", "memory_size": 30}]
    cltoolbox.run(_config(tmp_path / "runs", "fig", {"target": 0.5, "every": 5}, strategies), quiet=True)
    from cltoolbox import report as report_module
    from cltoolbox.report import report

    for other in ("plot_heatmaps", "plot_curves", "plot_bars", "plot_pareto"):  # ~50 s of figures not tested here
        monkeypatch.setattr(report_module, other, lambda *a, **k: [])

    written = report([tmp_path / "runs"], tmp_path / "out")
    names = [Path(p).name for p in written["figures"]]
    assert "time_to_target_class_incremental-digits.png" in names
    assert (tmp_path / "out" / "time_to_target_class_incremental-digits.pdf").stat().st_size > 0
    # runs without the setting draw no such figure
    cltoolbox.run(_config(tmp_path / "plain", "nofig", None), quiet=True)
    written = report([tmp_path / "plain"], tmp_path / "out2")
    assert not any("time_to_target" in Path(p).name for p in written["figures"])


def test_multi_label_target_is_map(tmp_path) -> None:
    scenario = {"name": "multi_label", "dataset": "digits_grid", "n_experiences": 2}
    (s,) = cltoolbox.run(_config(tmp_path, "ml", {"target": 0.3, "every": 5}, scenario=scenario), quiet=True)
    assert s["time_to_target"]["metric"] == "map" and len(s["time_to_target"]["per_experience"]) == 2


@pytest.mark.parametrize(("spec", "match"), [
    ({"target": 1.5}, r"train.time_to_target.target: must be a score in \(0, 1\]"),
    ({"target": 0.9, "every": 0}, "train.time_to_target.every: must be an integer >= 1"),
    ({"target": 0.9, "evry": 5}, "train.time_to_target: unknown key 'evry'"),
    ({"every": 5}, "train.time_to_target.target"),
])
def test_bad_settings_are_one_line_errors(tmp_path, spec, match) -> None:
    with pytest.raises(ConfigError, match=match):
        cltoolbox.run(_config(tmp_path, "bad", spec), quiet=True)


def test_state_survives_a_weights_only_checkpoint() -> None:
    obs = TimeToTarget(0.9, 10)
    obs.records = [{"experience": 0, "reached": False, "steps": None, "samples": None, "cpu_s": None,
                    "wall_s": None, "score_at_end_or_hit": 0.5, "cum_cpu_s": 1.0, "cum_wall_s": 2.0,
                    "cum_samples": 30}]
    buf = io.BytesIO()
    torch.save(obs.state_dict(), buf)
    buf.seek(0)
    again = TimeToTarget(0.9, 10)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.records == obs.records and again.section()["n_reached"] == 0
