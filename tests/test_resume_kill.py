"""kill -9 at random points, then --resume: the results are byte-identical to an uninterrupted twin run.

`cltoolbox run` runs in a subprocess; the test polls its run folder (the config appearing, then the checkpoint
changing), sleeps a seeded random delay and sends SIGKILL, three times in a row (each restart resumes the
previous one), then lets a last --resume finish. Every subprocess and the twin use one torch thread: the
thread count changes float summation order, and so the last bits.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import cltoolbox

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "name": "kill",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
    "model": {"name": "mlp", "hidden": [32]},
    "strategy": {"name": "er", "memory_size": 100},  # plugin state (memory) and sampling must survive the kill
    "train": {"epochs": 6, "batch_size": 16, "lr": 0.05},
    "seeds": [0],
}
COMPARED = ("accuracy.csv", "per_class.csv", "matrices/accuracy_class_il.csv", "matrices/accuracy_task_il.csv",
            "matrices/forgetting_class_il.csv", "matrices/forgetting_task_il.csv", "matrices/transfer_class_il.csv",
            "matrices/transfer_task_il.csv")
RUN = Path("kill/er/class_incremental-digits/seed_0")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def kill_at_random_point(argv: list[str], run_dir: Path, rng: random.Random, wait_for: str, max_delay: float,
                         cwd: Path, timeout: float = 120) -> bool:
    """Start ``cltoolbox`` with ``argv``; once it makes progress (``wait_for`` 'start': config.yaml written by a
    fresh start; 'checkpoint': a new checkpoint), wait a random delay and SIGKILL it. True if it was killed
    before it finished."""
    watched = run_dir / ("config.yaml" if wait_for == "start" else "checkpoint/state.pt")
    before = _mtime(watched)
    proc = subprocess.Popen([sys.executable, "-m", "cltoolbox.cli", *argv], env=_env(), cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and _mtime(watched) == before:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, max_delay))
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=timeout)
    if not killed:
        assert proc.returncode == 0, proc.stderr.read().decode()
    proc.stderr.close()
    return killed and not (run_dir / "DONE").exists()


@pytest.mark.slow
def test_three_kills_then_resume_is_byte_identical(tmp_path: Path) -> None:
    cfg_path = tmp_path / "kill.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the uninterrupted twin, in this process (one thread like the subprocesses)
        cltoolbox.run(str(cfg_path), out=str(tmp_path / "twin"), quiet=True)
    finally:
        torch.set_num_threads(threads)
    import pandas as pd

    log = pd.read_csv(tmp_path / "twin" / RUN / "train_log.csv")
    # one experience's training time (median: the first optimizer of a process pays a one-off import)
    per_exp = float((1400 / 5 / log.samples_per_s).groupby(log.experience).sum().median())

    run_dir = tmp_path / "killed" / RUN
    rng = random.Random(20240314)
    base = ["run", str(cfg_path), "--out", str(tmp_path / "killed"), "-q"]
    interrupted, at = [], []
    # kill 1 lands early (before the first checkpoint: the resume starts again), kills 2 and 3 after a
    # checkpoint, anywhere in the next 1.5 experiences (training, evaluation or the checkpoint write). Kill 1's
    # window is one experience's training: the process's one-off costs (torch._dynamo's import, ~1 s) are paid
    # before config.yaml is written now, so a fixed 1 s could miss the whole run
    plan = [("start", per_exp), ("checkpoint", 1.5 * per_exp), ("checkpoint", 1.5 * per_exp)]
    for k, (wait_for, max_delay) in enumerate(plan):
        interrupted.append(kill_at_random_point(base + (["--resume"] if k else []), run_dir, rng, wait_for,
                                                max_delay, cwd=tmp_path))
        ckpt = run_dir / "checkpoint" / "state.pt"
        at.append(int(torch.load(ckpt, weights_only=True)["next_experience"]) if ckpt.exists() else 0)
        if (run_dir / "DONE").exists():
            break
    # at least two kills interrupted the run, one of them after a checkpoint, before the end
    assert sum(interrupted) >= 2 and any(0 < a < 5 for a in at), f"kills too late: {interrupted}, at {at}"
    done = subprocess.run([sys.executable, "-m", "cltoolbox.cli", *base, "--resume"], env=_env(), capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "DONE").exists()

    twin_dir = tmp_path / "twin" / RUN
    for name in COMPARED:
        assert (run_dir / name).read_bytes() == (twin_dir / name).read_bytes(), f"{name} differs after the kills"
    cols = ["experience", "epoch", "step", "loss", "lr"]  # samples_per_s is a timing
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "train_log.csv")[cols],
                                  pd.read_csv(twin_dir / "train_log.csv")[cols])
