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
        "strategy": [{"name": "naive"}, {"name": "er", "memory_size": 100}, {"name": "joint"}],
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
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$\mathbf{" + f"{er_mean:.1f}" + r" \pm" in tex
    csv = (tmp_path / "table_class_il.csv").read_text().splitlines()
    assert csv[0].startswith("scenario,scenario_title,strategy,method,reference,n_seeds,acc_mean,acc_std")
    assert len(csv) == 4


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
    sizes = acc[acc.setting == "class_il"].set_index(["trained_exp", "eval_exp"]).n_samples
    for r in range(len(curve)):
        seen = [j for j, f in enumerate(first_seen) if 0 < f <= r + 1]  # weighted by test-set size, as AIA
        want = sum(rows[(r, j)] * sizes[(r, j)] for j in seen) / sum(sizes[(r, j)] for j in seen)
        assert curve[r] == pytest.approx(want)
    written = report.report([run], tmp_path / "report")
    assert any(p.name == "heatmap_class_il_online-digits.png" for p in written["figures"])
    assert report._ticks(5) == [0, 1, 2, 3, 4]
    ticks = report._ticks(len(curve) + 1)
    assert ticks[0] == 0 and ticks[-1] == len(curve) and len(ticks) <= 12


def test_mean_std_is_the_tables_format() -> None:
    from cltoolbox.tables import mean_std

    assert mean_std([0.5, 0.7]) == "0.600 ± 0.141"
    assert mean_std([0.5]) == "0.500 ± 0.000"  # one seed: no spread
    assert mean_std([0.25, 0.35], digits=1, scale=100) == "30.0 ± 7.1"


def _captured_figures(monkeypatch) -> dict[str, object]:
    figs: dict[str, object] = {}

    def keep(fig, out, name):
        figs[name] = fig
        return [Path(out) / f"{name}.png"]

    monkeypatch.setattr(report, "save_figure", keep)
    return figs


def test_references_are_never_bolded_and_joints_fwt_measures_nothing(runs: Path, tmp_path: Path) -> None:
    written = report.report([runs], tmp_path)
    md = (tmp_path / "table_class_il.md").read_text()
    joint = next(line for line in md.splitlines() if line.startswith("| joint (ref.) |"))
    assert "**" not in joint and joint.count("—") == 3  # FWT, forgetting, BWT: measures nothing
    assert "upper bound" in md and "sample-weighted" in md and "Split Digits 8x8, 5 experiences (class-IL)." in md
    naive = next(line for line in md.splitlines() if line.startswith("| naive |"))
    assert naive.count("**") == 0  # FWT ties across methods (-b_j in class-IL), memory is a cost: nothing bold
    header = md.splitlines()[0]
    for unit in ("ACC (%)", "AIA (%)", "Forgetting (pp)", "BWT (pp)", "FWT (pp)", "CPU time (s)", "Memory (MB)"):
        assert unit in header
    table = report.summary_table(cltoolbox.load_results(runs)["metrics"])
    assert list(table.strategy) == ["naive", "er", "joint"] and list(table.reference) == [False, False, True]
    assert table.set_index("strategy").loc["joint", "acc_mean"] > table.set_index("strategy").loc["er", "acc_mean"]
    tex = (tmp_path / "table_class_il.tex").read_text()
    assert tex.startswith("% Needs \\usepackage{booktabs}")
    assert "\\begin{table*}" in tex and ": table*, which spans both columns" in tex  # 7 metrics: too wide
    narrow = table[[c for c in table.columns if not c.startswith(("aia", "forgetting", "bwt", "fwt", "cpu",
                                                                  "wall", "memory"))]]
    small = report.to_latex(narrow)
    assert "\\begin{table}[t]" in small and "fits one column" in small and report.latex_width_in(narrow) < 3.33
    assert "−" not in tex and "$-" in tex  # negative BWT: a real minus sign in math mode
    assert not written["dropped"]


def test_figures_use_one_based_experiences_percent_units_and_seed_counts(runs: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    figs = _captured_figures(monkeypatch)
    report.report([runs], tmp_path)
    heat = figs["heatmap_class_il_class_incremental-digits"]
    ax = heat.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4", "5"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["init", "1", "2", "3", "4", "5"]
    assert {t.get_text() for t in ax.texts} - {str(v) for v in range(101)} == set()  # cells in %
    colorbar = heat.axes[-1]
    assert colorbar.get_ylabel() == "accuracy (%)" and colorbar.get_ylim() == (0.0, 100.0)
    title = heat._suptitle.get_text()
    assert "Split Digits 8x8, 5 experiences" in title and "class-IL" in title and "mean over 2 seeds" in title
    bars = figs["forgetting_class_il_class_incremental-digits"]
    assert [a.get_ylabel() for a in bars.axes] == ["forgetting (pp)", "BWT (pp)"]
    assert "± std over 2 seeds" in bars._suptitle.get_text()
    curve = figs["curve_class_il_class_incremental-digits"].axes[0]
    assert "mean ± std over 2 seeds" in curve.get_title() and curve.get_ylabel().endswith("(%)")
    pareto = figs["pareto_time_class_il_class_incremental-digits"].axes[0]
    assert pareto.get_xlabel() == "CPU time per run (s)"
    assert "class_incremental" not in " ".join(f._suptitle.get_text() if f._suptitle else f.axes[0].get_title()
                                               for f in figs.values())  # no raw ids as titles


def test_domain_il_streams_are_named_so_and_get_no_duplicate_task_il_figures(tmp_path: Path, monkeypatch) -> None:
    cltoolbox.run({
        "name": "dom", "scenario": {"name": "permuted", "dataset": "digits", "n_experiences": 3},
        "model": {"name": "mlp", "hidden": [16]}, "strategy": "naive",
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}, "seeds": [0], "out": str(tmp_path / "runs"),
    }, quiet=True)
    figs = _captured_figures(monkeypatch)
    written = report.report([tmp_path / "runs"], tmp_path / "rep")
    assert figs and all("task_il" not in name for name in figs)
    assert not (tmp_path / "rep" / "table_task_il.md").exists()
    assert {p.name for p in written["tables"]} == {"table_class_il.csv", "table_class_il.md", "table_class_il.tex"}
    title = figs["curve_class_il_permuted-digits"].axes[0].get_title()
    assert "Permuted Digits 8x8, 3 experiences, domain-IL" in title and "class-IL" not in title
    assert "domain-IL" in (tmp_path / "rep" / "table_class_il.md").read_text()


@pytest.mark.slow
def test_report_names_each_run_it_leaves_out_and_never_tracebacks(runs: Path, tmp_path: Path, capsys) -> None:
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    done = sorted(p.parent for p in copy.rglob("DONE"))
    (done[0] / "metrics.json").write_text("{not json")
    (done[1] / "accuracy.csv").write_text("")
    (done[2] / "DONE").unlink()  # as a diverged run leaves it
    meta = json.loads((done[2] / "metrics.json").read_text())
    (done[2] / "metrics.json").write_text(json.dumps({**meta, "status": "diverged"}))
    written = report.report([copy], tmp_path / "rep")
    reasons = {str(r): why for r, why in written["dropped"]}
    assert reasons == {str(done[0]): reasons[str(done[0])], str(done[1]): "accuracy.csv is empty",
                       str(done[2]): "not finished (status: diverged)"}
    assert reasons[str(done[0])].startswith("metrics.json is not valid JSON")
    err = capsys.readouterr().err
    assert all(f"warning: left out {r}: " in err for r in reasons)
    assert (tmp_path / "rep" / "dropped_runs.csv").read_text().count("\n") == 4
    from cltoolbox.results import load

    table = report.summary_table(load(copy, dropped=[])["metrics"])
    assert table.n_seeds.sum() == len(done) - 3
    # the command line: warnings, no traceback, exit 0; nothing usable at all: one error line, exit 2
    cli = [sys.executable, "-m", "cltoolbox.cli", "report", str(copy), "--out", str(tmp_path / "rep2")]
    res = subprocess.run(cli, capture_output=True, text=True)
    assert res.returncode == 0 and "Traceback" not in res.stderr and res.stderr.count("warning: left out") == 3
    for run in done[3:]:
        (run / "accuracy.csv").write_text("")
    res = subprocess.run(cli, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.strip().splitlines()[-1].startswith(
        "error: ")


def test_time_is_the_runs_cpu_time_when_recorded_else_wall_time(runs: Path) -> None:
    m = cltoolbox.load_results(runs)["metrics"]
    assert (m.cpu_s > 0).all()  # metrics.json's cost.cpu_s: process CPU time of the run
    with_cpu = report.summary_table(m)
    assert "cpu_s_mean" in with_cpu and "wall_s_mean" not in with_cpu
    older = report.summary_table(m.drop(columns="cpu_s"))  # run folders written before cpu_s existed
    md = report.to_markdown(older)
    assert "Wall time (s)" in md and "CPU time" not in md and "sensitive to other load" in md
