"""kill -9 a 4-strategy sweep at random points, resume it each time, compare with an uninterrupted twin.

    python experiments/kill_resume_check.py [--kills 10] [--early-kills 4] [--concurrent 3] [--seed 0]
                                            [--workers 2] [--out DIR]

A twin sweep runs uninterrupted first. Then the same sweep is started again and again (with --resume after
the first kill), in three kinds of rounds, in a seeded random order:

- ``progress``: once a run folder shows progress (a new config.yaml or checkpoint), wait a seeded random delay
  and SIGKILL the sweep's whole process group (parent and worker processes);
- ``early``: once a run starts (a new config.yaml), kill within 30% of one experience's training time, so the
  run dies before its first checkpoint. These rounds alternate --threads between 1 and 2, so a run restarted
  from scratch must take the thread count recorded in its env.json to end identical;
- ``concurrent``: a sweep --resume and a ``cltoolbox run --resume`` (seeds in another order) start together on
  the same folder, then both are killed.

Throughout, every DONE seen is watched: a finished run must never lose its DONE or be rewritten. After the last
kill, a ``run --resume`` and a ``sweep --resume`` finish the runs together, a last ``sweep --resume`` checks that
nothing is left, and every run's accuracy.csv, per_class.csv, matrices and training losses are compared byte
for byte with the twin's; no temporary file may remain. A run keeps the thread count it first started with
(recorded in env.json): one first started by a 2-thread round is compared with an uninterrupted run of its own
with those threads. Prints one line per round and a summary.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CONFIG = {
    "name": "kill_check",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
    "model": {"name": "mlp", "hidden": [32]},
    "strategy": [{"name": "naive"}, {"name": "er", "memory_size": 100}, {"name": "lwf"},
                 {"name": "derpp", "memory_size": 100}],
    "train": {"epochs": 16, "batch_size": 16, "lr": 0.05},
    "seeds": [0, 1, 2],
}
COMPARED = ("accuracy.csv", "per_class.csv", "matrices/accuracy_class_il.csv", "matrices/accuracy_task_il.csv",
            "matrices/forgetting_class_il.csv", "matrices/transfer_task_il.csv")


def sweep_cmd(cfg: Path, out: Path, workers: int, threads: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cltoolbox.cli", "sweep", str(cfg), "--out", str(out), "--workers", str(workers),
            "--threads", str(threads), *extra]


def run_cmd(cfg: Path, out: Path, threads: int, seeds: list[int], *extra: str) -> list[str]:
    return [sys.executable, "-m", "cltoolbox.cli", "run", str(cfg), "--out", str(out), "--threads", str(threads),
            "-q", "--seeds", *map(str, seeds), *extra]


def progress_marks(out: Path, checkpoints: bool = True) -> dict[str, int]:
    marks = {}
    patterns = ("*/*/*/*/config.yaml", "*/*/*/*/checkpoint/state.pt") if checkpoints else ("*/*/*/*/config.yaml",)
    for pattern in patterns:
        for p in out.glob(pattern):
            try:
                marks[str(p)] = p.stat().st_mtime_ns
            except FileNotFoundError:
                pass
    return marks


class Watch:
    """Every DONE seen must stay, with the same bytes: a finished run is never cleared nor run again. Also
    records the torch thread count each run first started with (its first env.json)."""

    def __init__(self, out: Path) -> None:
        self.out, self.seen, self.violations, self.threads = out, {}, [], {}

    def poll(self) -> None:
        import json

        for path, text in self.seen.items():
            try:
                now = Path(path).read_bytes()
            except FileNotFoundError:
                now = None
            if now != text and path not in self.violations:
                self.violations.append(path)
        for p in self.out.glob("*/*/*/*/DONE"):
            try:
                self.seen.setdefault(str(p), p.read_bytes())
            except FileNotFoundError:
                pass
        for p in self.out.glob("*/*/*/*/env.json"):
            run = str(p.parent.relative_to(self.out))
            if run not in self.threads:
                try:
                    self.threads[run] = json.loads(p.read_text())["torch_threads"]
                except (OSError, ValueError, KeyError):
                    pass


def state_of(out: Path) -> tuple[int, list[str]]:
    """(finished runs, 'label/seed@next_experience' of the unfinished ones)."""
    import torch

    done, partial = 0, []
    for cfg in sorted(out.glob("*/*/*/*/config.yaml")):
        d = cfg.parent
        if (d / "DONE").exists():
            done += 1
            continue
        ckpt = d / "checkpoint" / "state.pt"
        at = int(torch.load(ckpt, weights_only=True)["next_experience"]) if ckpt.exists() else 0
        partial.append(f"{d.parts[-3]}/{d.name}@{at}")
    return done, partial


def twins_with_other_threads(cfg: Path, root: Path, runs: dict[str, int]) -> dict[str, Path]:
    """An uninterrupted twin for each run that first started with another thread count (in a 2-thread round):
    ``cltoolbox run`` of that strategy and seed alone, with those threads. Returns run -> its twin's run folder."""
    twins = {}
    for run, n in sorted(runs.items()):
        _, label, _, seed = Path(run).parts
        one = {**CONFIG, "strategy": [s for s in CONFIG["strategy"] if s["name"] == label], "seeds": [int(seed[5:])]}
        path = root / f"twin_{label}_{seed}.yaml"
        path.write_text(yaml.safe_dump(one, sort_keys=False))
        out = root / f"twin_threads{n}"
        subprocess.run(run_cmd(path, out, n, one["seeds"], "--overwrite"), check=True)
        twins[run] = out / run
    return twins


def compare(twin: Path, killed: Path, other_twins: dict[str, Path]) -> tuple[int, list[str]]:
    import pandas as pd

    same, diffs = 0, []
    for run in sorted(str(p.parent.relative_to(twin)) for p in twin.rglob("DONE")):
        k, d = killed / run, other_twins.get(run, twin / run)
        bad = [f for f in COMPARED if not (k / f).exists() or (k / f).read_bytes() != (d / f).read_bytes()]
        cols = ["experience", "epoch", "step", "loss", "lr"]
        if not pd.read_csv(k / "train_log.csv")[cols].equals(pd.read_csv(d / "train_log.csv")[cols]):
            bad.append("train_log.csv losses")
        if bad:
            diffs.append(f"{run}: {', '.join(bad)}")
        else:
            same += 1
    return same, diffs


def per_experience_seconds(twin: Path) -> float:
    """Median training time of one experience in the twin (train_log has one row per epoch)."""
    import json

    import pandas as pd

    times = []
    for log in twin.rglob("train_log.csv"):
        exps = json.loads((log.parent / "stream.json").read_text())["experiences"]
        n_train = {e["index"]: e["n_train"] for e in exps}
        df = pd.read_csv(log)
        seconds = df.experience.map(n_train) / df.samples_per_s
        times.extend(seconds.groupby(df.experience).sum().tolist())
    times.sort()
    return times[len(times) // 2]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill(procs: list[subprocess.Popen], logs: list[str]) -> bool:
    """SIGKILL each process's session (its parent and its workers); True if any was still running."""
    alive = False
    for p in procs:
        if p.poll() is None:
            alive = True
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
        logs.append(p.stderr.read())
    return alive


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10, help="kills at a random point after progress")
    ap.add_argument("--early-kills", type=int, default=4, help="kills before a run's first checkpoint")
    ap.add_argument("--concurrent", type=int, default=3, help="rounds with a sweep and a run resuming together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-delay", type=float, default=1.0, help="seconds after progress is seen")
    ap.add_argument("--out", help="work folder (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="kill_resume_"))
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    twin, killed = root / "twin", root / "killed"
    rng = random.Random(args.seed)
    threads = 1  # the default of `run` and `sweep`; early rounds that start runs afresh alternate with 2

    t0 = time.perf_counter()
    subprocess.run(sweep_cmd(cfg, twin, args.workers, threads, "-q", "--overwrite"), check=True)
    per_exp = per_experience_seconds(twin)
    print(f"twin sweep ({len(CONFIG['strategy'])} strategies x {len(CONFIG['seeds'])} seeds, {args.workers} workers, "
          f"{threads} thread(s) per run): {time.perf_counter() - t0:.1f} s; one experience ~{per_exp:.2f} s")

    rounds = ["early"] * args.early_kills + ["progress"] * args.kills + ["concurrent"] * args.concurrent
    rng.shuffle(rounds)
    if "early" in rounds:  # the very first start is fresh: make it an early kill
        rounds.remove("early")
        rounds.insert(0, "early")
    watch = Watch(killed)
    logs: list[str] = []
    kills = early_hits = concurrent = 0
    states: set[str] = set()
    n_runs = len(CONFIG["strategy"]) * len(CONFIG["seeds"])
    for i, kind in enumerate(rounds):
        extra = ["--resume"] if i else ["--overwrite"]
        round_threads = threads if kind != "early" or i % 2 == 0 else 2  # another count for early resumes
        before = progress_marks(killed, checkpoints=kind != "early")
        procs = [start(sweep_cmd(cfg, killed, args.workers, round_threads, *extra))]
        if kind == "concurrent":
            seeds = list(CONFIG["seeds"])
            rng.shuffle(seeds)
            procs.append(start(run_cmd(cfg, killed, threads, seeds, "--resume")))
        while any(p.poll() is None for p in procs) and progress_marks(killed, checkpoints=kind != "early") == before:
            watch.poll()
            time.sleep(0.01)
        delay = rng.uniform(0, 0.3 * per_exp if kind == "early" else args.max_delay)
        end = time.monotonic() + delay
        while time.monotonic() < end:
            watch.poll()
            time.sleep(0.01)
        if not kill(procs, logs):
            print(f"round {i + 1} ({kind}): the processes finished before the kill: stopping")
            break
        kills += 1
        concurrent += kind == "concurrent"
        watch.poll()
        done, partial = state_of(killed)
        early_hits += kind == "early" and any(x.endswith("@0") for x in partial)
        states.update(partial)
        print(f"kill {kills:>2} ({kind}, {round_threads} thread(s){' + a run' if kind == 'concurrent' else ''}): "
              f"{delay:.2f} s after progress; {done}/{n_runs} runs finished, unfinished: {' '.join(partial) or '-'}")
        if done == n_runs:
            break
    # the runs finish with a `run --resume` and a `sweep --resume` working on the folder at the same time
    seeds = list(CONFIG["seeds"])
    rng.shuffle(seeds)
    procs = [start(sweep_cmd(cfg, killed, args.workers, threads, "--resume")),
             start(run_cmd(cfg, killed, threads, seeds, "--resume"))]
    while any(p.poll() is None for p in procs):
        watch.poll()
        time.sleep(0.01)
    kill(procs, logs)
    final = subprocess.run(sweep_cmd(cfg, killed, args.workers, threads, "--resume"), capture_output=True,
                           text=True)
    logs.append(final.stderr)
    watch.poll()
    if final.returncode != 0:
        print(final.stderr)
        return 1
    resumed = sum(not x.endswith("@0") for x in states)
    restarted = sum(x.endswith("@0") for x in states)
    finished_lines = sum(len(re.findall(r"resumed at experience|restarted \(no checkpoint\)", log)) for log in logs)
    other = {run: n for run, n in watch.threads.items() if n != threads}
    same, diffs = compare(twin, killed, twins_with_other_threads(cfg, root, other))
    total = len(list(twin.rglob("DONE")))
    leftovers = [p for p in killed.rglob("*") if ".tmp" in p.name]
    print(f"summary: {kills} kills ({early_hits} of the early kills caught a run before its first checkpoint, "
          f"{concurrent} with a sweep and a run resuming together); {len(states)} distinct interrupted run states: "
          f"{resumed} continued from a checkpoint, {restarted} started again; {finished_lines} sweep runs finished "
          f"after a resume or restart; {len(watch.violations)} finished runs lost or rewritten; "
          f"{len(leftovers)} temporary files left; {same}/{total} runs byte-identical to an uninterrupted twin "
          f"({len(other)} of them first started in a 2-thread round, with {sorted(set(other.values())) or '-'} "
          "threads: compared with a twin run with those threads)")
    for d in diffs:
        print(f"  DIFFERS {d}")
    for v in watch.violations:
        print(f"  FINISHED RUN CHANGED {v}")
    return 0 if same == total and not watch.violations and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
