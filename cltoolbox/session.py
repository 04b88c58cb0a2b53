"""One run in its folder: build the learner, evaluate after every experience, checkpoint, resume, finish.

``execute_run`` is the entry point (``cltoolbox run``, sweeps and the experiments/ scripts call it through
``runner.run_in_folder`` or directly); ``RunSession`` holds the state a run shares between those steps.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from cltoolbox import config as cfgmod
from cltoolbox import metrics, multilabel, rss, time_to_target
from cltoolbox.build import build_model, build_plugins, describe_stream
from cltoolbox.errors import DivergenceError, RunExistsError, one_line
from cltoolbox.evaluate import SETTINGS, History, evaluate_stream
from cltoolbox.loop import Learner
from cltoolbox.plugin import held_tensors, unsaved_tensors
from cltoolbox.precision import place_stream
from cltoolbox.results import (
    ACCURACY_FIELDS,
    OLD_NEW_FIELDS,
    PER_CLASS_FIELDS,
    TRAIN_LOG_FIELDS,
    atomic_write_bytes,
    write_confusion,
    write_csv,
    write_json,
    write_matrix,
)
from cltoolbox.runfolder import (
    environment,
    finish_env,
    load_checkpoint,
    scenario_label,
    write_config,
    write_done,
)
from cltoolbox.stream import Experience, Stream

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
    warm_up()  # before the clocks: a process's first run must not pay torch._dynamo's import
    wall_start = time.perf_counter()
    rss.reset_peak()  # cost.peak_rss_mb is this run's, not an earlier run's in the same process
    before_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        session = RunSession(run_cfg, stream, run_dir, quiet=quiet, wall_start=wall_start)
        if resume:
            session.resume()
        return session.run()
    finally:
        torch.set_num_threads(before_threads)


class RunSession:
    """The state one run shares between its steps: the learner, the stream on its device, the accuracy
    history, the clocks, and the experience it starts from (0, or where a checkpoint left off)."""

    def __init__(self, run_cfg: dict[str, Any], stream: Stream, run_dir: Path, quiet: bool = False,
                 wall_start: float | None = None) -> None:
        self.wall_start = time.perf_counter() if wall_start is None else wall_start
        self.run_cfg, self.run_dir, self.quiet = run_cfg, run_dir, quiet
        self.seed = run_cfg["seed"]
        train_cfg = cfgmod.train_config(run_cfg)
        torch.manual_seed(self.seed)
        model = build_model(run_cfg, stream)
        self.learner = Learner(model, build_plugins(run_cfg["strategy"]), train_cfg, seed=self.seed)
        self.built: list | None = [held_tensors(p) for p in self.learner.plugins]  # see warn_unsaved
        self.stream = place_stream(stream, self.learner.device)  # on the GPU when it fits, else pinned host memory
        self.T = len(self.stream)
        self.history = History(self.T, self.stream.n_classes, len(self.stream.eval_experiences))
        self.ckpt = run_dir / "checkpoint" / "state.pt"
        self.start, self.prior = 0, {"wall_s": 0.0, "eval_s": 0.0}
        self.eval_s = 0.0
        self.cpu_start = time.process_time()
        self.last_save_end, self.last_save_cost = time.perf_counter(), 0.0
        self.bar: Any = None
        self.loggers: Any = None  # cltoolbox.loggers.RunLoggers when the config lists trackers

    def resume(self) -> None:
        """Continue from the run's checkpoint (RunExistsError, one line, if it is damaged or not this run's)."""
        state = load_checkpoint(self.ckpt, self.learner.device, self.T)
        try:
            self.learner.load_state_dict(state["learner"])
            self.history.load_state_dict(state["history"])
        except Exception as e:  # noqa: BLE001 - well-formed, but not this run's (another model or strategy)
            raise RunExistsError(f"{self.ckpt}: does not fit this run ({one_line(e)}); pass --overwrite to run "
                                 "it again") from None
        self.start, self.prior = state["next_experience"], state["timing"]

    def cpu_s(self) -> float:
        """This process's CPU time for the run so far, all threads (not loader workers), resumes included;
        time spent in experiment trackers (cltoolbox.loggers) left out."""
        tracked = self.loggers.cpu if self.loggers is not None else 0.0
        return self.prior.get("cpu_s", 0.0) + time.process_time() - self.cpu_start - tracked

    def wall_s(self, now: float | None = None) -> float:
        tracked = self.loggers.wall if self.loggers is not None else 0.0
        return self.prior["wall_s"] + (time.perf_counter() if now is None else now) - self.wall_start - tracked

    def evaluate(self, row: int) -> None:
        """Evaluate every test experience into the history's ``row`` (-1: before training)."""
        t0 = time.perf_counter()
        evaluate_stream(self.learner, self.stream, row, self.history)
        self.eval_s += time.perf_counter() - t0
        if self.loggers is not None:
            self.loggers.accuracy_row(row, {s: self.history.matrix(s) for s in SETTINGS})

    def after_experience(self, learner: Learner, exp: Experience) -> None:
        """Evaluate, then checkpoint unless that would cost more than 1/CHECKPOINT_WORK_RATIO of the work since
        the last one: every experience of an ordinary stream, every few dozen of an online stream of 10-sample
        chunks (there, one per chunk took a third of the run). Resume is exact from any checkpoint, so this only
        bounds the work a kill loses; the last experience is always saved (runs load it as weights)."""
        self.evaluate(exp.index)
        now = time.perf_counter()
        if exp.index >= self.T - 1 or now - self.last_save_end >= CHECKPOINT_WORK_RATIO * self.last_save_cost:
            self.checkpoint(learner, exp.index + 1, now)
        self.bar.experience_done(exp.index)

    def warn_unsaved(self) -> None:
        """At the first checkpoint: a plugin without ``state_dict()`` that now holds tensors it did not hold as
        built would lose them on --resume; say so once (``cltoolbox check`` fails such a plugin)."""
        for plugin, built in zip(self.learner.plugins, self.built or [], strict=False):
            lost = unsaved_tensors(plugin, built, self.learner.model)
            if lost:
                warnings.warn(f"{type(plugin).__name__} holds tensors in {', '.join('self.' + a for a in lost)} but "
                              "has no state_dict(): --resume would lose them; implement state_dict() and "
                              "load_state_dict()", stacklevel=2)
        self.built = None

    def checkpoint(self, learner: Learner, next_experience: int, now: float) -> None:
        """Save what resuming at ``next_experience`` needs (atomically; a kill leaves the previous one)."""
        if self.built is not None:
            self.warn_unsaved()
        timing = {"wall_s": self.wall_s(now), "eval_s": self.eval_s,
                  "cpu_s": self.cpu_s()}
        blob = {"learner": learner.state_dict(), "history": self.history.state_dict(),
                "next_experience": next_experience, "timing": timing}
        buf = io.BytesIO()
        torch.save(blob, buf)
        atomic_write_bytes(self.ckpt, buf.getbuffer())  # a view, not a copy: replay memories make it megabytes
        self.last_save_end = time.perf_counter()
        self.last_save_cost = self.last_save_end - now

    def run(self) -> dict[str, Any]:
        """Train from ``start`` to the end of the stream; returns metrics.json's content. Whatever happens,
        the result files are written (a crash keeps what was measured, without DONE)."""
        from cltoolbox import progress

        learner, run_dir = self.learner, self.run_dir
        self.cpu_start = time.process_time()  # the clocks of the work itself, after the build
        self.env = environment(learner.device)
        if learner.dist is not None:  # one run over several processes (cltoolbox.distributed)
            self.env["distributed"] = {"world_size": learner.dist.world, "backend": torch.distributed.get_backend()}
        if self.start > 0:
            self.env["resumed_at_experience"] = self.start
            try:  # a run keeps its first start time (reports order runs by it)
                self.env["start_time"] = json.loads((run_dir / "env.json").read_text())["start_time"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
        else:
            write_config(run_dir, self.run_cfg)
            write_json(run_dir / "stream.json", describe_stream(self.stream))
        write_json(run_dir / "env.json", self.env)
        if torch.cuda.is_available() and learner.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(learner.device)
        self.eval_s = self.prior["eval_s"]
        self.last_save_end = time.perf_counter()

        # trackers (cltoolbox.loggers): config, epochs, rows, final, figures; rank 0's only under DDP (they may write
        # outside the run folder, e.g. <out>/mlruns)
        if self.run_cfg.get("loggers") and (learner.dist is None or learner.dist.rank == 0):
            from cltoolbox.loggers import RunLoggers

            self.loggers = RunLoggers(self.run_cfg["loggers"], self.run_cfg, run_dir)
            self.loggers.config(self.run_cfg)
            learner.on_epoch_end = self.loggers.epoch
        label = f"{self.run_cfg['strategy']['label']} seed {self.seed}"
        # a step bar on a terminal, else one plain line per experience (cltoolbox.progress)
        self.bar = progress.current(self.quiet).run(label, self.stream, learner.config.batch_size,
                                                    learner.config.epochs, self.start, quiet=self.quiet)
        self.bar.attach(learner)
        if self.start == 0:
            learner.begin(self.stream)  # task masks etc. for the init evaluation
            self.evaluate(-1)
        status = "interrupted"  # until fit returns: a crash keeps what was measured, without DONE
        try:
            learner.fit(self.stream, start=self.start, on_experience_end=self.after_experience)
            status = "done"
        except DivergenceError:
            status = "diverged"
            raise
        finally:
            self.bar.close()
            summary = self.finish(status)
        return summary

    def finish(self, status: str) -> dict[str, Any]:
        """Write every result file (also for a diverged run: what was measured is kept); DONE last if done."""
        run_dir, learner, history, stream = self.run_dir, self.learner, self.history, self.stream
        wall_s, cpu_s = self.wall_s(), self.cpu_s()
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
        self.write_extras(first_seen, summary)
        if stream.multi_label:  # mAP / CF1 / OF1 matrices, multilabel.csv, metrics.json's multi_label
            multilabel.write_results(run_dir, history, summary)
        summary["cost"] = self.cost(wall_s, cpu_s)
        reached = time_to_target.section(learner)  # train.time_to_target: cost to reach the target per experience
        if reached is not None:
            summary["time_to_target"] = reached
        if status == "done":
            diagnostics = {k: v for p in learner.plugins for k, v in p.report(learner, stream).items()}
            if diagnostics:
                summary["strategy"] = diagnostics
        cfg = self.run_cfg
        summary["labels"] = {
            "experiment": cfg["name"], "strategy": cfg["strategy"]["label"],
            "scenario": scenario_label(cfg["scenario"]), "dataset": cfg["scenario"]["dataset"],
            "model": cfg["model"]["name"], "seed": cfg["seed"], "n_experiences": len(stream),
        }
        write_json(run_dir / "metrics.json", summary)
        env = finish_env(run_dir, self.env, status)
        if status == "done":
            write_done(run_dir, env["end_time"])
        if self.loggers is not None:  # after DONE: the run's figures are drawn from the finished folder
            self.loggers.finish(summary, run_dir, status)
        return summary

    def cost(self, wall_s: float, cpu_s: float) -> dict[str, Any]:
        """metrics.json's ``cost``: clocks, peak memory, model size, memory held by plugins, plugins' own costs."""
        learner = self.learner
        cost = {
            "wall_s": wall_s, "cpu_s": cpu_s, "train_s": learner.train_seconds, "eval_s": self.eval_s,
            "peak_rss_mb": rss.peak_mb(),
            # the largest loader worker's peak (file-backed data; 0 without workers), beside the process's own
            "peak_rss_workers_mb": rss.children_peak_mb(),
            "n_params": sum(p.numel() for p in learner.model.parameters()),
            "memory_items": sum(p.memory_usage()[0] for p in learner.plugins),
            "memory_bytes": sum(p.memory_usage()[1] for p in learner.plugins),
        }
        for p in learner.plugins:
            cost.update(p.cost())
        if learner.device.type == "cuda":
            cost["peak_gpu_mb"] = torch.cuda.max_memory_allocated(learner.device) / 2**20
        return cost

    def write_extras(self, first_seen: list[int], summary: dict[str, Any]) -> None:
        """Old vs new accuracy per step, class-IL top-5 (streams of >= 20 classes) and the final confusion
        matrix."""
        run_dir, stream, history = self.run_dir, self.stream, self.history
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
