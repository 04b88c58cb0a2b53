"""Two-phase hyperparameter tuning (``cltoolbox tune TUNING.yaml``).

The protocol of Cha & Cho, "Hyperparameters in Continual Learning: A Reality Check" (arXiv:2403.09066):
tuning hyperparameters on the very scenario that is then reported overestimates what a CL algorithm can do,
so the evaluation has two phases that share the scenario configuration but not the data:

1. tuning phase: every grid point of every strategy runs on the tuning scenario (e.g. another dataset or
   another class split); per strategy the point with the best final class-IL ACC, averaged over the tuning
   seeds, is selected (``select:`` can name another metric or setting);
2. evaluation phase: each strategy's selected hyperparameters are applied, unchanged, to the evaluation
   scenario, and that result is the one to report.

A tuning YAML is a sweep YAML (``cltoolbox.sweep``: base config + ``grid:``) whose ``scenario`` is the tuning
scenario, plus::

    evaluation:                # what changes for the evaluation phase (merged into the base config)
      scenario: {dataset: mnist5k}          # required: another dataset or class split
      seeds: [0, 1, 2]                      # optional
    select: {metric: acc, setting: class_il}  # optional (the default)

Runs land in ``<out>/<name>/tuning/<point label>/...`` and ``<out>/<name>/evaluation/<point label>/...``;
the report (``<out>/<name>/tuning_report.csv`` and ``.md``) shows per strategy the grid results of the
tuning phase, the selected point and its evaluation-phase result. A grid point whose run diverged is never
selected. ``--resume`` continues both phases (finished runs are skipped; the selection is recomputed from
them and so is the same).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from cltoolbox.config import check_folder_name
from cltoolbox.errors import CLToolboxError, ConfigError
from cltoolbox.sweep import (
    Point,
    check_gpus_per_run,
    check_points,
    execute,
    expand,
    format_plan,
    plan_jobs,
    prepare,
    require_ray,
)
from cltoolbox.tables import METRICS, SETTING_NAMES, format_mean_std

EVALUATION_KEYS = ("scenario", "seeds")
SELECT_METRICS = {k: m.higher_is_better for k, m in METRICS.items()}  # metric -> higher is better
SETTINGS = tuple(SETTING_NAMES)  # the settings a selection may read
PAPER = 'Cha & Cho, "Hyperparameters in Continual Learning: A Reality Check" (arXiv:2403.09066)'


def _merge(base: dict, change: dict) -> dict:
    """``change`` deep-merged into ``base``: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _parse(raw: dict[str, Any]) -> tuple[dict, dict, dict[str, Any]]:
    """Split a tuning config into the tuning-phase and evaluation-phase sweep configs and the selection."""
    raw = copy.deepcopy(raw)
    evaluation = raw.pop("evaluation", None)
    select = raw.pop("select", None) or {}
    if evaluation is not None and not isinstance(evaluation, dict):
        raise ConfigError(f"evaluation: expected a mapping like {{scenario: {{dataset: mnist5k}}}}, got {evaluation!r}")
    if not evaluation:
        raise ConfigError("evaluation: missing; add e.g. `evaluation: {scenario: {dataset: mnist5k}}` (the scenario "
                          "on which the selected hyperparameters are evaluated)")
    for key in evaluation:
        if key not in EVALUATION_KEYS:
            raise ConfigError(f"evaluation.{key}: only {' and '.join(EVALUATION_KEYS)} may differ in the evaluation "
                              "phase (the selected hyperparameters are applied unchanged); remove it")
    if "scenario" not in evaluation or not isinstance(evaluation["scenario"], dict):
        raise ConfigError("evaluation.scenario: missing; give the evaluation scenario's changes as a mapping, e.g. "
                          "`scenario: {dataset: mnist5k}` or `scenario: {class_order: seeded}`")
    if not isinstance(select, dict):
        raise ConfigError(f"select: expected a mapping like {{metric: acc, setting: class_il}}, got {select!r}")
    for key in select:
        if key not in ("metric", "setting"):
            raise ConfigError(f"select.{key}: unknown key; use metric and setting")
    metric, setting = select.get("metric", "acc"), select.get("setting", "class_il")
    if not isinstance(metric, str) or metric not in SELECT_METRICS:
        raise ConfigError(f"select.metric: unknown metric {metric!r}; use one of: {', '.join(SELECT_METRICS)}")
    if not isinstance(setting, str) or setting not in SETTINGS:
        raise ConfigError(f"select.setting: unknown setting {setting!r}; use one of: {', '.join(SETTINGS)}")
    name = raw.get("name")
    if name is None:
        raise ConfigError("name: missing; add a folder-safe name, e.g. `name: tuning_mnist5k` (both phases land "
                          "under <out>/<name>/)")
    check_folder_name(name, "name")
    if not isinstance(raw.get("out", "runs"), str):
        raise ConfigError(f"out: expected a folder path string, got {raw['out']!r}")
    root = Path(raw.get("out", "runs")) / name
    tuning = {**raw, "name": "tuning", "out": str(root)}
    evaluation_cfg = _merge({**raw, "name": "evaluation", "out": str(root)}, evaluation)
    return tuning, evaluation_cfg, {"metric": metric, "setting": setting, "root": root, "name": name}


def score(records: list[dict], metric: str, setting: str) -> dict[str, Any]:
    """Mean ± std of ``metric`` over a point's seeds, and the point's status (every seed must be done)."""
    done = [r for r in records if r["status"] in ("done", "skipped")]
    vals = [r["summary"][setting].get(metric) for r in done]
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    forg = [r["summary"][setting].get("forgetting") for r in done]
    forg = [v for v in forg if isinstance(v, (int, float)) and math.isfinite(v)]
    status = "done" if len(done) == len(records) and len(vals) == len(records) else \
        next((r["status"] for r in records if r["status"] not in ("done", "skipped")), "undefined")
    return {
        "n_seeds": len(done),
        "mean": statistics.mean(vals) if vals else math.nan,
        "std": statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else math.nan),
        "forgetting_mean": statistics.mean(forg) if forg else math.nan,
        "status": status,
    }


def _select(points: list[Point], scores: dict[str, dict], higher: bool) -> dict[str, Point]:
    """Per strategy, the point with the best mean score among those whose every seed finished (grid order
    breaks ties)."""
    chosen: dict[str, Point] = {}
    for pt in points:
        s = scores[pt.label]
        if s["status"] != "done":
            continue
        best = chosen.get(pt.base_label)
        if best is None or (s["mean"] > scores[best.label]["mean"] if higher
                            else s["mean"] < scores[best.label]["mean"]):
            chosen[pt.base_label] = pt
    return chosen


def _params_text(pt: Point) -> str:
    return ", ".join(f"{k}={v}" for k, v in pt.values.items()) or "(defaults)"


def _pct(mean: float, std: float | None = None) -> str:
    return format_mean_std(mean, std, digits=1, scale=100)


def write_report(root: Path, t_points: list[Point], e_points: dict[str, Point], t_scores: dict[str, dict],
                 e_scores: dict[str, dict], chosen: dict[str, Point], sel: dict, phases: dict) -> list[Path]:
    """tuning_report.csv (one row per phase x point) and tuning_report.md (summary + grid tables)."""
    metric, setting = sel["metric"], sel["setting"]
    keys = list(dict.fromkeys(k for pt in t_points for k in pt.values))
    rows = []
    for phase, pts, scores in (("tuning", t_points, t_scores),
                               ("evaluation", [e_points[c.label] for c in chosen.values()], e_scores)):
        for pt in pts:
            s = scores[pt.label]
            rows.append({
                "strategy": pt.base_label, "phase": phase, "point": pt.label,
                **{k: pt.values.get(k, "") for k in keys},
                "scenario": phases[phase]["scenario"], "seeds": s["n_seeds"], "status": s["status"],
                f"{metric}_mean": s["mean"], f"{metric}_std": s["std"], "forgetting_mean": s["forgetting_mean"],
                "selected": chosen.get(pt.base_label) is not None and chosen[pt.base_label].label == pt.label,
            })
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    root.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = root / "tuning_report.csv", root / "tuning_report.md"
    csv_path.write_text(buf.getvalue())

    m = f"{METRICS[metric].name if metric in METRICS else metric} ({SETTING_NAMES.get(setting, setting)})"
    t, e = phases["tuning"], phases["evaluation"]
    lines = [
        f"# Two-phase tuning: {sel['name']}", "",
        f"Protocol of {PAPER}: hyperparameters selected on the tuning scenario by the final {m} averaged over "
        "seeds, then applied unchanged to the evaluation scenario. Accuracies in %, mean ± std over seeds.", "",
        f"- tuning phase: `{t['scenario']}`, seeds {t['seeds']}, {len(t_points)} grid points",
        f"- evaluation phase: `{e['scenario']}`, seeds {e['seeds']}", "",
        "## Selected hyperparameters and their evaluation", "",
        f"| Strategy | Selected | Tuning {m} | Evaluation {m} | Evaluation forgetting |",
        "|---|---|---|---|---|",
    ]
    for base, pt in chosen.items():
        ts, es = t_scores[pt.label], e_scores[e_points[pt.label].label]
        lines.append(f"| {base} | {_params_text(pt)} | {_pct(ts['mean'], ts['std'])} | {_pct(es['mean'], es['std'])}"
                     f" | {_pct(es['forgetting_mean'])} |")
    lines += ["", "## Tuning phase: every grid point", "",
              "| Strategy | Point | " + " | ".join(keys) + f" | {m} | Forgetting | Seeds | Status |",
              "|---|---|" + "---|" * len(keys) + "---|---|---|---|"]
    for pt in t_points:
        s = t_scores[pt.label]
        sel_mark = chosen.get(pt.base_label) is not None and chosen[pt.base_label].label == pt.label
        cells = [pt.base_label, f"**{pt.label}** (selected)" if sel_mark else pt.label,
                 *(str(pt.values.get(k, "–")) for k in keys), _pct(s["mean"], s["std"]),
                 _pct(s["forgetting_mean"]), str(s["n_seeds"]), s["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def tune(
    config: dict[str, Any] | str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | None = None,
    backend: str = "local",
    workers: int | None = None,
    threads: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    debug: bool = False,
    seeds: list[int] | None = None,
    dry_run: bool = False,
    gpus_per_run: float = 0.0,
) -> dict[str, Any]:
    """Run both phases; returns {'selected': {strategy: point label}, 'tuning': records, 'evaluation': records,
    'report': [csv, md]}. Everything, the evaluation phase of every grid point included, is validated before
    the first run starts. ``seeds`` replaces the seeds of both phases (``evaluation.seeds`` included);
    ``dry_run`` validates and prints both phases' runs, running nothing (empty records); ``gpus_per_run`` as
    for ``sweep`` (Ray backend)."""
    from cltoolbox.runfolder import check_writable, scenario_label

    check_gpus_per_run(gpus_per_run, backend)
    if backend == "ray":
        require_ray()
    raw = prepare(config, overrides, out, seeds)
    if seeds is not None and isinstance(raw.get("evaluation"), dict) and "seeds" in raw["evaluation"]:
        raw["evaluation"]["seeds"] = list(seeds)  # the command line wins over the file, in both phases
    tuning_raw, eval_raw, sel = _parse(raw)
    from cltoolbox.search import Search, run_search, split_raw
    from cltoolbox.sweep import make_point

    tuning_raw, search = split_raw(tuning_raw)  # `search:` (Optuna) instead of the full grid
    eval_raw, _ = split_raw(eval_raw)
    if search is not None and gpus_per_run:
        raise ConfigError("--gpus-per-run: not supported with `search:` yet; use a grid, or set train.device per "
                          "run and use 0")
    # a search's trials are proposed as it goes: both phases are checked at the space's corners
    t_points = expand(tuning_raw) if search is None else Search(tuning_raw, search).corner_points()
    try:
        e_list = expand(eval_raw) if search is None else Search(eval_raw, search).corner_points()
    except ConfigError as e:
        raise ConfigError(f"evaluation phase: {e}") from None
    if t_points[0].resolved["scenario"] == e_list[0].resolved["scenario"]:
        raise ConfigError("evaluation.scenario: the evaluation scenario equals the tuning scenario; evaluate on "
                          "another dataset or class split (e.g. `scenario: {class_order: seeded}`)")
    check_points(t_points)
    try:
        check_points(e_list)
    except ConfigError as e:
        raise ConfigError(f"evaluation phase: {e}") from None
    if search is None:
        e_points = {t.label: e for t, e in zip(t_points, e_list, strict=True)}  # same grid, same order
        t_jobs = plan_jobs(t_points, resume, overwrite)
        e_jobs = plan_jobs(e_list, resume, overwrite)  # refuse existing runs now, not after the tuning phase
    if dry_run:
        if search is None:
            _print_plan(t_points, t_jobs, e_jobs)
        else:
            n_seeds = len(tuning_raw.get("seeds") or [0])
            print(f"tuning phase: {search.method} search, {search.trials} trials x {n_seeds} seed(s) per strategy; "
                  "evaluation phase: the selected trial of each strategy")
        return {"selected": {}, "tuning": [], "evaluation": [], "report": []}
    stop = check_writable(str(sel["root"].parent))

    t_scen, e_scen = t_points[0].resolved["scenario"], e_list[0].resolved["scenario"]
    changed = ", ".join(f"{k}: {v}" for k, v in e_scen.items() if t_scen.get(k) != v)
    phases = {"tuning": {"scenario": scenario_label(t_scen), "seeds": t_points[0].resolved["seeds"]},
              "evaluation": {"scenario": f"{scenario_label(e_scen)} ({changed})", "seeds": e_list[0].resolved["seeds"]}}
    if not quiet:
        what = f"{len(t_points)} grid points" if search is None else \
            f"{search.method} search, {search.trials} trials per strategy"
        print(f"tuning phase: {what} on {phases['tuning']['scenario']}", file=sys.stderr, flush=True)
    if search is None:
        t_records = execute(t_jobs, backend, workers, overwrite=overwrite, threads=threads, quiet=quiet,
                            debug=debug, stop=stop, gpus_per_run=gpus_per_run)
    else:
        t_points, t_records, _ = run_search(tuning_raw, search, backend, workers, threads, resume, overwrite,
                                            quiet, debug, metric=sel["metric"], setting=sel["setting"])
        e_search = Search(eval_raw, search)
        e_entries = dict(zip(e_search.bases, e_search.entries, strict=True))
        e_points = {pt.label: make_point(eval_raw, e_entries[pt.base_label], pt.base_label, pt.label, pt.values,
                                           kind="search")
                    for pt in t_points}
        e_jobs = plan_jobs(list(e_points.values()), resume, overwrite)
    _raise_broken(t_records, "tuning")
    t_scores = _scores(t_points, t_records, sel)
    chosen = _select(t_points, t_scores, SELECT_METRICS[sel["metric"]])
    missing = [p.base_label for p in t_points if p.base_label not in chosen]
    if missing:
        raise CLToolboxError(f"tuning phase: every grid point of '{missing[0]}' diverged or has an undefined "
                             f"{sel['metric']}; widen its grid (e.g. smaller train.lr) and rerun with --resume")
    selected_labels = {e_points[c.label].label for c in chosen.values()}
    if not quiet:
        for base, pt in chosen.items():
            print(f"selected for {base}: {_params_text(pt)} ({sel['metric']} {t_scores[pt.label]['mean']:.4f})",
                  file=sys.stderr, flush=True)
        print(f"evaluation phase: {len(chosen)} strategies on {phases['evaluation']['scenario']}", file=sys.stderr,
              flush=True)
    e_run = [j for j in e_jobs if j.point.label in selected_labels]
    e_records = execute(e_run, backend, workers, overwrite=overwrite, threads=threads, quiet=quiet, debug=debug,
                        stop=stop, gpus_per_run=gpus_per_run)
    e_scores = _scores([e_points[c.label] for c in chosen.values()], e_records, sel)
    paths = write_report(sel["root"], t_points, e_points, t_scores, e_scores, chosen, sel, phases)
    _raise_broken(e_records, "evaluation")
    bad = [r for r in e_records if r["status"] == "diverged"]
    if bad:
        raise CLToolboxError(f"evaluation phase: {bad[0]['run_dir']} diverged with the selected hyperparameters "
                             f"({bad[0]['message']}); the report shows it")
    return {"selected": {b: p.label for b, p in chosen.items()}, "tuning": t_records, "evaluation": e_records,
            "report": paths}


def _print_plan(t_points: list[Point], t_jobs: list, e_jobs: list) -> None:
    """--dry-run of a grid: the tuning phase's runs, then the evaluation runs of which one point per strategy (the
    one selected) will run."""
    n_bases = len({p.base_label for p in t_points})
    print(f"tuning phase: {len(t_points)} grid points\n{format_plan(t_jobs)}")
    print(f"evaluation phase: the selected grid point of each of the {n_bases} strategies, among\n"
          f"{format_plan(e_jobs)}")


def _scores(points: list[Point], records: list[dict], sel: dict) -> dict[str, dict]:
    by_label: dict[str, list[dict]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    return {p.label: score(by_label.get(p.label, []), sel["metric"], sel["setting"]) for p in points}


def _raise_broken(records: list[dict], phase: str) -> None:
    """Diverged grid points are a result (never selected); a crash or a locked run leaves the phase unfinished."""
    bad = [r for r in records if r["status"] in ("failed", "locked")]
    if bad:
        raise CLToolboxError(f"{phase} phase: {len(bad)} run(s) did not finish ({bad[0]['run_dir']}: "
                             f"{bad[0]['message']}); rerun with --resume")
