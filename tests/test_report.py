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
