"""Figures and tables for papers from run folders (``cltoolbox report RUN_DIR... --out DIR``).

Seeds are aggregated as mean ± sample std; every figure says over how many seeds. Figures use one style sized
for a single column (3.4 in wide, two columns for heatmap grids), saved as PNG (300 dpi) and vector PDF;
accuracies are in %, differences of accuracies (forgetting, BWT, FWT) in percentage points (pp), experiences
are numbered from 1 as in the README and the papers. Titles name the dataset, the stream and the setting it
really is: a stream whose experiences all hold the same classes (permuted, rotated, domain_incremental) is
domain-IL, and its task-IL evaluation masks nothing, so it gets no task-IL figures or table.

Tables are written as CSV (raw values: accuracies as fractions, ``memory_mb``, seconds), Markdown and LaTeX
(booktabs), a unit on every column, with the best mean per scenario and column in bold. Upper-bound
references (``joint``, ``cumulative``) are listed last, marked as references, and never bolded; joint's FWT,
forgetting and BWT measure nothing (it trains on the whole stream at once) and are shown as "—". Time is the
run's process CPU time (``cost.cpu_s``, all threads; robust to other load on a shared machine) when every run
has it, else wall time, and the column says which. :func:`summary_table` returns the table as a DataFrame.

Run folders that cannot be used (not finished: diverged, failed or interrupted; unreadable ``metrics.json``;
empty ``accuracy.csv``) are left out, each named with the reason on stderr and in ``dropped_runs.csv``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cltoolbox.tables import METRICS, format_mean_std

COLUMN_WIDTH_IN = 3.4
# metric -> (header with unit, higher is better, scale to the unit)
TABLE_METRICS: dict[str, tuple[str, bool, float]] = {
    k: (METRICS[k].header, METRICS[k].higher_is_better, 100.0) for k in ("acc", "aia", "forgetting", "bwt", "fwt")}
COST_METRICS: dict[str, tuple[str, bool, float]] = {
    "cpu_s": ("CPU time (s)", False, 1.0),
    "wall_s": ("Wall time (s)", False, 1.0),
    "memory_mb": ("Memory (MB)", False, 1.0),
}
# strategies that are references, not competitors: (what they bound, metrics that measure nothing for them)
REFERENCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "joint": ("upper bound: trains on the whole stream at once", ("fwt", "forgetting", "bwt")),
    "cumulative": ("upper bound: retrains on all data seen so far", ()),
}
DATASET_NAMES = {"mnist5k": "MNIST-5k", "digits": "Digits 8x8", "mnist1d": "MNIST-1D", "mnist": "MNIST",
                 "fashion_mnist": "Fashion-MNIST", "kmnist": "KMNIST", "cifar10": "CIFAR-10",
                 "cifar100": "CIFAR-100", "svhn": "SVHN", "image_folder": "image folder"}
SCENARIO_NAMES = {"class_incremental": "Split {d}", "task_incremental": "Split {d}",
                  "domain_incremental": "Split {d}", "permuted": "Permuted {d}", "rotated": "Rotated {d}",
                  "online": "{d}", "few_shot": "{d}", "power_law": "{d}, power-law revisits",
                  "curriculum": "{d}, curriculum order", "repetition": "{d} with repetitions"}
LATEX_COLUMN_IN = 3.33  # \columnwidth of a two-column paper (ACL, CVPR, ICML, NeurIPS-style 2-col)


# -- what a scenario is -------------------------------------------------------------------------------------
def scenario_info(run: str | Path) -> dict[str, Any]:
    """Title and settings of the stream a run trained on, from its stream.json and metrics.json labels:
    ``title`` (e.g. "Split MNIST-5k, 5 experiences"), ``settings`` (setting -> its real name), ``n_exp``."""
    run = Path(run)
    try:
        stream = json.loads((run / "stream.json").read_text())
    except (OSError, ValueError):
        stream = {}
    try:
        labels = json.loads((run / "metrics.json").read_text()).get("labels", {})
    except (OSError, ValueError, AttributeError):
        labels = {}
    kind = str(labels.get("scenario", "")).split("-")[0] or stream.get("scenario", "")  # the config's generator
    dataset = labels.get("dataset") or str(labels.get("scenario", "")).partition("-")[2]
    name = SCENARIO_NAMES.get(kind, kind.replace("_", " ") + " {d}").format(d=DATASET_NAMES.get(dataset, dataset))
    evals = stream.get("eval_experiences") or stream.get("experiences") or []
    n_exp = len(stream.get("experiences") or []) or labels.get("n_experiences")
    title = f"{name}, {n_exp} experiences" if n_exp else name
    classes = [frozenset(e.get("classes", ())) for e in evals]
    # every test experience holds every class: the task-IL mask is a no-op, the setting is domain-IL
    domain = len(classes) > 1 and all(c == classes[0] for c in classes)
    if domain:
        settings = {"class_il": "domain-IL"}
    else:
        prefix = {"few_shot": "few-shot ", "online": "online "}.get(kind, "")
        settings = {"class_il": f"{prefix}class-IL", "task_il": f"{prefix}task-IL"}
    return {"title": title, "settings": settings, "n_exp": n_exp, "domain": domain}


def _infos(accuracy: Any) -> dict[str, dict[str, Any]]:
    return {sc: scenario_info(g.run.iloc[0]) for sc, g in accuracy.groupby("scenario", sort=False)}


def _is_reference(method: str) -> bool:
    return method in REFERENCES


# -- style --------------------------------------------------------------------------------------------------
def paper_style() -> None:
    """Matplotlib settings for paper figures (Agg backend, 8 pt fonts, column-width friendly)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
        "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False,
        "figure.dpi": 100, "savefig.bbox": "tight", "pdf.fonttype": 42, "lines.linewidth": 1.2,
        "axes.unicode_minus": True,
    })


def save_figure(fig: Any, out: Path, name: str) -> list[Path]:
    """Save ``fig`` as ``out/name.png`` and ``.pdf``, close it; returns the paths."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=300)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def _seeds_text(counts: Iterable[int]) -> str:
    counts = sorted(set(int(c) for c in counts))
    if not counts:
        return ""
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{n} seed" + ("" if n == "1" else "s")


# -- tables -------------------------------------------------------------------------------------------------
def time_key(metrics: Any) -> str:
    """``cpu_s`` when every run recorded its CPU time, else ``wall_s``."""
    if "cpu_s" in metrics.columns and metrics["cpu_s"].notna().all():
        return "cpu_s"
    return "wall_s"


def summary_table(metrics: Any, setting: str = "class_il") -> Any:
    """One row per (scenario, strategy): n_seeds, method, reference flag and mean/std of each metric and cost
    (accuracies as fractions; ``memory_mb`` = memory_bytes / 1e6). Reference rows come last per scenario."""
    import pandas as pd

    m = metrics[metrics.setting == setting].copy()
    if "memory_bytes" in m.columns:
        m["memory_mb"] = pd.to_numeric(m["memory_bytes"], errors="coerce") / 1e6
    tkey = time_key(m) if len(m) else "wall_s"
    cols = [c for c in (*TABLE_METRICS, tkey, "memory_mb") if c in m.columns]
    if "method" not in m.columns:
        m["method"] = m["strategy"]
    rows = []
    for (scenario, strategy), g in m.groupby(["scenario", "strategy"], sort=False):
        method = str(g["method"].iloc[0])
        row: dict[str, Any] = {"scenario": scenario, "strategy": strategy, "method": method,
                               "reference": _is_reference(method), "n_seeds": len(g)}
        for c in cols:
            vals = pd.to_numeric(g[c], errors="coerce").dropna()
            row[f"{c}_mean"] = vals.mean() if len(vals) else np.nan
            row[f"{c}_std"] = vals.std(ddof=1) if len(vals) > 1 else (0.0 if len(vals) else np.nan)
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    order = {sc: i for i, sc in enumerate(dict.fromkeys(table.scenario))}
    table["_o"] = table.scenario.map(order)
    return table.sort_values(["_o", "reference"], kind="stable").drop(columns="_o").reset_index(drop=True)


def _columns(table: Any) -> list[str]:
    metrics = {**TABLE_METRICS, **COST_METRICS}
    return [c for c in metrics if f"{c}_mean" in table.columns]


def _measures_nothing(method: str, metric: str) -> bool:
    return metric in REFERENCES.get(method, ("", ()))[1]


def _cells(table: Any) -> list[list[tuple[str, float, float, bool] | str]]:
    """Per row: scenario, strategy label, seeds, then per metric (kind, mean, std, bold) with kind 'num',
    'na' (undefined) or 'none' (measures nothing)."""
    metrics = {**TABLE_METRICS, **COST_METRICS}
    cols = _columns(table)
    best: dict[tuple[str, str], float] = {}
    for scenario, g in table.groupby("scenario", sort=False):
        competitors = g[~g["reference"].astype(bool)]
        for c in cols:
            if c in COST_METRICS:  # costs are trade-offs (see the Pareto plots), not rankings
                continue
            vals = competitors[f"{c}_mean"].dropna()
            # a best among one, or among equals, is no comparison: e.g. class-IL FWT is -b_j for every method
            # that never predicts untrained classes
            if len(vals) >= 2 and not np.allclose(vals, vals.iloc[0], rtol=0, atol=1e-9):
                best[(scenario, c)] = vals.max() if metrics[c][1] else vals.min()
    out = []
    for r in table.to_dict("records"):
        label = r["strategy"] + (" (ref.)" if r["reference"] else "")
        scenario = r.get("scenario_title") if isinstance(r.get("scenario_title"), str) else r["scenario"]
        cells: list[Any] = [scenario, label, str(r["n_seeds"])][_first(table):]
        for c in cols:
            mean, std = r[f"{c}_mean"], r[f"{c}_std"]
            if _measures_nothing(r["method"], c):
                cells.append(("none", np.nan, np.nan, False))
            elif mean != mean:
                cells.append(("na", np.nan, np.nan, False))
            else:
                top = best.get((r["scenario"], c), np.nan)
                d = _digits(c, mean * metrics[c][2])  # ties at the printed precision are all bold
                bold = not r["reference"] and round(mean * metrics[c][2], d) == round(top * metrics[c][2], d)
                cells.append(("num", mean * metrics[c][2], std * metrics[c][2], bold))
        out.append(cells)
    return out


def _digits(col: str, value: float = 0.0) -> int:
    if col == "memory_mb" or (col in ("cpu_s", "wall_s") and abs(value) < 10):
        return 2
    return 1


def _first(table: Any) -> int:
    """Index of the first printed column: a table of one scenario names it in its notes, not on every row."""
    return 1 if len(table) and table["scenario"].nunique() == 1 else 0


def _scenario_name(table: Any) -> str:
    t = table.iloc[0]
    return t["scenario_title"] if isinstance(t.get("scenario_title"), str) else t["scenario"]


def table_headers(table: Any) -> list[str]:
    metrics = {**TABLE_METRICS, **COST_METRICS}
    return ["Scenario", "Strategy", "Seeds"][_first(table):] + [metrics[c][0] for c in _columns(table)]


def table_notes(table: Any, setting: str = "class_il") -> list[str]:
    """The notes printed under a table: what is weighted, which rows are references, what '—' means."""
    cols = _columns(table)
    notes = ["Mean ± sample std over seeds."]
    if _first(table):
        notes.insert(0, f"{_scenario_name(table)}.")
    if "aia" in cols:
        notes.append("AIA is sample-weighted (accuracy on all test samples seen so far, Rebuffi et al. 2017); "
                     "ACC, forgetting, BWT and FWT average experiences equally.")
    if "forgetting" in cols or "bwt" in cols:
        notes.append("pp = percentage points.")
    if "cpu_s" in cols:
        notes.append("CPU time: the run's process CPU time over all its threads (not wall time).")
    elif "wall_s" in cols:
        notes.append("Wall time: elapsed seconds, sensitive to other load on the machine.")
    if "memory_mb" in cols:
        notes.append("Memory: stored replay samples, exemplars and extra models, at native size "
                     "(1 MB = 1,000,000 bytes).")
    if len(table) and table["reference"].astype(bool).any():
        refs = sorted(set(table.loc[table["reference"].astype(bool), "method"]))
        notes.append("(ref.) " + "; ".join(f"{m}: {REFERENCES[m][0]}" for m in refs) + ". References are not "
                     "ranked; — marks what a reference does not measure (joint: FWT, forgetting, BWT).")
    return notes


def _plain(cell: Any, col: str) -> str:
    kind, mean, std, _ = cell
    if kind == "none":
        return "—"
    if kind == "na":
        return "n/a"
    d = _digits(col, mean)
    return format_mean_std(mean, std, d).replace("-", "−")


def to_markdown(table: Any, setting: str = "class_il") -> str:
    head = table_headers(table)
    cols = _columns(table)
    k = 3 - _first(table)  # label columns
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * (k - 1) + ["---:"] * (1 + len(cols))) + "|"]
    for row in _cells(table):
        texts = [f"**{_plain(c, col)}**" if c[3] else _plain(c, col) for c, col in zip(row[k:], cols, strict=True)]
        lines.append("| " + " | ".join([*row[:k], *texts]) + " |")
    lines.append("")
    lines += [f"{n}  " for n in table_notes(table, setting)]
    return "\n".join(lines) + "\n"


def _latex_escape(s: str) -> str:
    return (s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")
            .replace("#", r"\#").replace("$", r"\$").replace("±", r"$\pm$").replace("—", "---"))


def _latex_num(cell: Any, col: str) -> str:
    kind, mean, std, bold = cell
    if kind == "none":
        return "---"
    if kind == "na":
        return "n/a"
    d = _digits(col, mean)
    body = f"{mean:.{d}f} \\pm {std:.{d}f}"  # inside math mode '-' is a real minus sign
    return f"$\\mathbf{{{body}}}$" if bold else f"${body}$"


LATEX_TEXT_IN = 7.0  # \textwidth of a two-column paper (the width table* spans)
_PT_PER_CHAR, _SEP_PT = 4.5, 8.0  # \small (9 pt): ~0.5 em per character; \tabcolsep 4 pt on each side


def _latex_header(table: Any) -> tuple[list[str], list[str]]:
    """Two header rows: names, then units ("ACC" over "(%)"), so headers are no wider than their numbers."""
    metrics = {**TABLE_METRICS, **COST_METRICS}
    names, units = ["Strategy", "Seeds"], ["", ""]
    for c in _columns(table):
        name, _, unit = metrics[c][0].rpartition(" (")
        names.append(name)
        units.append(f"({unit}" if unit else "")
    return names, units


def latex_width_in(table: Any) -> float:
    """Estimated printed width of :func:`to_latex`'s tabular at \\small: ~4.5 pt per character of the widest
    entry of each column, plus 8 pt of column separation per column."""
    cols = _columns(table)
    names, units = _latex_header(table)
    k = 3 - _first(table)
    rows = _cells(table)
    widths = [max(len(names[0]), *(len(str(r[k - 2])) for r in rows)), max(len(names[1]), 2)]
    for i, c in enumerate(cols):
        widths.append(max(len(names[2 + i]), len(units[2 + i]), *(len(_plain(r[k + i], c)) for r in rows)))
    return (sum(widths) * _PT_PER_CHAR + _SEP_PT * len(widths)) / 72.27


def to_latex(table: Any, caption: str = "", setting: str = "class_il") -> str:
    """A booktabs table: a row per strategy, scenarios as spanning header rows, references last below a rule,
    numbers in math mode (real minus signs). ``table`` when it fits one column, else ``table*``, and scaled
    to the text width when even that is too narrow; the comment lines at the top say which and why."""
    cols = _columns(table)
    names, units = _latex_header(table)
    width = latex_width_in(table)
    n = len(names)
    if width <= LATEX_COLUMN_IN:
        env, fit = "table", f"fits one column ({LATEX_COLUMN_IN} in): table."
    elif width <= LATEX_TEXT_IN:
        env, fit = "table*", (f"wider than one column ({LATEX_COLUMN_IN} in): table*, which spans both columns of "
                              "a two-column paper.")
    else:
        env, fit = "table*", (f"wider than the text ({LATEX_TEXT_IN} in): table* with \\resizebox to "
                              "\\textwidth (needs \\usepackage{graphicx}); better drop columns.")
    lines = [r"% Needs \usepackage{booktabs} (\toprule, \midrule, \bottomrule) in the preamble.",
             f"% Estimated width {width:.1f} in at \\small: {fit}",
             rf"\begin{{{env}}}[t]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}"]
    if width > LATEX_TEXT_IN:
        lines.append(r"\resizebox{\textwidth}{!}{%")
    lines += [r"\begin{tabular}{l" + "r" * (n - 1) + "}", r"\toprule",
              " & ".join(_latex_escape(h) for h in names) + r" \\",
              " & ".join(_latex_escape(u) for u in units) + r" \\", r"\midrule"]
    k = 3 - _first(table)
    several = not _first(table)
    prev: tuple[str, bool] | None = None
    for row, r in zip(_cells(table), table.to_dict("records"), strict=True):
        ref = bool(r["reference"])
        if several and (prev is None or prev[0] != r["scenario"]):
            if prev is not None:
                lines.append(r"\midrule")
            lines.append(rf"\multicolumn{{{n}}}{{l}}{{\emph{{{_latex_escape(str(row[0]))}}}}} \\")
        elif ref and prev is not None and not prev[1]:
            lines.append(r"\cmidrule(lr){1-" + str(n) + "}")
        prev = (r["scenario"], ref)
        cells = [_latex_escape(str(c)) for c in row[k - 2 : k]]
        cells += [_latex_num(c, col) for c, col in zip(row[k:], cols, strict=True)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}" + ("}" if width > LATEX_TEXT_IN else "")]
    text = " ".join([caption, *table_notes(table, setting)]).strip()
    if text:
        lines.append(r"\caption{" + _latex_escape(text) + "}")
    lines.append(rf"\end{{{env}}}")
    return "\n".join(lines) + "\n"


# -- figures ------------------------------------------------------------------------------------------------
def mean_matrices(accuracy: Any, setting: str) -> dict[tuple[str, str], np.ndarray]:
    """Seed-averaged (T+1) x T accuracy matrix per (scenario, strategy)."""
    out = {}
    a = accuracy[accuracy.setting == setting]
    for (scenario, strategy), g in a.groupby(["scenario", "strategy"], sort=False):
        m = g.groupby(["trained_exp", "eval_exp"]).accuracy.mean().unstack("eval_exp")
        out[(scenario, strategy)] = m.to_numpy()
    return out


def _n_seeds(accuracy: Any) -> dict[tuple[str, str], int]:
    return {k: int(g.seed.nunique()) for k, g in accuracy.groupby(["scenario", "strategy"], sort=False)}


def seen_accuracy_curves(accuracy: Any, setting: str) -> Any:
    """After each experience, the accuracy on all test samples of the experiences seen so far (weighted by
    their test-set sizes, as AIA: the mean of a run's curve is its AIA), one row per run."""
    a = accuracy[(accuracy.setting == setting) & accuracy.seen].copy()
    a["_hits"] = a.accuracy * a.n_samples
    g = a.groupby(["scenario", "strategy", "seed", "trained_exp"], sort=False)[["_hits", "n_samples"]].sum()
    g["accuracy"] = g["_hits"] / g["n_samples"]
    return g[["accuracy"]].reset_index()


def _ticks(n: int, most: int = 12) -> list[int]:
    """Every index up to ``most`` of them, else about ``most`` evenly spaced ones including the first and last."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def plot_heatmaps(accuracy: Any, setting: str, out: Path, infos: dict[str, dict] | None = None) -> list[Path]:
    import matplotlib.pyplot as plt

    infos = infos if infos is not None else _infos(accuracy)
    paths = []
    mats = mean_matrices(accuracy, setting)
    seeds = _n_seeds(accuracy)
    for scenario in dict.fromkeys(s for s, _ in mats):
        info = infos[scenario]
        if setting not in info["settings"]:
            continue
        items = [(st, m) for (sc, st), m in mats.items() if sc == scenario]
        cols = min(3, len(items))
        rows = (len(items) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(COLUMN_WIDTH_IN * 2 if cols > 1 else COLUMN_WIDTH_IN,
                                                      2.2 * rows + 0.5), squeeze=False, layout="constrained")
        methods = dict(zip(accuracy.strategy, accuracy.get("method", accuracy.strategy), strict=False))
        for k, (ax, (strategy, m)) in enumerate(zip(axes.flat, items, strict=False)):
            pct = m * 100
            im = ax.imshow(pct, vmin=0, vmax=100, cmap="viridis", aspect="auto", interpolation="nearest")
            n_rows, T = m.shape  # rows: init + training experiences (more than T on online/recurring streams)
            ax.set_title(strategy + (" (reference)" if _is_reference(methods.get(strategy, strategy)) else ""))
            ax.set_xlabel("evaluated experience")
            if k % cols == 0:
                ax.set_ylabel("after training on")
            xt = _ticks(T)
            ax.set_xticks(xt, [str(j + 1) for j in xt])
            yt = _ticks(n_rows)
            ax.set_yticks(yt, ["init" if r == 0 else str(r) for r in yt])
            if n_rows <= 11 and T <= 10:  # numbers only while they stay legible
                for i in range(n_rows):
                    for j in range(T):
                        if pct[i, j] == pct[i, j]:
                            ax.text(j, i, f"{pct[i, j]:.0f}", ha="center", va="center", fontsize=5,
                                    color="white" if pct[i, j] < 60 else "black")
        for ax in list(axes.flat)[len(items):]:
            ax.axis("off")
        fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy (%)")
        n = _seeds_text(seeds[(scenario, st)] for st, _ in items)
        fig.suptitle(f"{info['title']}, {info['settings'][setting]}: accuracy (%), mean over {n}", fontsize=8)
        paths += save_figure(fig, out, f"heatmap_{setting}_{scenario}")
    return paths


def plot_curves(accuracy: Any, setting: str, out: Path, infos: dict[str, dict] | None = None) -> list[Path]:
    import matplotlib.pyplot as plt

    infos = infos if infos is not None else _infos(accuracy)
    paths = []
    curves = seen_accuracy_curves(accuracy, setting)
    methods = dict(zip(accuracy.strategy, accuracy.get("method", accuracy.strategy), strict=False))
    for scenario, g in curves.groupby("scenario", sort=False):
        info = infos[scenario]
        if setting not in info["settings"]:
            continue
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.4), layout="constrained")
        counts = []
        for strategy, s in g.groupby("strategy", sort=False):
            stats = s.groupby("trained_exp").accuracy.agg(["mean", "std", "count"])
            counts.append(int(s.seed.nunique()))
            x = stats.index.to_numpy() + 1
            mean, std = stats["mean"].to_numpy() * 100, stats["std"].fillna(0).to_numpy() * 100
            ref = _is_reference(methods.get(strategy, strategy))
            ax.plot(x, mean, marker="o" if len(x) <= 30 else None, markersize=2.5,
                    linestyle="--" if ref else "-", label=strategy + (" (ref.)" if ref else ""))
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("experiences trained")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel("accuracy on seen test samples (%)")
        ax.set_ylim(0, 102)
        ax.set_title(f"{info['title']}, {info['settings'][setting]}\nmean ± std over {_seeds_text(counts)}")
        ax.legend(frameon=False, ncol=2)
        paths += save_figure(fig, out, f"curve_{setting}_{scenario}")
    return paths


def plot_bars(metrics: Any, setting: str, out: Path, infos: dict[str, dict]) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    m = metrics[metrics.setting == setting]
    for scenario, g in m.groupby("scenario", sort=False):
        info = infos[scenario]
        if setting not in info["settings"]:
            continue
        g = g.copy()
        for key in ("forgetting", "bwt"):
            g[key] = g[key].astype(float) * 100
        if "method" not in g:
            g["method"] = g["strategy"]
        nothing = g["method"].map(lambda m: _measures_nothing(m, "forgetting"))
        left_out = list(dict.fromkeys(g.loc[nothing, "strategy"]))  # joint: zero by construction
        g = g[~nothing]
        if g.empty:
            continue
        stats = g.groupby("strategy", sort=False)[["forgetting", "bwt"]].agg(["mean", "std"])
        methods = g.groupby("strategy", sort=False)["method"].first()
        seeds = g.groupby("strategy", sort=False).size()
        refs = [_is_reference(methods[s]) for s in stats.index]
        labels = [s + (" (ref.)" if r else "") for s, r in zip(stats.index, refs, strict=True)]
        fig, axes = plt.subplots(1, 2, figsize=(COLUMN_WIDTH_IN, 2.5), layout="constrained")
        for ax, key, label in zip(axes, ("forgetting", "bwt"), ("forgetting (pp)", "BWT (pp)"), strict=True):
            colors = ["0.7" if r else ("C0" if key == "forgetting" else "C1") for r in refs]
            ax.bar(range(len(stats)), stats[(key, "mean")], yerr=stats[(key, "std")].fillna(0), capsize=2,
                   color=colors)
            ax.set_xticks(range(len(stats)), labels, rotation=45, ha="right")
            ax.set_ylabel(label)
            ax.axhline(0, color="black", linewidth=0.5)
        fig.suptitle(f"{info['title']}, {info['settings'][setting]}\nmean ± std over {_seeds_text(seeds)} "
                     "(lower forgetting, higher BWT is better)", fontsize=8)
        if left_out:
            fig.supxlabel(f"not shown: {', '.join(left_out)} (zero by construction: trains on the whole stream "
                          "at once)", fontsize=6)
        paths += save_figure(fig, out, f"forgetting_{setting}_{scenario}")
    return paths


def plot_pareto(metrics: Any, setting: str, out: Path, infos: dict[str, dict]) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    m = metrics[metrics.setting == setting].copy()
    if m.empty:
        return paths
    m["memory_mb"] = m["memory_bytes"].astype(float) / 1e6
    tkey = time_key(m)
    tlabel = "CPU time per run (s)" if tkey == "cpu_s" else "wall time per run (s)"
    for cost, label, name in (("memory_mb", "stored memory (MB)", "memory"), (tkey, tlabel, "time")):
        for scenario, g in m.groupby("scenario", sort=False):
            info = infos[scenario]
            if setting not in info["settings"]:
                continue
            g = g.copy()
            g["acc"] = g["acc"].astype(float) * 100
            stats = g.groupby("strategy", sort=False)[["acc", cost]].mean()
            methods = g.groupby("strategy", sort=False)["method"].first() if "method" in g else stats.index.to_series()
            seeds = g.groupby("strategy", sort=False).size()
            ref = np.array([_is_reference(methods[s]) for s in stats.index])
            x, y = stats[cost].to_numpy(dtype=float), stats["acc"].to_numpy(dtype=float)
            fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.4), layout="constrained")
            ax.scatter(x[~ref], y[~ref], s=14, zorder=3, label="strategy")
            if ref.any():
                ax.scatter(x[ref], y[ref], s=18, marker="s", color="0.5", zorder=3, label="reference (upper bound)")
            pts = np.stack([x, y], 1) / np.array([np.ptp(x) or 1.0, np.ptp(y) or 1.0])
            for i, (strategy, xi, yi) in enumerate(zip(stats.index, x, y, strict=True)):
                near = np.all(np.abs(pts - pts[i]) < 0.06, axis=1)  # labels of these points would overlap
                below = bool(np.any(near & (y > yi)))  # the lower of two close points is labelled underneath
                ax.annotate(strategy, (xi, yi), fontsize=6, xytext=(3, -3 if below else 3), textcoords="offset points",
                            va="top" if below else "bottom")
            comp = np.flatnonzero(~ref)
            if len(comp):
                front = comp[_pareto_front(x[comp], y[comp])]
                ax.plot(x[front], y[front], color="C3", linewidth=0.8, marker="o", markersize=7,
                        markerfacecolor="none", label="Pareto front")
            ax.set_xlabel(label)
            ax.set_ylabel("final accuracy, ACC (%)")
            ax.set_title(f"{info['title']}, {info['settings'][setting]}\nmean over {_seeds_text(seeds)}")
            ax.legend(frameon=False, fontsize=6)
            paths += save_figure(fig, out, f"pareto_{name}_{setting}_{scenario}")
    return paths


def _pareto_front(cost: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Indices of runs not beaten by another with lower-or-equal cost and higher accuracy, by cost."""
    order = np.lexsort((-acc, cost))
    front, best = [], -np.inf
    for i in order:
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    return np.array(front, dtype=int)


def report(paths: Iterable[str | Path], out: str | Path) -> dict[str, list[Path]]:
    """Write every figure and table for the runs under ``paths`` into ``out``; returns what was written
    (``figures``, ``tables``) and ``dropped``: (run folder, reason) of each run left out, also printed to
    stderr as ``warning:`` lines and written to ``out/dropped_runs.csv``."""
    from cltoolbox.results import load

    paths = list(paths)  # read twice: the run tables and the time-to-target figure
    out = Path(out)
    paper_style()
    dropped: list[tuple[Path, str]] = []
    try:
        data = load(list(paths), dropped=dropped)
    finally:
        for run, why in dropped:
            print(f"warning: left out {run}: {why}", file=sys.stderr)
    written: dict[str, list[Any]] = {"figures": [], "tables": [], "dropped": dropped}
    out.mkdir(parents=True, exist_ok=True)
    if dropped:
        lines = ["run,reason"] + ['"{}","{}"'.format(str(r).replace('"', '""'), w.replace('"', '""'))
                                  for r, w in dropped]
        (out / "dropped_runs.csv").write_text("\n".join(lines) + "\n")
    infos = _infos(data["accuracy"])
    metrics = data["metrics"]
    for setting in ("class_il", "task_il"):
        keep = [sc for sc, info in infos.items() if setting in info["settings"]]
        if not keep:
            continue  # e.g. only domain-IL streams: task-IL is the same numbers
        table = summary_table(metrics[metrics.scenario.isin(keep)], setting)
        table.insert(1, "scenario_title", [f"{infos[sc]['title']} ({infos[sc]['settings'][setting]})"
                                           for sc in table.scenario])
        base = out / f"table_{setting}"
        table.to_csv(f"{base}.csv", index=False)
        Path(f"{base}.md").write_text(to_markdown(table, setting))
        kinds = sorted({infos[sc]["settings"][setting] for sc in keep})
        caption = f"{', '.join(kinds)} results (accuracies in %)."
        Path(f"{base}.tex").write_text(to_latex(table, caption=caption, setting=setting))
        written["tables"] += [Path(f"{base}{ext}") for ext in (".csv", ".md", ".tex")]
        written["figures"] += plot_heatmaps(data["accuracy"], setting, out, infos)
        written["figures"] += plot_curves(data["accuracy"], setting, out, infos)
        written["figures"] += plot_bars(metrics, setting, out, infos)
        written["figures"] += plot_pareto(metrics, setting, out, infos)
    from cltoolbox.time_to_target import plot_cost_curves  # runs with train.time_to_target: ACC vs cost

    written["figures"] += plot_cost_curves(paths, out)
    return written
