"""What the three trackers cost a run: the quickstart's ER seed 0 (MNIST-5k, 5 experiences, 2 epochs) without
trackers and with ``--loggers tensorboard wandb mlflow``, each in a fresh process; prints the run's own clocks
(metrics.json cost.wall_s / cpu_s, which include the per-epoch and per-row logging) and the whole process's
wall and CPU time (which add tracker imports, W&B's service process start, the figures and closing).

    python experiments/loggers_overhead.py [--out /tmp/cltoolbox_loggers]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/cltoolbox_loggers")
    args = ap.parse_args()
    rows = []
    for name, extra in (("no trackers", []), ("tensorboard+wandb+mlflow", ["--loggers", "tensorboard", "wandb",
                                                                          "mlflow"])):
        out = Path(args.out) / name.replace("+", "_").replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "cltoolbox.cli", "run", str(ROOT / "experiments" / "quickstart.yaml"), "--seeds",
               "0", "--out", str(out), "-q", "strategy=[{name: er, memory_size: 500}]", *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        cost = json.loads(next(out.glob("quickstart/er/*/seed_0/metrics.json")).read_text())["cost"]
        rows.append((name, cost["wall_s"], cost["cpu_s"], wall, cpu))
    print(f"{'':<26}{'run wall s':>11}{'run CPU s':>11}{'process wall s':>16}{'process CPU s':>15}")
    for name, rw, rc, pw, pc in rows:
        print(f"{name:<26}{rw:>11.1f}{rc:>11.1f}{pw:>16.1f}{pc:>15.1f}")
    print(f"{'difference':<26}{rows[1][1] - rows[0][1]:>11.1f}{rows[1][2] - rows[0][2]:>11.1f}"
          f"{rows[1][3] - rows[0][3]:>16.1f}{rows[1][4] - rows[0][4]:>15.1f}")


if __name__ == "__main__":
    main()
