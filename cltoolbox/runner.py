"""Run experiments: resolve a config, then train and evaluate every strategy x seed into run folders."""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cltoolbox import config as cfgmod
from cltoolbox import metrics, rss
from cltoolbox.augment import check_augment
from cltoolbox.errors import CLToolboxError, ConfigError, DivergenceError, RunExistsError, RunLockedError
from cltoolbox.evaluate import SETTINGS, History, evaluate_stream
from cltoolbox.loop import Learner
from cltoolbox.plugin import Plugin, check_composition
from cltoolbox.registry import MODELS, SCENARIOS, STRATEGIES, import_plugins, plugin_sources, resolve_import_path
from cltoolbox.results import (
    ACCURACY_FIELDS,
    OLD_NEW_FIELDS,
    PER_CLASS_FIELDS,
    TRAIN_LOG_FIELDS,
    atomic_write_bytes,
    atomic_write_text,
    is_done,
    write_confusion,
    write_csv,
    write_json,
    write_matrix,
)
from cltoolbox.stream import Stream, validation_stream


def scenario_label(scenario: dict[str, Any]) -> str:
    return f"{scenario['name']}-{scenario['dataset']}"


def run_dir_for(resolved: dict, strategy: dict, seed: int) -> Path:
    """``<out>/<experiment>/<strategy label>/<scenario>-<dataset>/seed_<s>``."""
    scenario = scenario_label(resolved["scenario"])
    return Path(resolved["out"]) / resolved["name"] / strategy["label"] / scenario / f"seed_{seed}"


def build_plugins(strategy: dict[str, Any]) -> list[Plugin]:
    params = {k: v for k, v in strategy.items() if k not in ("name", "label", "plugins", "train")}
    made = STRATEGIES.get(strategy["name"]).factory(**params)
    plugins = [made] if isinstance(made, Plugin) else list(made)
    for extra in strategy.get("plugins", []):
        plugins += build_plugins(extra)
    return plugins


def build_stream(resolved: dict, data, seed: int) -> Stream:
    scen = resolved["scenario"]
    params = {k: v for k, v in scen.items() if k not in cfgmod.SCENARIO_RESERVED}
    stream = SCENARIOS.get(scen["name"]).factory(data, seed, **params)
    if len(stream) == 0:
        raise ConfigError("scenario: the generator produced no experiences; check its parameters")
    if scen.get("validation"):
        stream = validation_stream(stream, scen["validation"], seed)
    empty = [e.index for e in stream if e.n_train == 0]
    if empty:
        raise ConfigError(f"scenario: experience {empty[0]} has no training samples; check the class split")
    return stream


def build_model(resolved: dict, stream: Stream) -> torch.nn.Module:
    m = resolved["model"]
    params = {k: v for k, v in m.items() if k != "name"}
    return MODELS.get(m["name"]).factory(stream.input_shape, stream.n_classes, **params)


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=2,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _env(device: torch.device) -> dict[str, Any]:
    from cltoolbox import __version__

    return {
        "python": platform.python_version(), "torch": torch.__version__, "cltoolbox": __version__,
        "git_commit": _git_commit(), "platform": platform.platform(), "hostname": platform.node(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch_threads": torch.get_num_threads(), "argv": sys.argv, "plugins": plugin_sources(),
        "start_time": datetime.now(timezone.utc).isoformat(),
    }


def describe_stream(stream: Stream) -> dict[str, Any]:
    """What the run trained and tested on, in order (stream.json): classes, task ids, sizes, schedule."""

    def exp(e) -> dict[str, Any]:
        return {"index": e.index, "task_id": e.task_id, "classes": [int(c) for c in e.classes],
                "n_train": e.n_train, "n_test": e.n_test}

    return {
        "name": stream.name, "scenario": stream.scenario, "n_classes": stream.n_classes,
        "input_shape": list(stream.input_shape), "class_order": [int(c) for c in stream.class_order],
        "task_labels": stream.task_labels, "experiences": [exp(e) for e in stream.experiences],
        "eval_experiences": [exp(e) for e in stream.eval_experiences],
        "schedule": stream.schedule if stream.schedule is not None else list(range(len(stream))),
        "first_seen": stream.first_seen(),
        "info": json.loads(json.dumps(stream.info, default=str)),
    }


class RunLock:
    """An exclusive lock file (``host:pid``), so two processes never write one run folder.

    A lock whose process is gone is taken over; one held on another host (a shared file system under a
    Ray cluster) cannot be checked from here and is respected.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.owner = f"{platform.node()}:{os.getpid()}"

    def _stale(self) -> bool:
        try:
            host, _, pid = self.path.read_text().rpartition(":")
            if host and host != platform.node():
                return False
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError, FileNotFoundError):
            return True
        except PermissionError:  # alive, another user's
            pass
        return False

    def __enter__(self) -> RunLock:
        for _ in range(3):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, self.owner.encode())
                os.close(fd)
                return self
            except FileNotFoundError:  # another process removed the empty folder meanwhile (tidy): again
                continue
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)  # its writer is gone
                    continue
                holder = self.path.read_text() if self.path.exists() else "?"
                raise RunLockedError(
                    f"{self.path.parent}: another process ({holder}) is writing this run; wait for it, or remove "
                    f"{self.path} if no run is active"
                ) from None
        raise RunLockedError(f"{self.path.parent}: could not take the run lock; remove {self.path} if no run is active")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def clear_run_dir(run_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove everything in a run folder except its lock and ``keep`` (call it while holding the lock)."""
    for p in Path(run_dir).iterdir():
        if p.name == ".lock" or p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _recorded_threads(run_dir: Path) -> int | None:
    try:
        threads = int(json.loads((run_dir / "env.json").read_text())["torch_threads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return threads if threads >= 1 else None


TEMPORARY = re.compile(r"^\..+\.tmp\d+$")  # results.atomic_write_bytes's temporary names


def remove_temporaries(run_dir: Path) -> None:
    """Delete what a killed or failed atomic write left (``.<name>.tmp<pid>``); call it holding the lock."""
    for p in Path(run_dir).rglob(".*.tmp*"):
        if p.is_file() and TEMPORARY.match(p.name):
            p.unlink(missing_ok=True)


def prune_empty(folder: Path, stop: Path | None) -> None:
    """Remove ``folder`` and its parents while they are empty, up to (not including) ``stop``: a run that failed
    before writing anything leaves no empty ``seed_*`` folders behind."""
    if stop is None:
        return
    folder, stop = Path(folder).absolute(), Path(stop).absolute()
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            return
        folder = folder.parent


def claim(run_dir: Path, planned: str, overwrite: bool) -> tuple[str, int | None]:
    """Decide, holding the run's lock, what to do with a run folder now: another process may have finished or
    started it since it was planned. Returns (action, torch threads to use or None):

    - 'skip': the run is finished (only a planned overwrite clears a finished run);
    - 'resume': a checkpoint to continue from, with the threads the run started with;
    - 'run' / 'restart': the folder is cleared and the run starts from scratch ('restart': a planned resume
      that had no checkpoint yet; it too keeps the threads it started with, so its results are exact).
    """
    if is_done(run_dir) and not (planned == "run" and overwrite):
        return "skip", None
    threads = _recorded_threads(run_dir) if planned == "resume" else None
    if planned == "resume" and (run_dir / "checkpoint" / "state.pt").exists():
        remove_temporaries(run_dir)
        (run_dir / "error.log").unlink(missing_ok=True)  # of an earlier attempt that failed
        return "resume", threads
    # a restart keeps env.json until the run rewrites it: a kill in between must not lose the thread count
    clear_run_dir(run_dir, keep=("env.json",) if planned == "resume" else ())
    return ("restart" if planned == "resume" else "run"), threads


CHECKPOINT_KEYS = {"learner": ("model", "plugins", "generator", "torch_rng", "step", "train_log", "train_seconds"),
                   "history": ("accuracy", "loss", "n_samples", "class_total", "class_correct", "rows_done"),
                   "timing": ("wall_s", "eval_s"), "next_experience": ()}


def _checkpoint_problem(state: Any, T: int | None) -> str | None:
    """What makes ``state`` unusable as a checkpoint of a T-experience run, or None."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a checkpoint mapping"
    for key, inner in CHECKPOINT_KEYS.items():
        if key not in state:
            return f"'{key}' is missing"
        if inner and not isinstance(state[key], dict):
            return f"'{key}' is not a mapping"
        missing = [k for k in inner if k not in state[key]]
        if missing:
            return f"'{key}.{missing[0]}' is missing"
    n, rows = state["next_experience"], state["history"]["rows_done"]
    if not isinstance(n, int) or isinstance(n, bool):
        return f"next_experience {n!r} is not an integer"
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.bool or rows.dim() != 1:
        return "'history.rows_done' is not a vector of flags"
    held = len(rows) - 1
    if T is not None and held != T:
        return f"holds {held} experiences, this run's stream has {T}"
    if not 1 <= n <= held:
        return f"next_experience {n} is outside 1..{held}"
    if not bool(rows[: n + 1].all()) or bool(rows[n + 1:].any()):
        return f"next_experience {n} does not match the {int(rows.sum()) - 1} experiences it has results for"
    if not all(isinstance(state["timing"][k], (int, float)) for k in CHECKPOINT_KEYS["timing"]):
        return "'timing' holds non-numbers"
    return None


def load_checkpoint(path: Path, device: torch.device | str = "cpu", T: int | None = None,
                    mmap: bool = False) -> dict[str, Any]:
    """A run's checkpoint, loaded without running code (``weights_only``) and checked: every key present and a
    ``next_experience`` that agrees with the rows it has results for. Raises RunExistsError otherwise.
    ``mmap``: map the tensors instead of reading them (a check before the run loads it for real)."""
    fix = "pass --overwrite to run it again"
    try:
        state = torch.load(path, weights_only=True, map_location=device, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - truncated by a power loss (renamed, not fsynced), or not a checkpoint
        raise RunExistsError(f"{path}: unreadable checkpoint ({type(e).__name__}); {fix}") from None
    problem = _checkpoint_problem(state, T)
    if problem:
        raise RunExistsError(f"{path}: not a valid checkpoint ({problem}); {fix}")
    return state


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


CHECKPOINT_WORK_RATIO = 20  # checkpoints cost at most ~5% of a run's time

DEFAULT_THREADS = 1


def default_threads() -> int:
    """Torch threads for a run whose user did not choose (no ``--threads``): ``OMP_NUM_THREADS`` when it is set
    to a count, else 1. Not torch's default (one per core): intra-op threads spin-wait for each other, and when
    other processes hold the cores that made a quickstart seed 6x slower on 2 cores (2 min 28 s vs 24 s with
    1 thread); the small in-memory models gain little from a second thread on a quiet machine. A fixed count,
    not one read from the machine's load, also keeps results identical across machines, `run` and `sweep`."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return DEFAULT_THREADS
    return n if n >= 1 else DEFAULT_THREADS


_WARM: list[bool] = []


def warm_up() -> None:
    """Pay a process's one-off costs before a run's clocks start, so that the same work reports the same time
    whatever its position in the process: the first ``torch.optim`` optimizer imports ``torch._dynamo``
    (``Optimizer.add_param_group`` is wrapped by ``torch._compile._disable_dynamo``; ~1.1 s here) and the
    first backward starts autograd."""
    if _WARM:
        return
    import torch._dynamo  # noqa: F401 - the import is the cost

    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    (w * 2).sum().backward()
    opt.step()
    _WARM.append(True)


def execute_run(run_cfg: dict[str, Any], stream: Stream, run_dir: Path, resume: bool = False,
                quiet: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Train and evaluate one (strategy, seed) run into ``run_dir``; returns metrics.json's content.

    ``threads``: torch threads for this run, ``default_threads()`` when None (a resumed run passes the count it
    started with: the thread count changes float summation order, so this keeps a resumed run bit-identical to
    an uninterrupted one).
    """
    seed = run_cfg["seed"]
    warm_up()  # before the clocks: a process's first run must not pay torch._dynamo's import
    wall_start = time.perf_counter()
    rss.reset_peak()  # cost.peak_rss_mb is this run's, not an earlier run's in the same process
    before_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        train_cfg = cfgmod.train_config(run_cfg)
        torch.manual_seed(seed)
        model = build_model(run_cfg, stream)
        learner = Learner(model, build_plugins(run_cfg["strategy"]), train_cfg, seed=seed)
        stream = stream.to(learner.device)
        T = len(stream)
        history = History(T, stream.n_classes, len(stream.eval_experiences))
        ckpt = run_dir / "checkpoint" / "state.pt"
        start, prior = 0, {"wall_s": 0.0, "eval_s": 0.0}
        state = load_checkpoint(ckpt, learner.device, T) if resume else None
        if state is not None:
            try:
                learner.load_state_dict(state["learner"])
                history.load_state_dict(state["history"])
            except Exception as e:  # noqa: BLE001 - well-formed, but not this run's (another model or strategy)
                raise RunExistsError(f"{ckpt}: does not fit this run ({_one_line(e)}); pass --overwrite to run "
                                     "it again") from None
            start, prior = state["next_experience"], state["timing"]
        return _train(run_cfg, stream, run_dir, learner, history, start, prior, wall_start, quiet)
    finally:
        torch.set_num_threads(before_threads)


def _train(run_cfg: dict[str, Any], stream: Stream, run_dir: Path, learner: Learner, history: History, start: int,
           prior: dict[str, float], wall_start: float, quiet: bool) -> dict[str, Any]:
    cpu_start = time.process_time()  # this process's CPU time, all threads (cost.cpu_s; not loader workers)
    import yaml

    seed, T = run_cfg["seed"], len(stream)
    ckpt = run_dir / "checkpoint" / "state.pt"
    env = _env(learner.device)
    if start > 0:
        env["resumed_at_experience"] = start
        try:  # a run keeps its first start time (reports order runs by it)
            env["start_time"] = json.loads((run_dir / "env.json").read_text())["start_time"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    else:
        # libyaml's emitter when present: the same text as yaml.safe_dump, ~4x faster (about 1 ms per run)
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        atomic_write_text(run_dir / "config.yaml", yaml.dump(run_cfg, Dumper=dumper, sort_keys=False))
        write_json(run_dir / "stream.json", describe_stream(stream))
    write_json(run_dir / "env.json", env)
    if torch.cuda.is_available() and learner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(learner.device)
    eval_s = prior["eval_s"]

    def evaluate(row: int) -> None:
        nonlocal eval_s
        t0 = time.perf_counter()
        evaluate_stream(learner, stream, row, history)
        eval_s += time.perf_counter() - t0

    last_save = {"end": time.perf_counter(), "cost": 0.0}

    def after_experience(lrn: Learner, exp) -> None:
        evaluate(exp.index)
        # Checkpoint unless that would cost more than 1/CHECKPOINT_WORK_RATIO of the work since the last one:
        # every experience of an ordinary stream, every few dozen of an online stream of 10-sample chunks
        # (there, one per chunk took a third of the run). Resume is exact from any checkpoint, so this only
        # bounds the work a kill loses; the last experience is always saved (runs load it as weights).
        now = time.perf_counter()
        if exp.index < T - 1 and now - last_save["end"] < CHECKPOINT_WORK_RATIO * last_save["cost"]:
            bar.update(1)
            return
        timing = {"wall_s": prior["wall_s"] + now - wall_start, "eval_s": eval_s,
                  "cpu_s": prior.get("cpu_s", 0.0) + time.process_time() - cpu_start}
        blob = {"learner": lrn.state_dict(), "history": history.state_dict(), "next_experience": exp.index + 1,
                "timing": timing}
        import io

        buf = io.BytesIO()
        torch.save(blob, buf)
        atomic_write_bytes(ckpt, buf.getbuffer())  # a view, not a copy: replay memories make it megabytes
        last_save["end"] = time.perf_counter()
        last_save["cost"] = last_save["end"] - now
        bar.update(1)

    from tqdm import tqdm

    label = f"{run_cfg['strategy']['label']} seed {seed}"
    bar = tqdm(total=T, initial=start, desc=label, unit="exp", disable=quiet, leave=False, file=sys.stderr)
    if not quiet:
        learner.on_epoch_end = lambda row: bar.set_postfix_str(
            f"epoch {row['epoch'] + 1}/{row['epochs']} loss {row['loss']:.3f}", refresh=True)
    if start == 0:
        learner.begin(stream)  # task masks etc. for the init evaluation
        evaluate(-1)
    status = "interrupted"  # until fit returns: a crash keeps what was measured, without DONE
    try:
        learner.fit(stream, start=start, on_experience_end=after_experience)
        status = "done"
    except DivergenceError:
        status = "diverged"
        raise
    finally:
        bar.close()
        summary = _finish(run_dir, run_cfg, stream, learner, history, env, status,
                          wall_s=prior["wall_s"] + time.perf_counter() - wall_start, eval_s=eval_s,
                          cpu_s=prior.get("cpu_s", 0.0) + time.process_time() - cpu_start)
    return summary


def _write_extras(run_dir: Path, stream: Stream, history: History, first_seen: list[int],
                  summary: dict[str, Any]) -> None:
    """Old vs new accuracy per step, class-IL top-5 (streams of >= 20 classes) and the final confusion matrix."""
    old_new = history.old_new_rows(first_seen)
    write_csv(run_dir / "old_new.csv", old_new, OLD_NEW_FIELDS)
    for row in old_new:  # the last step's row per setting ends in metrics.json
        if row["trained_exp"] == len(stream) - 1:
            summary[row["setting"]].update(acc_old=row["accuracy_old"], acc_new=row["accuracy_new"])
    if stream.n_classes >= 20:
        write_matrix(run_dir / "matrices" / "top5_class_il.csv", history.top5.numpy())
        final, seen = history.top5[-1].numpy(), [j for j, f in enumerate(first_seen) if f > 0]
        summary["class_il"]["acc_top5"] = float(final[seen].mean()) if seen else float("nan")
    write_confusion(run_dir / "confusion.csv", history.confusion.numpy())


def _finish(run_dir: Path, run_cfg: dict, stream: Stream, learner: Learner, history: History, env: dict,
            status: str, wall_s: float, eval_s: float, cpu_s: float | None = None) -> dict[str, Any]:
    """Write every result file (also for a diverged run: what was measured is kept); DONE last if done."""
    write_csv(run_dir / "accuracy.csv", history.accuracy_rows(), ACCURACY_FIELDS)
    write_csv(run_dir / "per_class.csv", history.per_class_rows(), PER_CLASS_FIELDS)
    write_csv(run_dir / "train_log.csv", learner.train_log, TRAIN_LOG_FIELDS)
    n_samples = history.n_samples.numpy()
    first_seen = stream.first_seen()
    summary: dict[str, Any] = {"status": status}
    for setting in SETTINGS:
        R = history.matrix(setting)
        write_matrix(run_dir / "matrices" / f"accuracy_{setting}.csv", R)
        write_matrix(run_dir / "matrices" / f"forgetting_{setting}.csv", metrics.forgetting_matrix(R, first_seen))
        write_matrix(run_dir / "matrices" / f"transfer_{setting}.csv", metrics.transfer_matrix(R, first_seen))
        summary[setting] = metrics.summary(R, n_samples=n_samples, first_seen=first_seen)
    _write_extras(run_dir, stream, history, first_seen, summary)
    items = sum(p.memory_usage()[0] for p in learner.plugins)
    mem_bytes = sum(p.memory_usage()[1] for p in learner.plugins)
    cost = {
        "wall_s": wall_s, "cpu_s": cpu_s, "train_s": learner.train_seconds, "eval_s": eval_s,
        "peak_rss_mb": rss.peak_mb(),
        # the largest loader worker's peak (file-backed data; 0 without workers), beside the process's own
        "peak_rss_workers_mb": rss.children_peak_mb(),
        "n_params": sum(p.numel() for p in learner.model.parameters()),
        "memory_items": items, "memory_bytes": mem_bytes,
    }
    for p in learner.plugins:
        cost.update(p.cost())
    if learner.device.type == "cuda":
        cost["peak_gpu_mb"] = torch.cuda.max_memory_allocated(learner.device) / 2**20
    summary["cost"] = cost
    if status == "done":
        diagnostics = {k: v for p in learner.plugins for k, v in p.report(learner, stream).items()}
        if diagnostics:
            summary["strategy"] = diagnostics
    summary["labels"] = {
        "experiment": run_cfg["name"], "strategy": run_cfg["strategy"]["label"],
        "scenario": scenario_label(run_cfg["scenario"]), "dataset": run_cfg["scenario"]["dataset"],
        "model": run_cfg["model"]["name"], "seed": run_cfg["seed"], "n_experiences": len(stream),
    }
    write_json(run_dir / "metrics.json", summary)
    env = {**env, "end_time": datetime.now(timezone.utc).isoformat(), "status": status}
    write_json(run_dir / "env.json", env)
    if status == "done":
        # every result file reaches the disk before the marker that says they are complete. One global sync,
        # not an fsync per file: measured on ext4, 16 fsyncs cost ~3.5 ms vs ~0.7 ms quiet, and ~90 ms vs
        # ~13 ms (medians) while another process kept writing, as each fsync waits for a journal commit
        os.sync()
        atomic_write_text(run_dir / "DONE", env["end_time"] + "\n", durable=True)
    return summary


def _first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            diff = _first_difference(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
            if diff:
                return diff
        return None
    return None if old == new else (path, old, new)


def check_same_config(run_dir: Path, run_cfg: dict[str, Any]) -> None:
    """A run is only skipped or resumed if it was started from the same config (``out`` aside)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.exists():
        return
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        old = e
    if not isinstance(old, dict):
        why = type(old).__name__ if isinstance(old, Exception) else f"a {type(old).__name__}, not a mapping"
        raise RunExistsError(f"{path}: unreadable run config ({why}); pass --overwrite to run it again")
    new = yaml.safe_load(yaml.safe_dump(run_cfg, sort_keys=False))
    old.pop("out", None)
    new.pop("out", None)
    diff = _first_difference(old, new)
    if diff:
        key, a, b = diff
        raise RunExistsError(f"{run_dir}: was started with a different config ({key}: {a!r}, now {b!r}); pass "
                             "--overwrite to replace it or --out DIR for a new place")


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's metrics.json; RunExistsError (one line, with the fix) when it is damaged."""
    path = Path(run_dir) / "metrics.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        summary = e
    keys = ("class_il", "task_il", "cost", "labels")
    if not isinstance(summary, dict) or not all(isinstance(summary.get(k), dict) for k in keys):
        why = type(summary).__name__ if isinstance(summary, Exception) else "not a run summary"
        raise RunExistsError(f"{path}: unreadable although the run is finished ({why}); pass --overwrite to run it "
                             f"again, or delete {Path(run_dir) / 'DONE'} and rerun with --resume")
    return summary


def check_existing(run_dir: Path, action: str, run_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Before anything trains: a run to skip or resume must come from the same config and be intact (its
    metrics.json, or its checkpoint). Returns the summary of a run to skip."""
    if action not in ("skip", "resume"):
        return None
    check_same_config(run_dir, run_cfg)
    if action == "skip":
        return read_summary(run_dir)
    ckpt = run_dir / "checkpoint" / "state.pt"
    if ckpt.exists():
        load_checkpoint(ckpt, mmap=True)
    return None


def run_action(run_dir: Path, resume: bool, overwrite: bool) -> str:
    """What to do with one run folder: 'run' (from scratch), 'resume' or 'skip'.

    Raises RunExistsError for a finished run without --overwrite/--resume, or an unfinished one without
    --resume/--overwrite, so that nothing is touched by accident.
    """
    d = Path(run_dir)
    if is_done(d):
        if overwrite:
            return "run"
        if resume:
            return "skip"
        raise RunExistsError(
            f"{d}: a finished run is already there; pass --overwrite to replace it, --resume to skip "
            "finished runs, or --out DIR for a new place")
    if d.exists() and any(d.iterdir()):
        if resume:
            return "resume"
        if overwrite:
            return "run"
        raise RunExistsError(f"{d}: an unfinished run is there; pass --resume to continue it or "
                             "--overwrite to start it again")
    return "run"


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


def load_raw(
    config: dict[str, Any] | str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | None = None,
    seeds: list[int] | None = None,
) -> dict[str, Any]:
    """The raw config dict: YAML read, overrides applied, user plugins imported, --out/--seeds set."""
    raw = cfgmod.load_yaml(config) if isinstance(config, (str, Path)) else dict(config)
    raw = cfgmod.apply_overrides(raw, list(overrides))
    if raw.get("imports"):
        base = str(Path(config).parent) if isinstance(config, (str, Path)) else None
        import_plugins(raw["imports"], base)
        raw["imports"] = [str(resolve_import_path(s, base)) if s.endswith(".py") else s for s in raw["imports"]]
    if out is not None:
        raw["out"] = out
    if seeds is not None:
        raw["seeds"] = list(seeds)
    return raw


def check_buildable(resolved: dict, data) -> Stream:
    """Build the first seed's stream, every strategy's plugins and the model (on the meta device, free),
    so that bad generator, strategy or model parameters fail before any run starts; returns the stream."""
    stream = build_stream(resolved, data, resolved["seeds"][0])
    for i, strategy in enumerate(resolved["strategy"]):
        given = strategy.get("train", {})
        where = f"strategy[{i}].train" if any(k.startswith("augment_") for k in given) else "train"
        check_augment({**resolved["train"], **given}, stream.input_shape, where)
    plugins = [check_plugins(strategy, f"strategy[{i}]" if len(resolved["strategy"]) > 1 else "strategy")
               for i, strategy in enumerate(resolved["strategy"])]
    model = check_model(resolved, stream)
    for plugin in (p for group in plugins for p in group):
        plugin.check(model, stream)  # strategy x model x stream constraints (e.g. a prompt layer past the depth)
    return stream


def check_plugins(strategy: dict[str, Any], field: str = "strategy") -> list[Plugin]:
    """Build a strategy's plugins before any run starts; a parameter value that its factory does not check
    itself (and so raises something else than a ConfigError) is reported as one line naming the strategy."""
    try:
        return check_composition(build_plugins(strategy), field)
    except CLToolboxError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{field}: {strategy['name']} cannot be built with these parameters ({_one_line(e)}); "
                          f"check the {field}.* values") from e


def _memory_bytes(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def check_model(resolved: dict, stream: Stream) -> torch.nn.Module:
    """Build the model on the meta device (free): its parameters are checked by its factory, and its size
    against the memory of the device it will train on. Returns the meta model."""
    from cltoolbox.loop import resolve_device

    name = resolved["model"]["name"]
    try:
        with torch.device("meta"):
            model = build_model(resolved, stream)
    except CLToolboxError:
        raise
    except Exception as e:  # noqa: BLE001 - a parameter value the factory does not check itself
        raise ConfigError(f"model: {name} cannot be built with these parameters ({_one_line(e)}); check the "
                          "model.* values") from e
    device = resolve_device(resolved["train"]["device"])
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    memory = _memory_bytes(device)
    if memory is not None and size > memory:
        n = sum(p.numel() for p in model.parameters())
        raise ConfigError(f"model: {name} has {n:,} parameters ({size / 2**30:,.1f} GiB), more than the "
                          f"{memory / 2**30:,.1f} GiB memory of {device}; make it smaller (e.g. model.hidden)")
    return model


def check_writable(out: str | Path) -> Path:
    """Prove that run folders can be created under ``out`` (create it and a probe file, then remove whatever
    this made); returns the nearest folder that already existed, below which failed runs leave nothing."""
    out = Path(out).absolute()
    base = out
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise CLToolboxError(f"--out {out}: {base} is a file, not a folder; choose another --out")
    probe = out / f".cltoolbox_probe{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        prune_empty(out, base)
        raise CLToolboxError(f"--out {out}: cannot write there ({e.strerror or type(e).__name__}); choose a "
                             "writable folder with --out") from None
    prune_empty(out, base)
    return base


def io_error(e: OSError, run_dir: Path) -> CLToolboxError:
    """An I/O failure while writing a run folder, as one line (its checkpoints are kept: --resume)."""
    where = e.filename or run_dir
    return CLToolboxError(f"{where}: {e.strerror or _one_line(e)} while writing the run folder; free space or "
                          "choose another --out, then rerun with --resume")


def record_failure(run_dir: Path, error: BaseException) -> None:
    """A run that raised an unexpected exception (a strategy bug): metrics.json gets ``status: failed`` and the
    one-line error, error.log the traceback. The run keeps what it measured and has no DONE."""
    import traceback

    path = run_dir / "metrics.json"
    try:
        summary = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        summary = {}
    summary.update(status="failed", error=_one_line(error))
    atomic_write_text(run_dir / "error.log", "".join(traceback.format_exception(error)))
    write_json(path, summary)


def run_in_folder(run_cfg: dict[str, Any], stream: Any, run_dir: Path, planned: str, overwrite: bool,
                  quiet: bool = True, stop: Path | None = None,
                  threads: int | None = None) -> tuple[str, dict[str, Any]]:
    """Run one planned run in its folder: take the lock, decide again (``claim``), train; returns (action,
    metrics.json's content). ``stream`` is the run's Stream or a function that makes it. Whatever happens,
    no temporary files are left, nor an empty folder below ``stop``. An unexpected exception is recorded in
    the folder (``record_failure``) and raised again. ``threads``: torch threads for a run that starts now
    (None: ``default_threads()``); a resumed run keeps the count it started with."""
    try:
        with RunLock(run_dir):
            action, recorded = claim(run_dir, planned, overwrite)
            threads = recorded or threads
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
    todo = plan(resolved, resume, overwrite)
    skipped = {run_dir: check_existing(run_dir, action, cfgmod.run_config(resolved, strategy, seed))
               for strategy, seed, run_dir, action in todo}  # skip or continue only what this config started

    from cltoolbox.data import load_dataset

    scen = resolved["scenario"]
    data = load_dataset(scen["dataset"], scen["root"], scen["download"])
    streams = {resolved["seeds"][0]: check_buildable(resolved, data)}
    stop = check_writable(resolved["out"]) if any(action != "skip" for *_, action in todo) else None

    results, failures, causes = [], [], []
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
            failures.append(f"{run_dir}: failed with {_one_line(e)} (traceback in {run_dir / 'error.log'})")
            continue
        results.append({**summary, "run_dir": str(run_dir)})
    if not quiet and results:
        print(format_table(results))
    if failures:  # from the first crash, if any: --debug and Python callers see its traceback
        raise CLToolboxError(f"{len(failures)} of {len(todo)} run(s) did not finish, kept without DONE; the first: "
                             f"{failures[0]}") from (causes[0] if causes else None)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """Mean ± std over seeds per strategy: class-IL ACC, forgetting, BWT, task-IL ACC, wall time."""
    import statistics as st

    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["labels"]["strategy"], []).append(r)

    def ms(vals: list) -> str:
        vals = [v for v in vals if v is not None and v == v]
        if not vals:
            return "n/a"
        sd = st.stdev(vals) if len(vals) > 1 else 0.0
        return f"{st.mean(vals):.3f}±{sd:.3f}"

    w = max([16, *(len(name) + 2 for name in groups)])  # sweep labels (er-lr0.1-memory_size500) are long
    header = (f"{'strategy':<{w}}{'seeds':>6}  {'ACC (class-IL)':>15}{'forgetting':>15}{'BWT':>16}"
              f"{'ACC (task-IL)':>15}{'time s':>9}")
    lines = [header, "-" * len(header)]
    for name, rs in groups.items():
        c = [r["class_il"] for r in rs]
        lines.append(
            f"{name:<{w}}{len(rs):>6}  {ms([x['acc'] for x in c]):>15}{ms([x['forgetting'] for x in c]):>15}"
            f"{ms([x['bwt'] for x in c]):>16}{ms([r['task_il']['acc'] for r in rs]):>15}"
            f"{st.mean(r['cost']['wall_s'] for r in rs):>9.1f}"
        )
    return "\n".join(lines)
