"""Check GEM, A-GEM and RER over 3 seeds on MNIST-5k; prints one table per experiment and the verdicts.

Runs the three experiment files next to this script (their settings are the source of truth):

* gem_split_mnist5k.yaml and rer_split_mnist5k.yaml: Split-MNIST-5k class-IL, 5 experiences x 2 classes,
  MLP 2x100, SGD lr 0.1, 1 epoch, batch 10, memory 500 in total (GEM/A-GEM: 100 per experience).
  Criteria (means over seeds): gem and rer each beat naive by >= 0.25 class-IL ACC; agem beats naive.
* agem_permuted_mnist5k.yaml: Permuted-MNIST-5k, 5 experiences, 1 epoch, batch 10; criterion: A-GEM's
  class-IL forgetting is below naive's.

For scale, Avalanche 0.6.0 on MNIST-5k, same Split-MNIST settings: naive 0.19, er 0.78, gem 0.87, agem 0.32.

Run: ``python experiments/gem_check.py [--seeds 0 1 2] [--threads 1] [--out DIR]``; a few minutes on one
core. Exit status 1 if a criterion fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import cltoolbox
from cltoolbox.tables import mean_std

HERE = Path(__file__).resolve().parent
EXPERIMENTS = ("gem_split_mnist5k.yaml", "rer_split_mnist5k.yaml", "agem_permuted_mnist5k.yaml")



def table(title: str, results: list[dict]) -> dict[str, dict[str, float]]:
    """Prints the mean ± std table of one experiment; returns per-strategy means of ACC and forgetting."""
    runs: dict[str, list[dict]] = {}
    for r in results:
        runs.setdefault(r["labels"]["strategy"], []).append(r)
    print(title)
    header = (f"{'strategy':<10}{'seeds':>6}{'ACC class-IL':>16}{'forgetting':>16}{'ACC task-IL':>16}"
              f"{'mem items':>10}{'mem KiB':>9}{'train s':>9}")
    print(header)
    print("-" * len(header))
    means = {}
    for k, rs in runs.items():
        acc = [r["class_il"]["acc"] for r in rs]
        fgt = [r["class_il"]["forgetting"] for r in rs]
        c = rs[0]["cost"]
        task_il = [r["task_il"]["acc"] for r in rs]
        print(f"{k:<10}{len(rs):>6}{mean_std(acc):>16}{mean_std(fgt):>16}{mean_std(task_il):>16}"
              f"{c['memory_items']:>10}{c['memory_bytes'] / 1024:>9.0f}"
              f"{statistics.mean(r['cost']['train_s'] for r in rs):>9.1f}")
        means[k] = {"acc": statistics.mean(acc), "forgetting": statistics.mean(fgt)}
    print()
    return means


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (batch-10 MLPs run best on one)")
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    means = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in EXPERIMENTS:
            results = cltoolbox.run(HERE / name, out=args.out or tmp, seeds=args.seeds, overwrite=True, quiet=True)
            title = f"{name} (seeds {args.seeds}): mean ± std"
            means[name.removesuffix(".yaml")] = table(title, results)

    split, rsplit, perm = (means[n.removesuffix(".yaml")] for n in EXPERIMENTS)
    checks = [
        ("gem >= naive + 0.25 (Split-MNIST class-IL ACC)", split["gem"]["acc"] >= split["naive"]["acc"] + 0.25),
        ("rer >= naive + 0.25 (Split-MNIST class-IL ACC)", rsplit["rer"]["acc"] >= rsplit["naive"]["acc"] + 0.25),
        ("agem > naive (Split-MNIST class-IL ACC)", split["agem"]["acc"] > split["naive"]["acc"]),
        ("agem forgets less than naive (Permuted-MNIST)",
         perm["agem"]["forgetting"] < perm["naive"]["forgetting"]),
    ]
    for label, ok in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {label}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
