"""Check DER, DER++, GDumb and iCaRL on Split-MNIST-5k (class-IL) over 3 seeds; prints a table and verdicts.

Setting (as in tests/test_replay_strategies.py, which runs one seed): class_incremental mnist5k, 5
experiences x 2 classes, MLP 2x100, SGD lr 0.1, 1 epoch, batch 10, memory 500 for every memory method
(GDumb trains its memory for its own 10 epochs). ER is listed for reference. Criteria (on the mean over
seeds): each of der, derpp, gdumb, icarl beats naive by >= 0.25 class-IL ACC; gdumb >= 0.80; iCaRL's
nearest-mean classifier beats its own logits.

For scale, Avalanche 0.6.0 on MNIST-5k (MLP 2x100, 1 epoch, batch 10): naive 0.19, er 0.78, der 0.85,
gdumb 0.78.

Run: ``python experiments/replay_check.py [--seeds 0 1 2] [--hidden 100 100] [--threads 1] [--out DIR]``;
about a minute on one core. Exit status 1 if a criterion fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch

import cltoolbox
from cltoolbox.tables import mean_std

STRATEGIES = [
    {"name": "naive"},
    {"name": "er", "memory_size": 500},
    {"name": "der", "memory_size": 500},
    {"name": "derpp", "memory_size": 500},
    {"name": "gdumb", "memory_size": 500},
    {"name": "icarl", "memory_size": 500},
    {"name": "icarl", "memory_size": 500, "classifier": "logits", "label": "icarl_logits"},
]



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hidden", type=int, nargs="+", default=[100, 100])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (batch-10 MLPs run best on one)")
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = {
        "name": "replay_check",
        "scenario": {"name": "class_incremental", "dataset": "mnist5k", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": args.hidden},
        "strategy": STRATEGIES,
        "train": {"epochs": 1, "batch_size": 10, "optimizer": "sgd", "lr": 0.1},
        "seeds": args.seeds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = cltoolbox.run(config, out=args.out or tmp, overwrite=True, quiet=True)

    runs: dict[str, list[dict]] = {}
    for r in results:
        runs.setdefault(r["labels"]["strategy"], []).append(r)
    acc = {k: [r["class_il"]["acc"] for r in rs] for k, rs in runs.items()}
    mean = {k: statistics.mean(v) for k, v in acc.items()}

    print(f"Split-MNIST-5k class-IL, MLP {'x'.join(map(str, args.hidden))}, SGD lr 0.1, 1 epoch, batch 10, "
          f"memory 500, seeds {args.seeds}")
    header = (f"{'strategy':<14}{'ACC class-IL':>16}{'forgetting':>16}{'ACC task-IL':>16}{'memory items':>14}"
              f"{'memory KiB':>12}{'train s':>9}")
    print(header)
    print("-" * len(header))
    for k, rs in runs.items():
        c = rs[0]["cost"]
        fgt, task_il = [r["class_il"]["forgetting"] for r in rs], [r["task_il"]["acc"] for r in rs]
        print(f"{k:<14}{mean_std(acc[k]):>16}{mean_std(fgt):>16}"
              f"{mean_std(task_il):>16}{c['memory_items']:>14}{c['memory_bytes'] / 1024:>12.0f}"
              f"{statistics.mean(r['cost']['train_s'] for r in rs):>9.1f}")

    checks = [(f"{k} >= naive + 0.25", mean[k] >= mean["naive"] + 0.25) for k in ("der", "derpp", "gdumb", "icarl")]
    checks += [("gdumb >= 0.80", mean["gdumb"] >= 0.80),
               ("icarl (nme) > icarl_logits", mean["icarl"] > mean["icarl_logits"])]
    print()
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
