"""Search beyond grids: ``search: {method: random | tpe, trials: N}`` in a sweep or tuning YAML, on Optuna.

With ``search:`` the ``grid:`` mapping is the search space: a list is a set of choices, a mapping a range::

    search: {method: tpe, trials: 20, seed: 0}   # seed: the sampler's (default 0); batch: trials per round
    grid:
      train.lr: {low: 0.001, high: 0.5, log: true}   # float range (log-uniform); ints give an int range
      strategy.memory_size: [100, 200, 500]          # choices

Each strategy of the config gets its own study (a key applies to the strategies that have it, as in grids).
The search runs in rounds: every study proposes ``batch`` trials (1 by default), every trial runs on every
seed (in parallel, local workers or Ray, exactly as a sweep runs its runs), then each trial's objective goes
back to its study: the mean over seeds of ``select.metric`` (tune; a sweep reads ``search.metric`` and
``search.setting``, default final class-IL ACC). A diverged trial is a failed Optuna trial, never selected.
A trial whose values repeat an earlier trial of its study reuses that trial's runs.

Trials are deterministic: the samplers are seeded and a study only sees results of earlier rounds, in trial
order, and those come from run folders that are themselves deterministic per seed. So a killed search rerun
with ``--resume`` replays the same proposals: finished trials are read back from their run folders (each
checked against the config it was started with, like any resumed run), an interrupted run continues from
its checkpoint, and the search goes on with the same trials an uninterrupted search would have run. Trial
k of strategy ``er`` lands in ``<out>/<name>/er-t007/...``; ``<out>/<name>/search_trials.csv`` lists every
trial's values, objective and state (rewritten after each round).

Paper pointers: TPE is Bergstra et al., "Algorithms for Hyper-Parameter Optimization" (NeurIPS 2011), as
implemented by Optuna (Akiba et al., KDD 2019); random search is Bergstra & Bengio (JMLR 2012).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cltoolbox import config as cfgmod
from cltoolbox.errors import CLToolboxError, ConfigError
from cltoolbox.sweep import (
    GRID_SECTIONS,
    Point,
    available_cores,
    check_points,
    execute,
    make_point,
    plan_jobs,
    shared_pool,
)

METHODS = ("random", "tpe")
SEARCH_KEYS = ("method", "trials", "seed", "batch", "metric", "setting")
RANGE_KEYS = ("low", "high", "log", "type")


@dataclass
class Dim:
    """One search dimension: choices (a list) or a range (float or int, optionally log-scaled)."""

    key: str
    choices: list[Any] | None = None
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False

    def distribution(self) -> Any:
        import optuna

        if self.choices is not None:  # indices: Optuna's choices must be scalars, ours may be lists
            return optuna.distributions.CategoricalDistribution(list(range(len(self.choices))))
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log)

    def value(self, raw: Any) -> Any:
        return copy.deepcopy(self.choices[raw]) if self.choices is not None else raw

    def corners(self) -> list[Any]:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass
class Spec:
    method: str
    trials: int
    seed: int = 0
    batch: int = 1
    metric: str = "acc"
    setting: str = "class_il"
    dims: list[Dim] = field(default_factory=list)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_search(spec: Any, grid: Any) -> Spec:
    """``search:`` and its space (``grid:``) checked; one-line ConfigError naming the field otherwise."""
    from cltoolbox.tuning import SELECT_METRICS, SETTINGS

    if not isinstance(spec, dict):
        raise ConfigError(f"search: expected a mapping like {{method: tpe, trials: 20}}, got {spec!r}")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("search: needs optuna; pip install 'cltoolbox[search]' (or optuna), or drop `search:` "
                          "for a full grid") from None
    for key in spec:
        if key not in SEARCH_KEYS:
            raise ConfigError(f"search.{key}: unknown key; use {', '.join(SEARCH_KEYS)}")
    method = spec.get("method")
    if method not in METHODS:
        raise ConfigError(f"search.method: {method!r} is not a search method; use one of: {', '.join(METHODS)} "
                          "(or drop `search:` for a full grid)")
    trials = spec.get("trials")
    if not _int(trials) or trials < 1:
        raise ConfigError(f"search.trials: expected an integer >= 1 (trials per strategy), got {trials!r}")
    seed, batch = spec.get("seed", 0), spec.get("batch", 1)
    if not _int(seed) or seed < 0:
        raise ConfigError(f"search.seed: expected an integer >= 0 (the sampler's seed), got {seed!r}")
    if not _int(batch) or batch < 1:
        raise ConfigError(f"search.batch: expected an integer >= 1 (trials per strategy and round), got {batch!r}")
    metric, setting = spec.get("metric", "acc"), spec.get("setting", "class_il")
    if metric not in SELECT_METRICS:
        raise ConfigError(f"search.metric: unknown metric {metric!r}; use one of: {', '.join(SELECT_METRICS)}")
    if setting not in SETTINGS:
        raise ConfigError(f"search.setting: unknown setting {setting!r}; use one of: {', '.join(SETTINGS)}")
    return Spec(method, trials, seed, batch, metric, setting, check_space(grid))


def check_space(grid: Any) -> list[Dim]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("grid: a search needs its space under `grid:`, e.g. `grid: {train.lr: {low: 0.001, "
                          "high: 0.5, log: true}}` or lists of choices")
    dims = []
    for key, values in grid.items():
        parts = str(key).split(".")
        where = f"grid.{key}"
        if len(parts) < 2 or parts[0] not in GRID_SECTIONS or not all(parts):
            raise ConfigError(f"{where}: expected a dotted key in one of the sections {', '.join(GRID_SECTIONS)}, "
                              "e.g. train.lr or strategy.memory_size")
        if parts[0] == "strategy" and (len(parts) != 2 or parts[1] in ("name", "label", "plugins")):
            raise ConfigError(f"{where}: only a strategy's own parameters can be searched (e.g. "
                              "strategy.memory_size)")
        if isinstance(values, list):
            if not values:
                raise ConfigError(f"{where}: the list of choices is empty; give at least one value")
            canon = [json.dumps(v, sort_keys=True, default=str) for v in values]
            if len(set(canon)) != len(canon):
                raise ConfigError(f"{where}: a choice is listed twice; list each value once")
            dims.append(Dim(str(key), choices=list(values)))
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a list of choices or a range {{low: ..., high: ..., log: false}}, "
                              f"got {values!r}")
        unknown = [k for k in values if k not in RANGE_KEYS]
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown range key; use {', '.join(RANGE_KEYS)}")
        low, high, log, kind = values.get("low"), values.get("high"), values.get("log", False), values.get("type")
        for name, v in (("low", low), ("high", high)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ConfigError(f"{where}.{name}: expected a finite number, got {v!r}")
        if not low < high:
            raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
        if not isinstance(log, bool):
            raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
        if log and low <= 0:
            raise ConfigError(f"{where}.low: a log range needs low > 0, got {low}")
        if kind not in (None, "int", "float"):
            raise ConfigError(f"{where}.type: {kind!r}; use int or float")
        integer = kind == "int" or (kind is None and _int(low) and _int(high))
        if integer and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: an int range needs integer low and high")
        dims.append(Dim(str(key), low=low, high=high, log=log, integer=integer))
    # sampled in key order: the trials do not depend on how the YAML orders the space (safe_dump sorts it)
    return sorted(dims, key=lambda d: d.key)


def _base_entries(raw: dict[str, Any]) -> list[dict[str, Any]]:
    entries = raw["strategy"] if isinstance(raw["strategy"], list) else [raw["strategy"]]
    return [{"name": e} if isinstance(e, str) else copy.deepcopy(e) for e in entries]


class Search:
    """The studies of one search (one per strategy) over a validated sweep config (``grid`` and ``search``
    popped). ``corner_points`` are the configs checked before anything runs."""

    def __init__(self, raw: dict[str, Any], spec: Spec) -> None:
        from cltoolbox.registry import STRATEGIES

        self.raw, self.spec = raw, spec
        base = cfgmod.validate(raw)  # the base config's errors read exactly as for `cltoolbox run`
        self.entries = _base_entries(raw)
        self.bases = [s["label"] for s in base["strategy"]]
        self.dims: dict[str, list[Dim]] = {}
        used = set()
        for label, strat in zip(self.bases, base["strategy"], strict=True):
            params = STRATEGIES.get(strat["name"]).params
            self.dims[label] = [d for d in spec.dims if not d.key.startswith("strategy.")
                                or d.key.split(".", 1)[1] in params]
            used.update(d.key for d in self.dims[label] if d.key.startswith("strategy."))
        unused = [d.key for d in spec.dims if d.key.startswith("strategy.") and d.key not in used]
        if unused:
            raise ConfigError(f"grid.{unused[0]}: none of the strategies ({', '.join(self.bases)}) has a parameter "
                              f"'{unused[0].split('.', 1)[1]}'; remove it or check `cltoolbox list strategies`")
        self.width = max(3, len(str(spec.trials - 1)))
        self.root = Path(base["out"]) / base["name"]

    def label(self, base: str, k: int) -> str:
        return f"{base}-t{k:0{self.width}d}"

    def corner_points(self) -> list[Point]:
        """Each dimension at each end (each choice), the others at their first end: every value kind a trial
        can take is validated, and its stream, plugins and model built, before the first run."""
        points = []
        for entry, base in zip(self.entries, self.bases, strict=True):
            dims = self.dims[base]
            first = {d.key: d.corners()[0] for d in dims}
            seen = set()
            for d in dims or [None]:
                for v in d.corners() if d is not None else [None]:
                    values = dict(first, **({d.key: v} if d is not None else {}))
                    key = json.dumps(values, sort_keys=True, default=str)
                    if key in seen:
                        continue
                    seen.add(key)
                    points.append(make_point(self.raw, entry, base, f"{base}-check", values, kind="search"))
        return points

    def studies(self) -> dict[str, Any]:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from cltoolbox.tuning import SELECT_METRICS

        direction = "maximize" if SELECT_METRICS[self.spec.metric] else "minimize"
        out = {}
        for i, base in enumerate(self.bases):
            seed = self.spec.seed + i  # each strategy's own stream of proposals
            sampler = (optuna.samplers.TPESampler(seed=seed) if self.spec.method == "tpe"
                       else optuna.samplers.RandomSampler(seed=seed))
            out[base] = optuna.create_study(direction=direction, sampler=sampler)
        return out


def run_search(raw: dict[str, Any], spec: Spec, backend: str = "local", workers: int | None = None,
               threads: int | None = None, resume: bool = False, overwrite: bool = False, quiet: bool = False,
               debug: bool = False, metric: str | None = None, setting: str | None = None
               ) -> tuple[list[Point], list[dict[str, Any]], Path]:
    """Run a search; returns (every trial's point, every run's record, the trials CSV). ``metric`` and
    ``setting`` override the spec's objective (tune's ``select:``)."""
    from cltoolbox.runfolder import check_writable

    metric, setting = metric or spec.metric, setting or spec.setting
    search = Search(raw, spec)
    check_points(search.corner_points())
    studies = search.studies()
    stop = check_writable(str(search.root.parent))
    ray_started = False
    if backend == "ray":  # one Ray instance for every round (each round's execute joins it)
        from cltoolbox.sweep import ray_connect, require_ray

        ray = require_ray()
        ray_started = ray_connect(workers or available_cores())
    try:
        # local workers: one pool for every round (a pool per round restarted its processes 20 times)
        with shared_pool(workers or available_cores()) if backend == "local" else contextlib.nullcontext():
            return _rounds(raw, spec, search, studies, stop, metric, setting, backend, workers, threads, resume,
                           overwrite, quiet, debug)
    finally:
        if ray_started:
            ray.shutdown()


def _rounds(raw: dict[str, Any], spec: Spec, search: Search, studies: dict[str, Any], stop: Path, metric: str,
            setting: str, backend: str, workers: int | None, threads: int | None, resume: bool, overwrite: bool,
            quiet: bool, debug: bool) -> tuple[list[Point], list[dict[str, Any]], Path]:
    from optuna.trial import TrialState

    from cltoolbox.tuning import score as score_of

    dists = {base: {d.key: d.distribution() for d in search.dims[base]} for base in search.bases}
    entries = dict(zip(search.bases, search.entries, strict=True))
    points: list[Point] = []
    records: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    seen: dict[str, dict[str, tuple[Point, list[dict]]]] = {b: {} for b in search.bases}
    n_rounds = -(-spec.trials // spec.batch)
    csv_path = search.root / "search_trials.csv"
    for rnd in range(n_rounds):
        asked = []  # (base, trial, point, reused records or None)
        for base in search.bases:
            for _ in range(min(spec.batch, spec.trials - rnd * spec.batch)):
                trial = studies[base].ask(dists[base])
                values = {d.key: d.value(trial.params[d.key]) for d in search.dims[base]}
                key = json.dumps(values, sort_keys=True, default=str)
                if key in seen[base]:
                    asked.append((base, trial, *seen[base][key]))
                    continue
                pt = make_point(raw, entries[base], base, search.label(base, trial.number), values, kind="search")
                asked.append((base, trial, pt, None))
        new = [pt for _, _, pt, reuse in asked if reuse is None]
        jobs = plan_jobs(new, resume, overwrite)
        if not quiet:
            print(f"search round {rnd + 1}/{n_rounds}: trials "
                  + ", ".join(f"{pt.label}" for pt in new), file=sys.stderr, flush=True)
        recs = execute(jobs, backend, workers, overwrite=overwrite, threads=threads, quiet=quiet, debug=debug,
                       stop=stop) if jobs else []
        broken = [r for r in recs if r["status"] in ("failed", "locked")]
        if broken:
            raise CLToolboxError(f"search: {len(broken)} run(s) did not finish ({broken[0]['run_dir']}: "
                                 f"{broken[0]['message']}); rerun with --resume")
        records += recs
        by_label: dict[str, list[dict]] = {}
        for r in recs:
            by_label.setdefault(r["label"], []).append(r)
        for base, trial, pt, reuse in asked:  # told in trial order: the same history on every replay
            mine = reuse if reuse is not None else by_label.get(pt.label, [])
            score = score_of(mine, metric, setting)
            if reuse is None:
                points.append(pt)
                seen[base][json.dumps(pt.values, sort_keys=True, default=str)] = (pt, mine)
            if score["status"] == "done":
                studies[base].tell(trial, score["mean"])
            else:
                studies[base].tell(trial, state=TrialState.FAIL)
            rows.append({"strategy": base, "trial": trial.number, "point": search.label(base, trial.number),
                         "same_as": pt.label if reuse is not None else "",
                         **{f"value:{k}": json.dumps(v) for k, v in pt.values.items()},
                         f"{metric}_mean": score["mean"], "seeds": score["n_seeds"], "state": score["status"]})
        _write_rows(csv_path, rows)
    return points, records, csv_path


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    from cltoolbox.results import atomic_write_text

    keys = list(dict.fromkeys(k for r in rows for k in r))
    values = [k for k in keys if k.startswith("value:")]
    fields = [k for k in keys if k in ("strategy", "trial", "point", "same_as")] + values + \
        [k for k in keys if k not in values and k not in ("strategy", "trial", "point", "same_as")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())


def split_raw(raw: dict[str, Any]) -> tuple[dict[str, Any], Spec | None]:
    """(the config without ``search``/``grid``, the checked search spec) or (raw, None) for a plain grid."""
    if raw.get("search") is None:
        return raw, None
    raw = copy.deepcopy(raw)
    spec = check_search(raw.pop("search"), raw.pop("grid", None))
    return raw, spec


def sweep_search(raw: dict[str, Any], spec: Spec, dry_run: bool = False, **kw: Any) -> list[dict[str, Any]]:
    """``cltoolbox sweep`` with ``search:``: returns the summaries of every finished run (as ``sweep``)."""
    from cltoolbox.sweep import finish

    if dry_run:
        search = Search(raw, spec)
        check_points(search.corner_points())
        for base in search.bases:
            dims = ", ".join(d.key for d in search.dims[base]) or "(nothing to search)"
            print(f"{base}: {spec.method} search, {spec.trials} trials x {len(raw.get('seeds') or [0])} seed(s) "
                  f"over {dims}; runs in {search.root}/{search.label(base, 0)} ...")
        return []
    _, records, csv_path = run_search(raw, spec, **kw)
    if not kw.get("quiet"):
        print(f"search trials: {csv_path}", file=sys.stderr, flush=True)
    return finish(records, kw.get("quiet", False))
