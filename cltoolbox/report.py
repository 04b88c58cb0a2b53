"""Figures and tables for papers from run folders (``cltoolbox report RUN_DIR... --out DIR``).

Seeds are aggregated as mean ± sample std. Figures use one style sized for a single column (3.4 in wide),
saved as PNG (300 dpi) and vector PDF. Tables are written as CSV, Markdown and LaTeX (booktabs) with the
best value per column in bold; :func:`summary_table` returns the same table as a DataFrame.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

COLUMN_WIDTH_IN = 3.4
SETTING_NAMES = {"class_il": "class-IL", "task_il": "task-IL"}
# metric -> (label, higher is better)
TABLE_METRICS: dict[str, tuple[str, bool]] = {
    "acc": ("ACC", True),
    "aia": ("AIA", True),
    "forgetting": ("Forgetting", False),
    "bwt": ("BWT", True),
    "fwt": ("FWT", True),
}
COST_METRICS: dict[str, tuple[str, bool]] = {"wall_s": ("Time (s)", False), "memory_items": ("Memory", False)}


def _style() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
        "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False,
        "figure.dpi": 100, "savefig.bbox": "tight", "pdf.fonttype": 42, "lines.linewidth": 1.2,
    })


def _save(fig: Any, out: Path, name: str) -> list[Path]:
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=300)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def summary_table(metrics: Any, setting: str = "class_il") -> Any:
    """One row per (scenario, strategy): n_seeds and mean/std of each metric and cost."""
    import pandas as pd

    m = metrics[metrics.setting == setting]
    cols = [c for c in (*TABLE_METRICS, *COST_METRICS) if c in m.columns]
    rows = []
    for (scenario, strategy), g in m.groupby(["scenario", "strategy"], sort=False):
        row: dict[str, Any] = {"scenario": scenario, "strategy": strategy, "n_seeds": len(g)}
        for c in cols:
            vals = pd.to_numeric(g[c], errors="coerce").dropna()
            row[f"{c}_mean"] = vals.mean() if len(vals) else np.nan
            row[f"{c}_std"] = vals.std(ddof=1) if len(vals) > 1 else (0.0 if len(vals) else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def mean_std(values: Iterable[float], digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± sample std' of per-seed values (std 0 for a single value), as the tables print them."""
    import statistics

    v = [float(x) * scale for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}"


def _formatted(table: Any, bold: tuple[str, str], percent: bool = True) -> list[list[str]]:
    """Cells 'mean ± std' per metric, the best mean per scenario and column wrapped in ``bold``."""
    metrics = {**TABLE_METRICS, **COST_METRICS}
    cols = [c for c in metrics if f"{c}_mean" in table.columns]
    best: dict[tuple[str, str], float] = {}
    for scenario, g in table.groupby("scenario", sort=False):
        for c in cols:
            vals = g[f"{c}_mean"].dropna()
            if len(vals):
                best[(scenario, c)] = vals.max() if metrics[c][1] else vals.min()
    out = []
    for r in table.itertuples(index=False):
        r = r._asdict()
        cells = [r["scenario"], r["strategy"], str(r["n_seeds"])]
        for c in cols:
            mean, std = r[f"{c}_mean"], r[f"{c}_std"]
            if mean != mean:
                cells.append("n/a")
                continue
            scale = 100.0 if percent and c in TABLE_METRICS else 1.0
            digits = 1 if scale == 100.0 or c == "wall_s" else 0
            text = f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
            if np.isclose(mean, best.get((r["scenario"], c), np.nan)):
                text = f"{bold[0]}{text}{bold[1]}"
            cells.append(text)
        out.append(cells)
    return out


def table_headers(table: Any) -> list[str]:
    metrics = {**TABLE_METRICS, **COST_METRICS}
    return ["Scenario", "Strategy", "Seeds"] + [metrics[c][0] for c in metrics if f"{c}_mean" in table.columns]


def to_markdown(table: Any) -> str:
    head = table_headers(table)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _formatted(table, ("**", "**"))]
    return "\n".join(lines) + "\n"


def to_latex(table: Any, caption: str = "") -> str:
    def esc(s: str) -> str:
        return s.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    head = table_headers(table)
    rows = _formatted(table, (r"\textbf{", "}"))
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{ll" + "r" * (len(head) - 2) + "}",
             r"\toprule", " & ".join(esc(h) for h in head) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(c).replace("±", r"$\pm$") for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(r"\caption{" + esc(caption).replace("±", r"$\pm$") + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def mean_matrices(accuracy: Any, setting: str) -> dict[tuple[str, str], np.ndarray]:
    """Seed-averaged (T+1) x T accuracy matrix per (scenario, strategy)."""
    out = {}
    a = accuracy[accuracy.setting == setting]
    for (scenario, strategy), g in a.groupby(["scenario", "strategy"], sort=False):
        m = g.groupby(["trained_exp", "eval_exp"]).accuracy.mean().unstack("eval_exp")
        out[(scenario, strategy)] = m.to_numpy()
    return out


def seen_accuracy_curves(accuracy: Any, setting: str) -> Any:
    """Average accuracy over the experiences seen so far after each experience, one row per run."""
    a = accuracy[(accuracy.setting == setting) & accuracy.seen]
    return a.groupby(["scenario", "strategy", "seed", "trained_exp"], sort=False).accuracy.mean().reset_index()


def _ticks(n: int, most: int = 12) -> list[int]:
    """Every index up to ``most`` of them, else about ``most`` evenly spaced ones including the first and last."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def plot_heatmaps(accuracy: Any, setting: str, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    mats = mean_matrices(accuracy, setting)
    for scenario in dict.fromkeys(s for s, _ in mats):
        items = [(st, m) for (sc, st), m in mats.items() if sc == scenario]
        cols = min(3, len(items))
        rows = (len(items) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(COLUMN_WIDTH_IN * 2 if cols > 1 else COLUMN_WIDTH_IN,
                                                      2.2 * rows + 0.3), squeeze=False, layout="constrained")
        for k, (ax, (strategy, m)) in enumerate(zip(axes.flat, items, strict=False)):
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
            n_rows, T = m.shape  # rows: init + training experiences (more than T on online/recurring streams)
            ax.set_title(strategy)
            ax.set_xlabel("evaluated experience")
            if k % cols == 0:
                ax.set_ylabel("trained up to")
            ax.set_xticks(_ticks(T))
            rows = _ticks(n_rows)
            ax.set_yticks(rows, ["init" if r == 0 else str(r - 1) for r in rows])
            if n_rows <= 11 and T <= 10:  # numbers only while they stay legible
                for i in range(n_rows):
                    for j in range(T):
                        if m[i, j] == m[i, j]:
                            ax.text(j, i, f"{m[i, j] * 100:.0f}", ha="center", va="center", fontsize=5,
                                    color="white" if m[i, j] < 0.6 else "black")
        for ax in list(axes.flat)[len(items):]:
            ax.axis("off")
        fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
        fig.suptitle(f"{scenario} ({SETTING_NAMES[setting]})", fontsize=8)
        paths += _save(fig, out, f"heatmap_{setting}_{scenario}")
    return paths


def plot_curves(accuracy: Any, setting: str, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    curves = seen_accuracy_curves(accuracy, setting)
    for scenario, g in curves.groupby("scenario", sort=False):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.3), layout="constrained")
        for strategy, s in g.groupby("strategy", sort=False):
            stats = s.groupby("trained_exp").accuracy.agg(["mean", "std", "count"])
            x = stats.index.to_numpy() + 1
            std = stats["std"].fillna(0).to_numpy()
            ax.plot(x, stats["mean"], marker="o" if len(x) <= 30 else None, markersize=2.5, label=strategy)
            ax.fill_between(x, stats["mean"] - std, stats["mean"] + std, alpha=0.2)
        ax.set_xlabel("experiences trained")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel("avg. accuracy on seen exp.")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{scenario} ({SETTING_NAMES[setting]}), mean ± std over seeds")
        ax.legend(frameon=False, ncol=2)
        paths += _save(fig, out, f"curve_{setting}_{scenario}")
    return paths


def plot_bars(metrics: Any, setting: str, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    m = metrics[metrics.setting == setting]
    for scenario, g in m.groupby("scenario", sort=False):
        stats = g.groupby("strategy", sort=False)[["forgetting", "bwt"]].agg(["mean", "std"])
        fig, axes = plt.subplots(1, 2, figsize=(COLUMN_WIDTH_IN, 2.2), layout="constrained")
        for ax, key, label in zip(axes, ("forgetting", "bwt"), ("forgetting", "BWT"), strict=True):
            ax.bar(range(len(stats)), stats[(key, "mean")], yerr=stats[(key, "std")].fillna(0), capsize=2,
                   color="C0" if key == "forgetting" else "C1")
            ax.set_xticks(range(len(stats)), stats.index, rotation=45, ha="right")
            ax.set_title(label)
            ax.axhline(0, color="black", linewidth=0.5)
        fig.suptitle(f"{scenario} ({SETTING_NAMES[setting]})", fontsize=8)
        paths += _save(fig, out, f"forgetting_{setting}_{scenario}")
    return paths


def plot_pareto(metrics: Any, setting: str, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    m = metrics[metrics.setting == setting]
    for cost, label, name in (("memory_bytes", "stored memory (MB)", "memory"), ("wall_s", "wall time (s)", "time")):
        for scenario, g in m.groupby("scenario", sort=False):
            stats = g.groupby("strategy", sort=False)[["acc", cost]].mean()
            x = stats[cost] / (2**20 if cost == "memory_bytes" else 1)
            fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.3), layout="constrained")
            ax.scatter(x, stats["acc"], s=14, zorder=3)
            for strategy, xi, yi in zip(stats.index, x, stats["acc"], strict=True):
                ax.annotate(strategy, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
            front = _pareto_front(x.to_numpy(), stats["acc"].to_numpy())
            ax.plot(x.to_numpy()[front], stats["acc"].to_numpy()[front], color="C3", linewidth=0.8, marker="o",
                    markersize=7, markerfacecolor="none", label="Pareto front")
            ax.set_xlabel(label)
            ax.set_ylabel("final accuracy (ACC)")
            ax.set_title(f"{scenario} ({SETTING_NAMES[setting]})")
            ax.legend(frameon=False)
            paths += _save(fig, out, f"pareto_{name}_{setting}_{scenario}")
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
    """Write every figure and table for the runs under ``paths`` into ``out``; returns what was written."""
    from cltoolbox.results import load

    out = Path(out)
    _style()
    data = load(list(paths))
    written: dict[str, list[Path]] = {"figures": [], "tables": []}
    for setting in ("class_il", "task_il"):
        table = summary_table(data["metrics"], setting)
        base = out / f"table_{setting}"
        base.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(f"{base}.csv", index=False)
        Path(f"{base}.md").write_text(to_markdown(table))
        Path(f"{base}.tex").write_text(to_latex(table, caption=f"{SETTING_NAMES[setting]} results, mean ± std "
                                                                f"over seeds (accuracies in %)."))
        written["tables"] += [Path(f"{base}{ext}") for ext in (".csv", ".md", ".tex")]
        written["figures"] += plot_heatmaps(data["accuracy"], setting, out)
        written["figures"] += plot_curves(data["accuracy"], setting, out)
        written["figures"] += plot_bars(data["metrics"], setting, out)
        written["figures"] += plot_pareto(data["metrics"], setting, out)
    return written
