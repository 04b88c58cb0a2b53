"""A 2-process gloo DDP quickstart vs 1 process (issue 12), 3 seeds, side by side.

    python experiments/ddp_check.py                      # experiments/quickstart.yaml, seeds 0 1 2, --nproc 2
    python experiments/ddp_check.py --seeds 0 --nproc 2

Each side is one ``cltoolbox run`` command (``--nproc N`` starts N gloo processes on CPU; train.batch_size is the
global batch, so both sides train on the same batches). Prints each strategy's class-IL ACC per seed and its
mean, the 2-process minus 1-process difference (the claim: within 2 points), and wall / CPU time per side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, out: Path, seeds: list[int], config: Path) -> tuple[float, float]:
    """(wall s, CPU s of the child processes) of one ``cltoolbox run``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "cltoolbox.cli", "run", str(config), "--out", str(out), "-q",
           "--seeds", *map(str, seeds), *(["--nproc", str(nproc)] if nproc > 1 else [])]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def accs(out: Path) -> dict[str, dict[int, float]]:
    res: dict[str, dict[int, float]] = {}
    for m in sorted(out.glob("*/*/*/seed_*/metrics.json")):
        strategy, seed = m.parts[-4], int(m.parts[-2].split("_")[1])
        res.setdefault(strategy, {})[seed] = json.loads(m.read_text())["class_il"]["acc"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "experiments" / "quickstart.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        t1 = run(1, one, args.seeds, args.config)
        tn = run(args.nproc, many, args.seeds, args.config)
        a, b = accs(one), accs(many)
    print(f"{'strategy':10} {'seed':>4} {'1 proc ACC':>11} {f'{args.nproc} proc ACC':>11}")
    for strategy in a:
        for seed in args.seeds:
            print(f"{strategy:10} {seed:>4} {a[strategy][seed]:11.4f} {b[strategy][seed]:11.4f}")
        m1, mn = statistics.mean(a[strategy].values()), statistics.mean(b[strategy].values())
        print(f"{strategy:10} mean {m1:11.4f} {mn:11.4f}   diff {100 * (mn - m1):+.2f} points "
              f"({'within' if abs(mn - m1) <= 0.02 else 'NOT within'} 2 points)")
    print(f"time: 1 process {t1[0]:.1f} s wall / {t1[1]:.1f} s CPU; {args.nproc} processes {tn[0]:.1f} s wall / "
          f"{tn[1]:.1f} s CPU (all ranks; gloo on one machine's CPUs, so no speed-up is expected here)")


if __name__ == "__main__":
    main()
