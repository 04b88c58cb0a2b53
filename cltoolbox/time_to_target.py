"""Time to target: the training cost until the model first reaches a target score on each experience.

The AlgoPerf view of training cost (Dahl et al. 2023, "Benchmarking Neural Network Training Algorithms"):
not the score after a fixed budget, but the budget needed to reach a fixed score. Config::

    train: {time_to_target: {target: 0.9, every: 50}}

While experience i trains, every ``every`` optimizer steps (counted from the experience's start) and once more
when its training ends, the model is scored on experience i's test set: class-IL accuracy (the strategy's own
inference, ``predict`` hooks included), or the mAP over the experience's classes on a multi-label stream. The
first check at or above ``target`` records the experience's cost so far:

- ``steps``: optimizer steps of the experience; ``samples``: training samples processed in them (replayed
  samples included: they cost compute too); ``cpu_s`` / ``wall_s``: this process's CPU time (all threads) and
  wall time since the experience's ``before_experience`` hooks started. **The checks' own time is excluded**
  from both clocks (it is reported apart, ``check_cpu_s``), so the figure does not depend on ``every``
  beyond its resolution.
- An experience whose checks never reach the target gets ``reached: false`` and ``null`` in all four fields
  (null, not 0: zero would read as "free"). The summary counts ``n_reached`` and sums the cost over the
  experiences that reached it.

Checks run in inference mode on the evaluation path and do not touch the learner's random generator, so a run
trains the same with or without them. ``cum_cpu_s`` / ``cum_samples`` per experience (the training cost up to
the end of that experience, checks excluded) feed ``cltoolbox report``'s figure of ACC against cumulative cost.
The observer is an internal plugin the learner appends when the config asks for it
(:func:`observer_for`), so the loop itself carries no code for it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cltoolbox.errors import ConfigError
from cltoolbox.plugin import Batch, Plugin

if TYPE_CHECKING:
    from cltoolbox.loop import Learner
    from cltoolbox.stream import Experience

FIELDS = ("steps", "samples", "cpu_s", "wall_s")


def parse(spec: Any, field: str = "train.time_to_target") -> tuple[float, int] | None:
    """(target, every) of a ``time_to_target`` mapping, or None when absent; ConfigError naming the key."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"{field}: expected a mapping like {{target: 0.9, every: 50}}, got {spec!r}")
    unknown = sorted(set(spec) - {"target", "every"})
    if unknown:
        raise ConfigError(f"{field}: unknown key '{unknown[0]}'; valid keys: target, every")
    target, every = spec.get("target"), spec.get("every", 50)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ConfigError(f"{field}.target: must be a score in (0, 1], got {target!r}; e.g. `target: 0.9`")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"{field}.every: must be an integer >= 1 (optimizer steps between checks), got {every!r}")
    return float(target), every


@torch.no_grad()
def experience_score(learner: Learner, exp: Experience) -> float:
    """Class-IL accuracy (multi-label: mAP over the experience's classes) of the model on ``exp``'s test set."""
    stream = learner.stream
    keys = stream.keys(exp.test)
    if len(keys) == 0:
        return float("nan")
    logits = learner.logits(keys, torch.full((len(keys),), exp.task_id, dtype=torch.long, device=keys.device))
    y = exp.test.y.to(logits.device)
    if stream.multi_label:
        from cltoolbox.multilabel import scores

        cls = torch.tensor(exp.classes, dtype=torch.long, device=logits.device)
        return scores(logits.float().index_select(1, cls), y.index_select(1, cls))["map"]
    return float((logits.argmax(1) == y).double().mean())


class TimeToTarget(Plugin):
    """The observer: checks every ``every`` steps and at the end of each experience; see the module docstring."""

    def __init__(self, target: float, every: int) -> None:
        self.target, self.every = target, every
        self.records: list[dict[str, Any]] = []
        self.check_cpu_s = 0.0
        self._cum_cpu, self._cum_wall, self._cum_samples = 0.0, 0.0, 0

    def before_experience(self, learner: Learner, exp: Experience) -> None:
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        self._excl_cpu = self._excl_wall = 0.0
        self._step0, self._samples, self._hit = learner.step, 0, None

    def after_step(self, learner: Learner, batch: Batch) -> None:
        self._samples += len(batch)
        if self._hit is None and (learner.step - self._step0) % self.every == 0:
            self._check(learner)

    def _elapsed(self) -> tuple[float, float]:
        return (time.process_time() - self._cpu0 - self._excl_cpu,
                time.perf_counter() - self._wall0 - self._excl_wall)

    def _check(self, learner: Learner) -> None:
        cpu, wall = self._elapsed()
        c0, w0 = time.process_time(), time.perf_counter()
        score = experience_score(learner, learner.experience)
        dc, dw = time.process_time() - c0, time.perf_counter() - w0
        self._excl_cpu += dc
        self._excl_wall += dw
        self.check_cpu_s += dc
        self._last_score = score
        if not math.isnan(score) and score >= self.target:
            self._hit = {"steps": learner.step - self._step0, "samples": self._samples, "cpu_s": cpu,
                         "wall_s": wall}

    def after_experience(self, learner: Learner, exp: Experience) -> None:
        if self._hit is None:  # a last check on the finished experience (steps need not be a multiple of every)
            self._check(learner)
        cpu, wall = self._elapsed()
        self._cum_cpu += cpu
        self._cum_wall += wall
        self._cum_samples += self._samples
        hit = self._hit or dict.fromkeys(FIELDS)
        self.records.append({"experience": exp.index, "reached": self._hit is not None, **hit,
                             "score_at_end_or_hit": self._last_score, "cum_cpu_s": self._cum_cpu,
                             "cum_wall_s": self._cum_wall, "cum_samples": self._cum_samples})

    def section(self) -> dict[str, Any]:
        """metrics.json's ``time_to_target``."""
        reached = [r for r in self.records if r["reached"]]
        return {
            "target": self.target, "every": self.every,
            "checks_excluded_from_timing": True, "check_cpu_s": self.check_cpu_s,
            "n_experiences": len(self.records), "n_reached": len(reached),
            **{f"total_{k}": (sum(r[k] for r in reached) if reached else None) for k in FIELDS},
            "per_experience": self.records,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records],
                "check_cpu_s": self.check_cpu_s, "cum": [self._cum_cpu, self._cum_wall, self._cum_samples]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.records = [dict(r) for r in state["records"]]
        self.check_cpu_s = float(state["check_cpu_s"])
        self._cum_cpu, self._cum_wall, self._cum_samples = state["cum"]


def observer_for(spec: Any) -> TimeToTarget | None:
    """The observer a ``train.time_to_target`` setting asks for (None when unset)."""
    parsed = parse(spec)
    return None if parsed is None else TimeToTarget(*parsed)


def section(learner: Learner) -> dict[str, Any] | None:
    """metrics.json's ``time_to_target`` for a learner that ran with the observer, else None."""
    obs = next((p for p in learner.plugins if isinstance(p, TimeToTarget)), None)
    if obs is None:
        return None
    metric = "map" if learner.stream is not None and learner.stream.multi_label else "accuracy"
    return {"metric": metric, **obs.section()}


# -- report figure ---------------------------------------------------------------------------------------
def _seen_acc_rows(run: Path) -> list[float]:
    """ACC after each experience (mean over the experiences trained so far) from accuracy_class_il.csv."""
    import csv

    with open(run / "matrices" / "accuracy_class_il.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    out = []
    for i, row in enumerate(rows[1:], start=1):
        vals = [float(v) for v in row[1 : 1 + i] if v != ""]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


def plot_cost_curves(paths: list[Path] | list[str], out: Path) -> list[Path]:
    """One figure per scenario: ACC after each experience against the cumulative training CPU seconds (checks
    excluded), one line per strategy (mean over seeds), for runs that recorded ``time_to_target``. The points
    where an experience first reached the target are ringed."""
    import json
    from collections import defaultdict

    import matplotlib.pyplot as plt
    import numpy as np

    from cltoolbox.report import save_figure
    from cltoolbox.results import find_runs

    groups: dict[str, dict[str, list[tuple[list[float], list[float], list[bool]]]]] = defaultdict(
        lambda: defaultdict(list))
    for run in find_runs(paths):
        try:
            m = json.loads((run / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        ttt = m.get("time_to_target")
        if not ttt or not ttt.get("per_experience"):
            continue
        acc = _seen_acc_rows(run)
        per = ttt["per_experience"]
        labels = m.get("labels", {})
        n = min(len(acc), len(per))
        groups[labels.get("scenario", "?")][labels.get("strategy", run.name)].append(
            ([p["cum_cpu_s"] for p in per[:n]], acc[:n], [bool(p["reached"]) for p in per[:n]]))
    paths_out: list[Path] = []
    for scenario, by_strategy in groups.items():
        fig, ax = plt.subplots(figsize=(3.4, 2.4), layout="constrained")
        for strategy, curves in by_strategy.items():
            n = min(len(c[0]) for c in curves)
            x = np.mean([c[0][:n] for c in curves], axis=0)
            y = np.mean([c[1][:n] for c in curves], axis=0) * 100
            reached = np.mean([c[2][:n] for c in curves], axis=0) >= 0.5
            line, = ax.plot(x, y, marker="o", markersize=3, linewidth=1, label=f"{strategy} ({len(curves)} seeds)")
            ax.scatter(x[reached], y[reached], s=40, facecolors="none", edgecolors=line.get_color(), linewidths=0.8)
        ax.set_xlabel("cumulative training CPU time (s)")
        ax.set_ylabel("ACC so far (%; mAP if multi-label)")
        ax.set_title(f"{scenario}: ACC vs training cost\n(ringed: target reached on that experience)", fontsize=7)
        ax.legend(frameon=False, fontsize=6)
        paths_out += save_figure(fig, Path(out), f"time_to_target_{scenario}")
    return paths_out
