"""`cltoolbox report`: figures exist (PNG + PDF), tables hold the right numbers, best values in bold."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

import cltoolbox
from cltoolbox import report


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cltoolbox.run({
        "name": "rep", "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": [32]},
        "strategy": [{"name": "naive"}, {"name": "er", "memory_size": 100}],
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05}, "seeds": [0, 1], "out": str(out),
    }, quiet=True)
    return out


def test_report_writes_figures_and_tables_with_the_right_numbers(runs: Path, tmp_path: Path) -> None:
    written = report.report([runs], tmp_path)
    names = {p.name for p in written["figures"]}
    for stem in ("heatmap_class_il_class_incremental-digits", "curve_class_il_class_incremental-digits",
                 "forgetting_class_il_class_incremental-digits", "pareto_memory_class_il_class_incremental-digits",
                 "pareto_time_task_il_class_incremental-digits"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    for p in written["figures"]:
        assert p.stat().st_size > 1000
        head = p.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else head.startswith(b"%PDF")

    accs = {s: [json.loads(p.read_text())["class_il"]["acc"] for p in runs.rglob(f"rep/{s}/*/seed_*/metrics.json")]
            for s in ("naive", "er")}
    table = report.summary_table(cltoolbox.load_results(runs)["metrics"])
    row = table.set_index("strategy").loc["er"]
    assert row.n_seeds == 2
    assert row.acc_mean == pytest.approx(statistics.mean(accs["er"]))
    assert row.acc_std == pytest.approx(statistics.stdev(accs["er"]))

    md = (tmp_path / "table_class_il.md").read_text()
    er_mean = statistics.mean(accs["er"]) * 100
    assert f"**{er_mean:.1f} ± " in md  # ER has the best ACC: bold
    assert f"{statistics.mean(accs['naive']) * 100:.1f} ± " in md
    tex = (tmp_path / "table_class_il.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\textbf{" + f"{er_mean:.1f}" in tex
    csv = (tmp_path / "table_class_il.csv").read_text().splitlines()
    assert csv[0].startswith("scenario,strategy,n_seeds,acc_mean,acc_std") and len(csv) == 3


def test_long_online_streams_average_what_was_trained_and_stay_legible(tmp_path: Path) -> None:
    # an online stream trains chunks of tasks: row r has seen the tasks whose first chunk came by r, which
    # is not `eval_exp <= trained_exp` (that counted one more task per chunk)
    cltoolbox.run({
        "name": "onl", "scenario": {"name": "online", "dataset": "digits", "n_tasks": 2, "chunk_size": 100},
        "model": {"name": "mlp", "hidden": [16]}, "strategy": "naive",
        "train": {"epochs": 1, "batch_size": 10, "lr": 0.05}, "seeds": [0], "out": str(tmp_path / "runs"),
    }, quiet=True)
    (run,) = [p.parent for p in (tmp_path / "runs").rglob("DONE")]
    first_seen = json.loads((run / "stream.json").read_text())["first_seen"]
    assert first_seen[0] == 1 and first_seen[1] > 3  # several chunks of task 0 before task 1's first
    acc = cltoolbox.load_results(run)["accuracy"]
    curve = report.seen_accuracy_curves(acc, "class_il").set_index("trained_exp").accuracy
    rows = acc[acc.setting == "class_il"].set_index(["trained_exp", "eval_exp"]).accuracy
    for r in range(len(curve)):
        seen = [j for j, f in enumerate(first_seen) if 0 < f <= r + 1]
        assert curve[r] == pytest.approx(statistics.mean(rows[(r, j)] for j in seen))
    written = report.report([run], tmp_path / "report")
    assert any(p.name == "heatmap_class_il_online-digits.png" for p in written["figures"])
    assert report._ticks(5) == [0, 1, 2, 3, 4]
    ticks = report._ticks(len(curve) + 1)
    assert ticks[0] == 0 and ticks[-1] == len(curve) and len(ticks) <= 12


def test_mean_std_is_the_tables_format() -> None:
    assert report.mean_std([0.5, 0.7]) == "0.600 ± 0.141"
    assert report.mean_std([0.5]) == "0.500 ± 0.000"  # one seed: no spread
    assert report.mean_std([0.25, 0.35], digits=1, scale=100) == "30.0 ± 7.1"
