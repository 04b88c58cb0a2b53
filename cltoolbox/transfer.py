"""Task-transfer matrices: how much training on task i first changes the accuracy reached on task j.

For the tasks of a config's scenario (its experiences; the distinct tasks ``stream.eval_experiences`` for
recurring streams), every strategy and seed gets

    T[i, j] = acc_j(model trained on i, then on j) - acc_j(model trained on j alone),

both runs starting from the same initialisation (the run's seed), with the config's model, training
settings and strategy (plain fine-tuning for ``naive``). Positive entries: i transfers to j; negative:
i interferes with learning j. The diagonal is undefined (NaN). Accuracies are those of the evaluator
(``class_il`` and ``task_il``), on j's test set right after training on j.

Each (strategy, seed) writes a run-style folder
``<out>/<name>/transfer/<strategy label>/<scenario>-<dataset>/seed_<s>/``::

    config.yaml                 the resolved config of this run
    env.json                    python, torch, cltoolbox, device, threads, start/end time, argv, status
    accuracy.csv                first_task (-1 = trained alone), second_task, setting, accuracy
    matrices/transfer_<setting>.csv   K x K, header ``first_task,task_0,...``; empty cell = NaN
    transfer.json               tasks, alone accuracies, matrices, mean off-diagonal transfer, cost
    transfer.png, transfer.pdf  heatmaps (class-IL and task-IL)
    DONE                        written last

With several seeds, ``transfer_mean_<setting>.csv`` and ``transfer_mean.png/pdf`` (mean over seeds) go
one level up. Every file is written atomically. Cost: K^2 single-task trainings per strategy and seed
(K first-task runs, each continued on the K-1 other tasks).
"""

from __future__ import annotations

import copy
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cltoolbox import config as cfgmod
from cltoolbox.errors import CLToolboxError, RunExistsError
from cltoolbox.evaluate import SETTINGS, History, evaluate_stream
from cltoolbox.loop import Learner, resolve_device
from cltoolbox.results import atomic_write_text, is_done, write_csv, write_json
from cltoolbox.stream import Experience, Stream
from cltoolbox.tables import mean_std

ACCURACY_FIELDS = ["first_task", "second_task", "setting", "accuracy"]


def transfer(
    config: dict[str, Any] | str | Path,
    out: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    seeds: list[int] | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    plot: bool = True,
) -> list[dict[str, Any]]:
    """Compute the task-transfer matrix of every strategy x seed of an experiment config.

    ``config`` is a YAML path or a dict (as for ``cltoolbox.run``); ``out`` replaces the config's ``out``,
    ``seeds`` its seeds, ``overrides`` are ``key.sub=value`` strings. A finished folder is never replaced
    without ``overwrite`` (RunExistsError). Returns one summary per run (transfer.json's content plus
    ``run_dir``); prints a table unless ``quiet``. ``plot=False`` skips the heatmaps (PNG/PDF).
    """
    from cltoolbox.build import build_stream, check_model, check_plugins, load_raw
    from cltoolbox.data import load_dataset
    from cltoolbox.runfolder import (
        RunLock,
        check_writable,
        clear_run_dir,
        prune_empty,
        record_failure,
        remove_temporaries,
        scenario_label,
    )

    raw = load_raw(config if isinstance(config, (str, Path)) else copy.deepcopy(dict(config)), overrides, out, seeds)
    resolved = cfgmod.validate(raw)
    root = Path(resolved["out"]) / resolved["name"] / "transfer"
    todo = []
    for strategy in resolved["strategy"]:
        for seed in resolved["seeds"]:
            d = root / strategy["label"] / scenario_label(resolved["scenario"]) / f"seed_{seed}"
            if d.exists() and any(d.iterdir()) and not overwrite:
                state = "a finished" if is_done(d) else "an unfinished"
                raise RunExistsError(f"{d}: {state} transfer run is there; pass overwrite (--overwrite) to replace "
                                     "it, or another out (--out DIR)")
            todo.append((strategy, seed, d))

    scen = resolved["scenario"]
    data = load_dataset(scen["dataset"], scen["root"], scen["download"])
    streams = {resolved["seeds"][0]: build_stream(resolved, data, resolved["seeds"][0])}
    for strategy in resolved["strategy"]:  # fail early on bad parameters, before anything trains
        check_plugins(strategy)
    check_model(resolved, streams[resolved["seeds"][0]])
    stop = check_writable(resolved["out"])

    results: list[dict[str, Any]] = []
    failures: list[tuple[Path, BaseException]] = []
    for strategy, seed, run_dir in todo:
        if seed not in streams:
            streams.clear()
            streams[seed] = build_stream(resolved, data, seed)
        run_cfg = cfgmod.run_config(resolved, strategy, seed)
        try:
            with RunLock(run_dir):  # decided again under the lock: another process may have finished it since
                if is_done(run_dir) and not overwrite:
                    raise RunExistsError(f"{run_dir}: another process finished this transfer run meanwhile; pass "
                                         "--overwrite to replace it")
                clear_run_dir(run_dir)
                try:
                    summary = transfer_run(run_cfg, streams[seed], run_dir, quiet=quiet, plot=plot)
                except (CLToolboxError, OSError):
                    raise
                except Exception as e:  # noqa: BLE001 - a bug in a strategy: recorded, its traceback shown, next run
                    record_failure(run_dir, e)
                    traceback.print_exception(e, file=sys.stderr)
                    failures.append((run_dir, e))
                    continue
        except OSError as e:
            raise CLToolboxError(f"{e.filename or run_dir}: {e.strerror or e} while writing the transfer run; free "
                                 "space or choose another --out") from e
        finally:
            remove_temporaries(run_dir)
            prune_empty(run_dir, stop)
        results.append({**summary, "run_dir": str(run_dir)})
    if failures:
        run_dir, first = failures[0]
        raise CLToolboxError(f"{len(failures)} of {len(todo)} transfer run(s) failed, kept without DONE; the first: "
                             f"{run_dir}: {type(first).__name__}: {first} (traceback in {run_dir / 'error.log'})"
                             ) from first
    for strategy in resolved["strategy"]:
        mine = [r for r in results if r["labels"]["strategy"] == strategy["label"]]
        if len(mine) > 1:
            _write_mean(Path(mine[0]["run_dir"]).parent, mine, plot)
    if not quiet:
        print(format_table(results))
    return results


def _sub_stream(stream: Stream, tasks: list[Experience]) -> Stream:
    """A stream over the given tasks, re-indexed 0..n-1, keeping the parent's classes and settings."""
    exps = [Experience(n, t.task_id, t.classes, t.train, t.test) for n, t in enumerate(tasks)]
    return Stream(stream.name, exps, stream.n_classes, stream.input_shape, stream.class_order, stream.scenario,
                  stream.task_labels, dict(stream.info))


def _accuracy(learner: Learner, stream: Stream, task: Experience) -> list[float]:
    """(class-IL, task-IL) accuracy on ``task``'s test set, computed by the evaluator."""
    history = History(1, stream.n_classes, 1)
    evaluate_stream(learner, _sub_stream(stream, [task]), 0, history)
    return history.accuracy[1, 0, :].tolist()


def transfer_run(run_cfg: dict[str, Any], stream: Stream, run_dir: Path, quiet: bool = True,
                 plot: bool = True) -> dict[str, Any]:
    """One (strategy, seed) transfer matrix into ``run_dir`` (see the module doc); returns transfer.json."""
    from cltoolbox.build import build_model, build_plugins
    from cltoolbox.runfolder import environment, finish_env, scenario_label, write_config, write_done

    wall = time.perf_counter()
    seed = run_cfg["seed"]
    train_cfg = cfgmod.train_config(run_cfg)
    torch.manual_seed(seed)
    model0 = build_model(run_cfg, stream)
    init = copy.deepcopy(model0.state_dict())
    write_config(run_dir, run_cfg)

    def learner() -> Learner:
        model = copy.deepcopy(model0)
        model.load_state_dict(init)
        return Learner(model, build_plugins(run_cfg["strategy"]), train_cfg, seed=seed)

    device = resolve_device(train_cfg.device)
    env = environment(device)
    write_json(run_dir / "env.json", {**env, "status": "running"})
    stream = stream.to(device)
    tasks = stream.eval_experiences
    K = len(tasks)
    alone = np.full((K, 2), np.nan)
    pair = np.full((K, K, 2), np.nan)
    from tqdm import tqdm

    bar = tqdm(total=K * K, desc=f"transfer {run_cfg['strategy']['label']} seed {seed}", unit="task",
               disable=quiet, leave=False, file=sys.stderr)
    for i in range(K):
        # task i from the initialisation: its own "alone" accuracy and the start of every (i, j) pair.
        # after_fit is not called: as in a run, evaluation follows after_experience.
        first = learner()
        first.begin(_sub_stream(stream, [tasks[i]]))
        first.train_experience(first.stream.experiences[0])
        alone[i] = _accuracy(first, stream, tasks[i])
        state = copy.deepcopy(first.state_dict())
        bar.update(1)
        for j in range(K):
            if j == i:
                continue
            second = learner()
            second.load_state_dict(copy.deepcopy(state))  # plugins restored as on --resume
            both = _sub_stream(stream, [tasks[i], tasks[j]])
            second.begin(both)
            second.train_experience(both.experiences[1])
            pair[i, j] = _accuracy(second, stream, tasks[j])
            bar.update(1)
    bar.close()

    T = pair - alone[None, :, :]  # T[i, j] = acc_j(i then j) - acc_j(j alone)
    rows = [{"first_task": -1, "second_task": j, "setting": s, "accuracy": float(alone[j, k])}
            for j in range(K) for k, s in enumerate(SETTINGS)]
    rows += [{"first_task": i, "second_task": j, "setting": s, "accuracy": float(pair[i, j, k])}
             for i in range(K) for j in range(K) if i != j for k, s in enumerate(SETTINGS)]
    write_csv(run_dir / "accuracy.csv", rows, ACCURACY_FIELDS)
    for k, s in enumerate(SETTINGS):
        write_transfer_matrix(run_dir / "matrices" / f"transfer_{s}.csv", T[:, :, k])
    if plot:
        plot_transfer({s: T[:, :, k] for k, s in enumerate(SETTINGS)}, run_dir, "transfer",
                      f"{run_cfg['strategy']['label']}, seed {seed}")
    off = ~np.eye(K, dtype=bool)
    summary: dict[str, Any] = {
        "status": "done",
        "tasks": [{"index": t.index, "task_id": t.task_id, "classes": [int(c) for c in t.classes]} for t in tasks],
        "alone": {s: alone[:, k].tolist() for k, s in enumerate(SETTINGS)},
        "transfer": {s: T[:, :, k].tolist() for k, s in enumerate(SETTINGS)},
        "mean_transfer": {s: _nanmean(T[:, :, k][off]) for k, s in enumerate(SETTINGS)},
        "cost": {"wall_s": time.perf_counter() - wall, "trainings": K * K},
        "labels": {"experiment": run_cfg["name"], "strategy": run_cfg["strategy"]["label"],
                   "scenario": scenario_label(run_cfg["scenario"]),
                   "dataset": run_cfg["scenario"]["dataset"], "model": run_cfg["model"]["name"], "seed": seed,
                   "n_tasks": K},
    }
    write_json(run_dir / "transfer.json", summary)
    write_done(run_dir, finish_env(run_dir, env, "done")["end_time"])
    return summary


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def write_transfer_matrix(path: Path, T: np.ndarray) -> None:
    """K x K CSV: header ``first_task,task_0,...``, one row per first task; NaN as an empty cell."""
    lines = ["first_task," + ",".join(f"task_{j}" for j in range(T.shape[1]))]
    for i in range(T.shape[0]):
        lines.append(f"{i}," + ",".join("" if math.isnan(v) else repr(float(v)) for v in T[i]))
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_transfer_matrix(path: str | Path) -> np.ndarray:
    """The matrix written by :func:`write_transfer_matrix` (NaN for empty cells)."""
    lines = Path(path).read_text().strip().splitlines()[1:]
    return np.array([[float(v) if v else np.nan for v in line.split(",")[1:]] for line in lines])


def plot_transfer(matrices: dict[str, np.ndarray], out: Path, name: str, title: str) -> list[Path]:
    """Heatmaps of the transfer matrices (one panel per setting; diverging colours centred on 0)."""
    from cltoolbox.report import COLUMN_WIDTH_IN, paper_style, save_figure

    paper_style()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(COLUMN_WIDTH_IN * 2, 2.6), squeeze=False,
                             layout="constrained")
    finite = [np.abs(m[~np.isnan(m)]) for m in matrices.values()]
    lim = max([0.01, *(float(f.max()) for f in finite if f.size)])
    cmap = plt.get_cmap("RdBu").with_extremes(bad="0.85")  # NaN (the diagonal) in grey
    for ax, (setting, T) in zip(axes.flat, matrices.items(), strict=True):
        im = ax.imshow(np.ma.masked_invalid(T), cmap=cmap, vmin=-lim, vmax=lim, aspect="equal")
        K = T.shape[0]
        ax.set_title(setting.replace("_", "-"))
        ax.set_xlabel("second task j")
        ax.set_ylabel("first task i")
        ax.set_xticks(range(K))
        ax.set_yticks(range(K))
        if K <= 10:
            for i in range(K):
                for j in range(K):
                    if not math.isnan(T[i, j]):
                        ax.text(j, i, f"{T[i, j] * 100:.0f}", ha="center", va="center", fontsize=5,
                                color="white" if abs(T[i, j]) > 0.6 * lim else "black")
    fig.colorbar(im, ax=axes, shrink=0.8, label="T (accuracy difference; cells x100)")
    fig.suptitle(f"T[i, j] = acc_j(i then j) - acc_j(j alone): {title}", fontsize=8)
    return save_figure(fig, out, name)


def _write_mean(folder: Path, results: list[dict[str, Any]], plot: bool = True) -> None:
    means = {}
    for s in SETTINGS:
        stack = np.array([r["transfer"][s] for r in results], dtype=float)
        n = (~np.isnan(stack)).sum(0)
        means[s] = np.where(n > 0, np.nansum(stack, axis=0) / np.maximum(n, 1), np.nan)
        write_transfer_matrix(folder / f"transfer_mean_{s}.csv", means[s])
    if plot:
        label = results[0]["labels"]["strategy"]
        plot_transfer(means, folder, "transfer_mean", f"{label}, mean of {len(results)} seeds")


def format_table(results: list[dict[str, Any]]) -> str:
    """Mean off-diagonal transfer per strategy (mean ± std over seeds) and each run's class-IL matrix."""
    lines = [f"{'strategy':<16}{'seeds':>6}  {'mean T (class-IL)':>18}{'mean T (task-IL)':>18}"]
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["labels"]["strategy"], []).append(r)

    def ms(vals: list[float]) -> str:
        return mean_std(vals, sep="±", signed=True)

    for name, rs in groups.items():
        lines.append(f"{name:<16}{len(rs):>6}  {ms([r['mean_transfer']['class_il'] for r in rs]):>18}"
                     f"{ms([r['mean_transfer']['task_il'] for r in rs]):>18}")
    for r in results:
        T = np.array(r["transfer"]["class_il"], dtype=float)
        lines.append(f"\n{r['labels']['strategy']} seed {r['labels']['seed']}: T[i, j] class-IL (rows: first task)")
        for i, row in enumerate(T):
            lines.append(f"  {i:>3} " + " ".join("   -  " if math.isnan(v) else f"{v:+.3f}" for v in row))
    return "\n".join(lines)
