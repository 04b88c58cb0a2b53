"""Run experiments: resolve a config, then train and evaluate every strategy x seed into run folders.

The pieces live in their own modules: ``build`` (streams, models, plugins and the checks before any run),
``runfolder`` (locks, claims, DONE, resume checks) and ``session`` (one run: evaluate, checkpoint, resume).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from cltoolbox import config as cfgmod
from cltoolbox import distributed, progress
from cltoolbox.build import build_stream, check_buildable, load_raw
from cltoolbox.errors import CLToolboxError, ConfigError, DivergenceError, one_line
from cltoolbox.runfolder import (
    RunLock,
    check_existing,
    check_writable,
    claim,
    io_error,
    prune_empty,
    read_summary,
    record_failure,
    remove_temporaries,
    run_action,
    run_dir_for,
)
from cltoolbox.session import execute_run


def plan(resolved: dict, resume: bool, overwrite: bool) -> list[tuple[dict, int, Path, str]]:
    """(strategy, seed, run_dir, action) for every run; action is 'run', 'resume' or 'skip'.

    Refuses, before anything is trained, to touch a finished run without --overwrite, or to restart an
    unfinished one without --resume or --overwrite.
    """
    todo = []
    for strategy in resolved["strategy"]:
        for seed in resolved["seeds"]:
            d = run_dir_for(resolved, strategy, seed)
            todo.append((strategy, seed, d, run_action(d, resume, overwrite)))
    return todo


def run_in_folder(run_cfg: dict[str, Any], stream: Any, run_dir: Path, planned: str, overwrite: bool,
                  quiet: bool = True, stop: Path | None = None,
                  threads: int | None = None) -> tuple[str, dict[str, Any]]:
    """Run one planned run in its folder: take the lock, decide again (``claim``), train; returns (action,
    metrics.json's content). ``stream`` is the run's Stream or a function that makes it. Whatever happens,
    no temporary files are left, nor an empty folder below ``stop``. An unexpected exception is recorded in
    the folder (``record_failure``) and raised again. ``threads``: torch threads for a run that starts now
    (None: ``default_threads()``); a resumed run keeps the count it started with. Under several processes
    (``cltoolbox.distributed``) rank 0 alone takes the folder and writes it; the others follow its decision."""
    if not distributed.is_rank0():
        return distributed.follow_run(run_dir, lambda scratch, action: execute_run(
            run_cfg, stream() if callable(stream) else stream, scratch, resume=action == "resume", quiet=True,
            threads=threads))
    try:
        with RunLock(run_dir):
            try:
                action, recorded = claim(run_dir, planned, overwrite)
            except CLToolboxError as e:
                distributed.share(e)
                raise
            threads = recorded or threads
            if distributed.current() is not None:
                distributed.share(action)
                if action != "skip":
                    distributed.barrier()  # the other ranks have read the checkpoint
            if action == "skip":
                return action, read_summary(run_dir)
            try:
                summary = execute_run(run_cfg, stream() if callable(stream) else stream, run_dir,
                                      resume=action == "resume", quiet=quiet, threads=threads)
            except (CLToolboxError, OSError, KeyboardInterrupt):
                raise
            except Exception as e:
                record_failure(run_dir, e)
                raise
            return action, summary
    finally:
        try:
            remove_temporaries(run_dir)
            prune_empty(run_dir, stop)
        except OSError:
            pass


def run(
    config: dict[str, Any] | str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | None = None,
    seeds: list[int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run every strategy x seed of an experiment; returns one summary per run (metrics.json + run_dir).

    Everything is validated (config, data, streams, models, strategies) before the first run starts.
    ``threads``: torch threads per run (None: ``default_threads()``; a resumed run keeps its own).
    """
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {threads}")
    raw = load_raw(config, overrides, out, seeds)
    resolved = cfgmod.validate(raw)
    if distributed.env_world() > 1:  # started by --nproc or torchrun: join the group, refuse what cannot run
        for entry in resolved["strategy"]:
            distributed.check_strategy(entry)
        distributed.init_from_env(resolved["train"]["device"])
        quiet = quiet or not distributed.is_rank0()
    todo = plan(resolved, resume, overwrite)
    skipped = {run_dir: check_existing(run_dir, action, cfgmod.run_config(resolved, strategy, seed))
               for strategy, seed, run_dir, action in todo}  # skip or continue only what this config started

    from cltoolbox.data import load_dataset

    scen = resolved["scenario"]
    data = load_dataset(scen["dataset"], scen["root"], scen["download"])
    streams = {resolved["seeds"][0]: check_buildable(resolved, data)}
    stop = check_writable(resolved["out"]) if any(action != "skip" for *_, action in todo) and \
        distributed.is_rank0() else None
    distributed.barrier()  # every rank has planned before rank 0 writes

    results, failures, causes = [], [], []
    # a bar per run and one for the whole config (its ETA) on a terminal, else plain lines (cltoolbox.progress)
    n_left = sum(action != "skip" for *_, action in todo) * len(streams[resolved["seeds"][0]])
    with progress.session(n_left, quiet):
        for strategy, seed, run_dir, action in todo:
            if action == "skip":
                results.append({**skipped[run_dir], "run_dir": str(run_dir)})
                continue
            if seed not in streams:
                streams.clear()
                streams[seed] = build_stream(resolved, data, seed)
            run_cfg = cfgmod.run_config(resolved, strategy, seed)
            try:
                _, summary = run_in_folder(run_cfg, streams[seed], run_dir, action, overwrite, quiet=quiet, stop=stop,
                                           threads=threads)
            except OSError as e:  # a full disk or a folder gone read-only: the next runs would fail the same way
                raise io_error(e, run_dir) from e
            except CLToolboxError as e:  # diverged, locked by another process, a damaged checkpoint: the others go on
                failures.append(f"{run_dir}: {'diverged: ' if isinstance(e, DivergenceError) else ''}{e}")
                if not quiet:
                    print(f"error: {e}", file=sys.stderr)
                continue
            except Exception as e:  # noqa: BLE001 - a bug in a strategy: its traceback, then the next run
                import traceback

                traceback.print_exception(e, file=sys.stderr)  # a bug: its traceback belongs on the screen
                causes.append(e)
                failures.append(f"{run_dir}: failed with {one_line(e)} (traceback in {run_dir / 'error.log'})")
                continue
            results.append({**summary, "run_dir": str(run_dir)})
    if not quiet and results:
        print(format_table(results))
    if failures:  # from the first crash, if any: --debug and Python callers see its traceback
        raise CLToolboxError(f"{len(failures)} of {len(todo)} run(s) did not finish, kept without DONE; the first: "
                             f"{failures[0]}") from (causes[0] if causes else None)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """Mean ± std over seeds per strategy: class-IL ACC, forgetting, BWT, task-IL ACC, and ``wall s``: the mean
    of the runs' own wall time (``cost.wall_s``: training, evaluation and checkpoints, all attempts of a resumed
    run; not loading data or starting processes). A sweep's per-run lines print the same number as "run wall"."""
    import statistics as st

    from cltoolbox.tables import mean_std

    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["labels"]["strategy"], []).append(r)

    def ms(vals: list) -> str:
        return mean_std(vals, sep="±")

    w = max([16, *(len(name) + 2 for name in groups)])  # sweep labels (er-lr0.1-memory_size500) are long
    header = (f"{'strategy':<{w}}{'seeds':>6}  {'ACC (class-IL)':>15}{'forgetting':>15}{'BWT':>16}"
              f"{'ACC (task-IL)':>15}{'wall s':>9}")
    lines = [header, "-" * len(header)]
    for name, rs in groups.items():
        c = [r["class_il"] for r in rs]
        lines.append(
            f"{name:<{w}}{len(rs):>6}  {ms([x['acc'] for x in c]):>15}{ms([x['forgetting'] for x in c]):>15}"
            f"{ms([x['bwt'] for x in c]):>16}{ms([r['task_il']['acc'] for r in rs]):>15}"
            f"{st.mean(r['cost']['wall_s'] for r in rs):>9.1f}"
        )
    return "\n".join(lines)
