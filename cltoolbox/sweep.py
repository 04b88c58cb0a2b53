"""Sweeps: strategies x grid points x seeds from one YAML, run by parallel local processes or on Ray.

A sweep YAML is an experiment config (the keys of ``cltoolbox run``) plus an optional ``grid:`` mapping of
dotted keys to lists of values::

    grid:
      train.lr: [0.01, 0.1]              # train.*, model.*, scenario.*: applies to every strategy
      strategy.memory_size: [100, 500]   # strategy.*: applies to the strategies that have this parameter

Every strategy x grid point (the product of the values that apply to it) x seed is one run folder. A grid
point's label is the strategy label followed by ``-<key><value>`` for each swept key that applies (the key's
last part), e.g. ``er-lr0.1-memory_size500``, and it takes the place of the strategy label in the usual
layout: ``<out>/<name>/er-lr0.1-memory_size500/<scenario>-<dataset>/seed_<s>/``. ``cltoolbox report`` then
shows each grid point as one row.

Every grid point's config is validated (and its stream, plugins and model built once) before any run
starts. Runs go to worker processes (``spawn``; each runs 1 torch thread unless --threads) or to Ray
tasks. Each worker takes the run folder's lock; a locked folder (another process is writing it) is skipped
with a message. With ``resume`` finished runs are skipped and unfinished ones continue from their checkpoint
(or start again when they have none); a finished run is replaced only with ``overwrite``.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cltoolbox import config as cfgmod
from cltoolbox.errors import CLToolboxError, ConfigError, DivergenceError, RunExistsError, RunLockedError

GRID_SECTIONS = ("scenario", "model", "strategy", "train")
BACKENDS = ("local", "ray")


@dataclass
class Point:
    """One strategy at one grid point: a validated config with exactly one strategy."""

    label: str  # the run folder's strategy label: base label + grid suffix
    base_label: str  # the strategy's own label
    values: dict[str, Any]  # dotted grid key -> value, for the keys that apply to this strategy
    resolved: dict[str, Any]

    @property
    def strategy(self) -> dict[str, Any]:
        return self.resolved["strategy"][0]


@dataclass
class Job:
    point: Point
    seed: int
    run_dir: Path
    action: str  # run | resume | skip
    run_cfg: dict[str, Any]
    summary: dict[str, Any] | None = None  # a finished run's metrics.json (action skip)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- grid expansion ---------------------------------------------------------------------------------------


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _fmt(value: Any) -> str:
    """A value as a folder-safe label part: 0.1 -> '0.1', [100, 100] -> '100x100', None -> 'none'."""
    if isinstance(value, bool) or value is None:
        text = str(value).lower()
    elif isinstance(value, (list, tuple)):
        text = "x".join(_fmt(v) for v in value)
    elif isinstance(value, dict):
        text = "_".join(f"{k}{_fmt(v)}" for k, v in value.items())
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def _check_grid(grid: Any) -> dict[str, list]:
    if not isinstance(grid, dict):
        raise ConfigError("grid: expected a mapping of dotted keys to value lists, "
                          "e.g. `grid: {train.lr: [0.01, 0.1]}`")
    for key, values in grid.items():
        parts = str(key).split(".")
        if len(parts) < 2 or parts[0] not in GRID_SECTIONS or not all(parts):
            raise ConfigError(f"grid.{key}: expected a dotted key in one of the sections {', '.join(GRID_SECTIONS)}, "
                              "e.g. train.lr or strategy.memory_size (seeds come from `seeds:`)")
        if parts[0] == "strategy" and (len(parts) != 2 or parts[1] in ("name", "label", "plugins")):
            raise ConfigError(f"grid.{key}: only a strategy's own parameters can be swept (e.g. strategy.memory_size); "
                              "list other strategies under `strategy:` instead")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values, e.g. `{key}: [0.01, 0.1]`, "
                              f"got {values!r}")
        canon = [_canon(v) for v in values]
        dup = next((v for v, c in zip(values, canon, strict=True) if canon.count(c) > 1), None)
        if dup is not None:
            raise ConfigError(f"grid.{key}: the value {dup!r} is listed twice; list each value once")
    return grid


def _short_names(keys: list[str]) -> dict[str, str]:
    """Label names of grid keys: the last part, or the whole key (dots as _) where last parts collide."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "_")) for k, s in zip(keys, last, strict=True)}


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    """``config[a][b][c] = value`` for ``a.b.c``, creating missing sections."""
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"grid.{dotted}: '{part}' is a value, not a section; vary a key inside a mapping")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def make_point(raw: dict[str, Any], entry: dict[str, Any], base_label: str, label: str,
               values: dict[str, Any], kind: str = "grid") -> Point:
    """A validated one-strategy config: ``raw`` with its strategy ``entry`` under ``label`` and ``values``
    (dotted keys; ``strategy.*`` go to the entry) applied; a bad value names the ``kind`` point."""
    point_raw = copy.deepcopy(raw)
    point_raw["strategy"] = dict(copy.deepcopy(entry), label=label)
    for k, v in values.items():
        if k.startswith("strategy."):
            point_raw["strategy"][k.split(".", 1)[1]] = copy.deepcopy(v)
        else:
            set_dotted(point_raw, k, v)
    try:
        resolved = cfgmod.validate(point_raw)
    except ConfigError as e:
        shown = "" if kind == "grid" else " (" + ", ".join(f"{k}={v}" for k, v in values.items()) + ")"
        raise ConfigError(f"{kind} point '{label}'{shown}: {e}") from None
    return Point(label, base_label, dict(values), resolved)


def expand(raw: dict[str, Any]) -> list[Point]:
    """Every strategy x grid point of a sweep config, each validated; raises ConfigError (naming the grid
    point) for the first bad value anywhere."""
    from cltoolbox.registry import STRATEGIES

    raw = copy.deepcopy(raw)
    grid = _check_grid(raw.pop("grid", None) or {})
    base = cfgmod.validate(raw)  # errors of the base config read exactly as for `cltoolbox run`
    entries = raw["strategy"] if isinstance(raw["strategy"], list) else [raw["strategy"]]
    entries = [{"name": e} if isinstance(e, str) else e for e in entries]  # `strategy: [naive, er]`
    short = _short_names(list(grid))
    used: set[str] = set()
    points: list[Point] = []
    for entry, strat in zip(entries, base["strategy"], strict=True):
        params = STRATEGIES.get(strat["name"]).params
        keys = [k for k in grid if not k.startswith("strategy.") or k.split(".", 1)[1] in params]
        used.update(k for k in keys if k.startswith("strategy."))
        for combo in itertools.product(*(grid[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            label = strat["label"] + "".join(f"-{short[k]}{_fmt(v)}" for k, v in values.items())
            points.append(make_point(raw, entry, strat["label"], label, values))
    unused = [k for k in grid if k.startswith("strategy.") and k not in used]
    if unused:
        names = ", ".join(s["name"] for s in base["strategy"])
        raise ConfigError(f"grid.{unused[0]}: none of the strategies ({names}) has a parameter "
                          f"'{unused[0].split('.', 1)[1]}'; remove it or check `cltoolbox list strategies`")
    labels = [p.label for p in points]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise ConfigError(f"grid: two runs would share the folder label '{dup}'; give a strategy a distinct `label:`")
    return points


def check_points(points: list[Point]) -> None:
    """Build every distinct stream (first seed), every strategy's plugins and every model (on the meta
    device), so that no bad generator, strategy or model parameter is found after runs have started."""
    from cltoolbox.build import build_stream, check_model, check_plugins
    from cltoolbox.data import load_dataset

    data, streams, models = {}, {}, set()
    for pt in points:
        r = pt.resolved
        try:
            scen = r["scenario"]
            dkey = (scen["dataset"], scen["root"], scen["download"])
            if dkey not in data:
                data[dkey] = load_dataset(*dkey)
            skey = (_canon(scen), r["seeds"][0])
            if skey not in streams:
                streams[skey] = build_stream(r, data[dkey], r["seeds"][0])
            check_plugins(pt.strategy)
            mkey = (_canon(r["model"]), skey)
            if mkey not in models:
                check_model(r, streams[skey])
                models.add(mkey)
        except ConfigError as e:
            if not pt.values:
                raise
            raise ConfigError(f"grid point '{pt.label}': {e}") from None


# -- planning ---------------------------------------------------------------------------------------------


def plan_jobs(points: list[Point], resume: bool, overwrite: bool) -> list[Job]:
    """One job per point x seed with its action ('run', 'resume' or 'skip'); refuses (RunExistsError), before
    anything runs, to touch existing runs without --resume or --overwrite."""
    from cltoolbox.runfolder import check_existing, run_action, run_dir_for

    jobs = []
    for pt in points:
        for seed in pt.resolved["seeds"]:
            d = run_dir_for(pt.resolved, pt.strategy, seed)
            action = run_action(d, resume, overwrite)
            run_cfg = cfgmod.run_config(pt.resolved, pt.strategy, seed)
            jobs.append(Job(pt, seed, d, action, run_cfg, check_existing(d, action, run_cfg)))
    return jobs


# -- one run, in whatever process executes it -------------------------------------------------------------

_DATA: dict[tuple, Any] = {}
_STREAM: dict[tuple, Any] = {}


def _stream_for(run_cfg: dict[str, Any]):
    from cltoolbox.build import build_stream
    from cltoolbox.data import load_dataset

    scen = run_cfg["scenario"]
    dkey = (scen["dataset"], scen["root"], scen["download"])
    if dkey not in _DATA:
        _DATA.clear()  # one dataset at a time per worker
        _DATA[dkey] = load_dataset(*dkey)
    skey = (_canon(scen), run_cfg["seed"])
    if skey not in _STREAM:
        _STREAM.clear()
        _STREAM[skey] = build_stream(run_cfg, _DATA[dkey], run_cfg["seed"])
    return _STREAM[skey]


_WARM: list[bool] = []


def _warm_up() -> None:
    """Pay a worker process's one-off costs before the first run's clock starts, so that a run's wall time
    does not depend on whether it came first in its worker: the built-in plugins are imported, the first
    optimizer of a process imports torch._dynamo (seconds), the first backward starts autograd."""
    if _WARM:
        return
    from cltoolbox.registry import MODELS, STRATEGIES
    from cltoolbox.session import warm_up

    STRATEGIES.names(), MODELS.names()  # import the built-in plugins
    warm_up()
    _WARM.append(True)


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Execute one planned run in this process (a local worker, a Ray task or the caller itself).

    Returns a record: status (done | skipped | locked | diverged | failed), action taken, message, summary.
    """
    import torch

    from cltoolbox.registry import import_plugins
    from cltoolbox.runner import run_in_folder

    if spec.get("cache"):
        os.environ.setdefault("CLTOOLBOX_CACHE", spec["cache"])
    threads = torch.get_num_threads()
    torch.set_num_threads(spec["threads"])
    run_cfg, run_dir = spec["run_cfg"], Path(spec["run_dir"])
    rec: dict[str, Any] = {"run_dir": str(run_dir), "label": run_cfg["strategy"]["label"], "seed": run_cfg["seed"],
                           "action": spec["action"], "status": "failed", "message": "", "summary": None}
    start = time.perf_counter()
    try:
        import_plugins(run_cfg.get("imports") or [])
        _warm_up()
        action, summary = run_in_folder(run_cfg, lambda: _stream_for(run_cfg), run_dir, spec["action"],
                                        spec["overwrite"], stop=Path(spec["stop"]) if spec.get("stop") else None,
                                        threads=spec["threads"])
        rec.update(action=action, summary=summary)
        if action == "skip":
            rec.update(status="skipped", message="finished meanwhile by another process")
        else:
            resumed = json.loads((run_dir / "env.json").read_text()).get("resumed_at_experience")
            rec.update(status="done", resumed_at=resumed)
    except DivergenceError as e:
        rec.update(status="diverged", message=str(e))
    except RunExistsError as e:  # the lock (another process is writing this run), or a damaged checkpoint
        locked = isinstance(e, RunLockedError)
        rec.update(status="locked" if locked else "failed", action="skip" if locked else rec["action"],
                   message=str(e))
    except OSError as e:  # a full disk: every other run would fail the same way, the parent stops the sweep
        rec.update(status="io_error", message=f"{e.strerror or type(e).__name__}"
                   + (f" ({e.filename})" if e.filename else ""))
    except Exception as e:  # a crash in one run (e.g. a plugin bug) must not take the other runs down
        rec.update(status="failed", message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    finally:
        torch.set_num_threads(threads)
        rec["seconds"] = time.perf_counter() - start
    return rec


# -- backends ---------------------------------------------------------------------------------------------


def require_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray: ray is not installed; `pip install 'cltoolbox[ray]'` (or `pip install ray`), "
                          "or use --backend local") from None
    return ray


def ray_connect(workers: int) -> bool:
    """Join a running Ray cluster (RAY_ADDRESS, or one started with `ray start`), else start a local instance
    with ``workers`` CPUs. Returns True when this call started Ray (and so must shut it down)."""
    import logging

    ray = require_ray()
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    opts = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        ray.init(address=address or "auto", **opts)
        return False
    except ConnectionError:
        if address:
            raise CLToolboxError(f"--backend ray: cannot reach the Ray cluster at RAY_ADDRESS={address}; start it "
                                 "(`ray start --head`) or unset RAY_ADDRESS to use a local instance") from None
    ray.init(num_cpus=workers, include_dashboard=False, **opts)
    return True


PARENT_POLL_S = 0.5


def _init_worker(parent: int) -> None:
    """A local worker: Ctrl-C goes to the whole process group and only the parent handles it (it stops the
    workers), so that a worker does not carry on with its next run after an interrupted one; and a worker
    whose parent is gone (kill -9) exits at once instead of running what was queued to it and then idling.
    Its run's finished experiences are checkpointed and its stale lock is taken over by the next --resume."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="cltoolbox-parent-watch", daemon=True).start()


def _new_pool(workers: int) -> Any:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(),))


_SHARED_POOLS: list[Any] = []  # opened by shared_pool(), used by every _run_local inside it


class shared_pool:
    """``with shared_pool(workers):`` one local worker pool for every ``execute`` inside: a search runs many small
    rounds, and a pool per round would start ``workers`` processes (torch import, data load) every time."""

    def __init__(self, workers: int) -> None:
        self.pool = _new_pool(workers) if workers > 1 else None

    def __enter__(self) -> shared_pool:
        if self.pool is not None:
            _SHARED_POOLS.append(self.pool)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None and self.pool in _SHARED_POOLS:  # (a failed round already stopped it)
            _SHARED_POOLS.remove(self.pool)
            self.pool.shutdown(wait=True)


def _run_local(specs: list[dict], workers: int, on_result) -> None:
    if workers == 1 or len(specs) == 1:  # no pool: saves a process start (torch import) per worker
        for spec in specs:
            on_result(run_job(spec))
        return
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    shared = _SHARED_POOLS[-1] if _SHARED_POOLS else None
    pool = shared or _new_pool(min(workers, len(specs)))
    try:
        futures = [pool.submit(run_job, spec) for spec in specs]
        for fut in as_completed(futures):
            on_result(fut.result())
    except BrokenProcessPool:
        if shared is not None:
            _SHARED_POOLS.remove(shared)
        raise CLToolboxError("sweep: a worker process died (killed, or out of memory); finished experiences are "
                             "checkpointed: rerun with --resume") from None
    except BaseException:
        # Ctrl-C or an error here: stop the workers now, as a kill would; every finished experience is
        # checkpointed and a stale lock (its writer gone) is taken over by the next --resume.
        if shared is not None:
            _SHARED_POOLS.remove(shared)
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for proc in procs:
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)  # the pool sees its workers gone and closes its queues
        raise
    if shared is None:
        pool.shutdown(wait=True)


def _run_ray(specs: list[dict], workers: int, limit: int | None, on_result, gpus_per_run: float = 0.0) -> None:
    ray = require_ray()
    started = ray_connect(workers)
    if gpus_per_run > 0:
        have = ray.cluster_resources().get("GPU", 0)
        if have < gpus_per_run:  # Ray would keep such tasks pending forever
            if started:
                ray.shutdown()
            raise ConfigError(f"--gpus-per-run: {gpus_per_run} GPU(s) per run, but the Ray cluster has {have:g}; "
                              "use 0 here or join a cluster with GPUs (RAY_ADDRESS)")
    # Ray gives each task its GPUs through CUDA_VISIBLE_DEVICES: train.device auto/cuda is the task's own GPU
    task = ray.remote(num_cpus=1, num_gpus=gpus_per_run, max_retries=0)(run_job)
    pending, inflight = list(specs), {}
    limit = limit or len(specs)
    try:
        while pending or inflight:
            while pending and len(inflight) < limit:
                spec = pending.pop(0)
                inflight[task.remote(spec)] = spec
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                spec = inflight.pop(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker process died
                    rec = {"run_dir": spec["run_dir"], "label": spec["run_cfg"]["strategy"]["label"],
                           "seed": spec["run_cfg"]["seed"], "action": spec["action"], "status": "failed",
                           "message": f"Ray task failed: {str(e).splitlines()[0]}", "summary": None}
                on_result(rec)
    except BaseException:
        for ref in inflight:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


def execute(jobs: list[Job], backend: str = "local", workers: int | None = None, overwrite: bool = False,
            threads: int | None = None, quiet: bool = False, debug: bool = False,
            stop: Path | None = None, gpus_per_run: float = 0.0) -> list[dict[str, Any]]:
    """Run the planned jobs; returns one record per job (skipped ones included), in plan order. ``stop``: the
    folder below which a run that failed before writing anything leaves no empty folders (check_writable).
    ``gpus_per_run``: GPUs Ray reserves for each run (fractions share a GPU; Ray backend only)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: unknown backend '{backend}'; use one of: {', '.join(BACKENDS)}")
    explicit = workers is not None
    workers = available_cores() if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {workers}")
    records: dict[str, dict] = {}
    for job in jobs:
        if job.action == "skip":
            summary = job.summary
            records[str(job.run_dir)] = {"run_dir": str(job.run_dir), "label": job.point.label, "seed": job.seed,
                                         "action": "skip", "status": "skipped", "message": "finished",
                                         "summary": summary}
    todo = [j for j in jobs if j.action != "skip"]
    if threads is None:  # the same default as `cltoolbox run` (1; session.default_threads): parallelism comes
        # from the workers, and a busy machine does not make spin-waiting threads 6x slower; a fixed count (not
        # one from the cores or the runs left) also keeps results identical to `run`'s and a resume exact
        from cltoolbox.session import default_threads

        threads = default_threads()
    if threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {threads}")
    cache = os.environ.get("CLTOOLBOX_CACHE")
    specs = [{"run_cfg": j.run_cfg, "run_dir": str(j.run_dir), "action": j.action, "overwrite": overwrite,
              "threads": threads, "cache": cache, "stop": str(stop) if stop else None} for j in todo]
    where = f"{min(workers, len(todo)) if todo else 0} local worker(s)" if backend == "local" else "Ray"
    n_resume = sum(j.action == "resume" for j in todo)
    if not quiet:
        print(f"sweep: {len(jobs)} runs: {len(todo) - n_resume} to run, {n_resume} to resume, "
              f"{len(jobs) - len(todo)} finished (skipped); on {where}", file=sys.stderr, flush=True)
    count = [0]
    from cltoolbox.progress import sweep_line

    started = time.perf_counter()

    def on_result(rec: dict) -> None:
        records[rec["run_dir"]] = rec
        count[0] += 1
        status = rec["status"]
        if status == "io_error":  # stops the sweep (the workers are terminated): the next runs would fail too
            raise CLToolboxError(f"{rec['run_dir']}: {rec['message']} while writing the run folder; free space or "
                                 "choose another --out, then rerun with --resume")
        if status in ("locked", "diverged", "failed"):
            kind = "warning" if status == "locked" else "error"
            what = "skipped, " if status == "locked" else ""
            print(f"{kind}: {rec['run_dir']}: {what}{rec['message']}", file=sys.stderr, flush=True)
            if debug and rec.get("traceback"):
                print(rec["traceback"], file=sys.stderr, flush=True)
        elif not quiet:
            acc = (rec["summary"] or {}).get("class_il", {}).get("acc")
            how = {"resume": f"resumed at experience {rec.get('resumed_at')}", "restart": "restarted (no checkpoint)",
                   "run": "ran", "skip": "skipped"}.get(rec["action"], rec["action"])
            acc_text = f", class-IL ACC {acc:.3f}" if isinstance(acc, float) else ""
            # two clocks, each named: the run's own wall time (cost.wall_s, what the summary table averages)
            # and the worker's, which adds loading the data, building the stream and taking the lock
            wall = ((rec["summary"] or {}).get("cost") or {}).get("wall_s")
            clocks = (f"run wall {wall:.1f} s, {rec['seconds']:.1f} s in the worker" if isinstance(wall, float)
                      else f"{rec['seconds']:.1f} s in the worker")
            print(f"[{count[0]:>{len(str(len(todo)))}}/{len(todo)}] {rec['label']} seed {rec['seed']}: {how} "
                  f"({clocks}){acc_text}; {sweep_line(count[0], len(todo), started)}", file=sys.stderr, flush=True)

    if todo:
        if backend == "local":
            _run_local(specs, workers, on_result)
        else:
            _run_ray(specs, workers, workers if explicit else None, on_result, gpus_per_run)
    return [records[str(j.run_dir)] for j in jobs]


# -- the command ------------------------------------------------------------------------------------------


def prepare(config: dict[str, Any] | str | Path, overrides: list[str] | tuple[str, ...] = (),
            out: str | None = None, seeds: list[int] | None = None) -> dict[str, Any]:
    """The raw sweep config with user plugins imported and ``out`` made absolute (workers may run elsewhere)."""
    from cltoolbox.build import load_raw

    raw = load_raw(config, overrides, out, seeds)
    if isinstance(raw.get("out", "runs"), str):
        raw["out"] = os.path.abspath(raw.get("out", "runs"))
    return raw


def format_plan(jobs: list[Job]) -> str:
    lines = [f"{'action':<8}{'seed':>5}  run folder"]
    lines += [f"{j.action:<8}{j.seed:>5}  {j.run_dir}" for j in jobs]
    return "\n".join(lines)


def sweep(
    config: dict[str, Any] | str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | None = None,
    seeds: list[int] | None = None,
    backend: str = "local",
    workers: int | None = None,
    threads: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    dry_run: bool = False,
    debug: bool = False,
    gpus_per_run: float = 0.0,
) -> list[dict[str, Any]]:
    """Run every strategy x grid point x seed of a sweep YAML; returns one summary (metrics.json + run_dir)
    per finished run. Raises CLToolboxError after the sweep if any run diverged or failed (the others are
    kept), and before anything runs for any invalid config, grid value, backend or existing run.
    ``gpus_per_run`` (Ray backend): GPUs reserved for each run, e.g. 1, or 0.5 for two runs per GPU."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: unknown backend '{backend}'; use one of: {', '.join(BACKENDS)}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {workers}")
    check_gpus_per_run(gpus_per_run, backend)
    if backend == "ray":
        require_ray()
    raw = prepare(config, overrides, out, seeds)
    from cltoolbox.search import split_raw, sweep_search

    raw, search = split_raw(raw)
    if search is not None:  # `search: {method: random | tpe, trials: N}`: Optuna proposes the points
        if gpus_per_run:
            raise ConfigError("--gpus-per-run: not supported with `search:` yet; run a grid sweep, or set "
                              "train.device per run and use 0")
        return sweep_search(raw, search, dry_run=dry_run, backend=backend, workers=workers, threads=threads,
                            resume=resume, overwrite=overwrite, quiet=quiet, debug=debug)
    points = expand(raw)
    check_points(points)
    jobs = plan_jobs(points, resume, overwrite)
    if dry_run:
        print(format_plan(jobs))
        return []
    from cltoolbox.runfolder import check_writable

    stop = check_writable(points[0].resolved["out"]) if any(j.action != "skip" for j in jobs) else None
    records = execute(jobs, backend, workers, overwrite=overwrite, threads=threads, quiet=quiet, debug=debug,
                      stop=stop, gpus_per_run=gpus_per_run)
    return finish(records, quiet)


def check_gpus_per_run(gpus: float, backend: str) -> None:
    """--gpus-per-run: >= 0, Ray only; without a cluster address, only what this machine's CUDA devices hold."""
    if not gpus >= 0 or gpus != gpus:
        raise ConfigError(f"--gpus-per-run: must be >= 0 (e.g. 1, or 0.5 for two runs per GPU), got {gpus}")
    if gpus == 0:
        return
    if backend != "ray":
        raise ConfigError("--gpus-per-run: needs --backend ray (local workers all see every GPU; give each run "
                          "train.device: cuda:N instead)")
    import torch

    if not os.environ.get("RAY_ADDRESS") and not torch.cuda.is_available():
        raise ConfigError(f"--gpus-per-run: {gpus:g} requested but this machine has no CUDA device; use 0 (or join "
                          "a GPU cluster with RAY_ADDRESS)")


def finish(records: list[dict[str, Any]], quiet: bool) -> list[dict[str, Any]]:
    """Print the table of finished runs; raise for runs that diverged or failed."""
    from cltoolbox.runner import format_table

    results = [{**r["summary"], "run_dir": r["run_dir"]} for r in records if r["status"] in ("done", "skipped")]
    if not quiet and results:
        print(format_table(results))
    bad = [r for r in records if r["status"] in ("diverged", "failed")]
    if bad:
        raise CLToolboxError(f"{len(bad)} of {len(records)} runs did not finish ({bad[0]['run_dir']}: "
                             f"{bad[0]['message']}); what they measured is kept without DONE, rerun with --resume")
    return results
