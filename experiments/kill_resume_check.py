"""kill -9 a 4-strategy sweep at random points, resume it each time, compare with an uninterrupted twin.

    python experiments/kill_resume_check.py [--kills 10] [--seed 0] [--workers 2] [--out DIR]

A twin sweep runs uninterrupted first. Then the same sweep is started again and again (with --resume after
the first kill): each time, once a run folder shows progress (a new config.yaml or checkpoint), the script
waits a seeded random delay and SIGKILLs the sweep's whole process group (parent and worker processes). After
the last kill a final --resume finishes the sweep, and every run's accuracy.csv, per_class.csv, matrices
and training losses are compared byte for byte with the twin's. Prints one line per kill and a summary.
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


def sweep_cmd(cfg: Path, out: Path, workers: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cltoolbox.cli", "sweep", str(cfg), "--out", str(out), "--workers", str(workers),
            *extra]


def progress_marks(out: Path) -> dict[str, int]:
    marks = {}
    for pattern in ("*/*/*/*/config.yaml", "*/*/*/*/checkpoint/state.pt"):
        for p in out.glob(pattern):
            try:
                marks[str(p)] = p.stat().st_mtime_ns
            except FileNotFoundError:
                pass
    return marks


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


def compare(twin: Path, killed: Path) -> tuple[int, list[str]]:
    import pandas as pd

    same, diffs = 0, []
    for d in sorted(p.parent for p in twin.rglob("DONE")):
        k = killed / d.relative_to(twin)
        bad = [f for f in COMPARED if not (k / f).exists() or (k / f).read_bytes() != (d / f).read_bytes()]
        cols = ["experience", "epoch", "step", "loss", "lr"]
        if not pd.read_csv(k / "train_log.csv")[cols].equals(pd.read_csv(d / "train_log.csv")[cols]):
            bad.append("train_log.csv losses")
        if bad:
            diffs.append(f"{d.relative_to(twin)}: {', '.join(bad)}")
        else:
            same += 1
    return same, diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
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

    t0 = time.perf_counter()
    subprocess.run(sweep_cmd(cfg, twin, args.workers, "-q", "--overwrite"), check=True)
    print(f"twin sweep ({len(CONFIG['strategy'])} strategies x {len(CONFIG['seeds'])} seeds, {args.workers} workers): "
          f"{time.perf_counter() - t0:.1f} s")

    kills, mid_run, logs, states = 0, 0, [], set()
    started = False
    while kills < args.kills:
        extra = ["--resume"] if started else ["--overwrite"]
        before = progress_marks(killed)
        proc = subprocess.Popen(sweep_cmd(cfg, killed, args.workers, *extra), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        started = True
        while proc.poll() is None and progress_marks(killed) == before:
            time.sleep(0.01)
        delay = rng.uniform(0, args.max_delay)
        time.sleep(delay)
        if proc.poll() is not None:
            logs.append(proc.stderr.read())
            print("the sweep finished before the kill: stopping")
            break
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep's own session: its parent and its workers
        proc.wait()
        logs.append(proc.stderr.read())
        kills += 1
        done, partial = state_of(killed)
        mid_run += bool(partial)
        states.update(partial)
        print(f"kill {kills:>2}: {delay:.2f} s after progress; {done} runs finished, unfinished: "
              f"{' '.join(partial) or '-'}")
    final = subprocess.run(sweep_cmd(cfg, killed, args.workers, "--resume"), capture_output=True, text=True)
    logs.append(final.stderr)
    if final.returncode != 0:
        print(final.stderr)
        return 1
    # distinct interrupted states (run@next experience) the resumes had to recover from
    resumed = sum(not x.endswith("@0") for x in states)
    restarted = sum(x.endswith("@0") for x in states)
    finished_lines = sum(len(re.findall(r"resumed at experience|restarted \(no checkpoint\)", log)) for log in logs)
    same, diffs = compare(twin, killed)
    total = len(list(twin.rglob("DONE")))
    print(f"summary: {kills} kills ({mid_run} left unfinished runs behind); {len(states)} distinct interrupted run "
          f"states: {resumed} continued from a checkpoint, {restarted} started again (killed before their first "
          f"checkpoint); {finished_lines} runs finished after a resume or restart; {same}/{total} runs byte-identical "
          "to the uninterrupted twin")
    for d in diffs:
        print(f"  DIFFERS {d}")
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
