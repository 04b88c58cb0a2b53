"""Check Model Zoo on task-IL Split-MNIST-5k over 3 seeds against naive, ER (same memory) and Isolated.

Setting: task_incremental mnist5k, 5 experiences x 2 classes with task ids (multi-head), MLP 2x100, SGD lr 0.1,
batch 10, 3 epochs per experience (for every strategy; Model Zoo trains each member on its own experience's
data plus replay), memory 500 samples for ER and Model Zoo. Rows: naive, er (reservoir memory, its default),
er_class_balanced (the memory policy Model Zoo uses), isolated, model_zoo (defaults:
b = 5 tasks per member, so on 5 tasks every member replays all past tasks), model_zoo with b = 2 (one past
task per member, picked by the boosting rule), model_zoo with uniform averaging. Parity rows train naive and
ER on one MLP 2x400 (478k parameters), about the size of the final zoo of five 2x100 members (448k).

Criteria (mean task-IL ACC over the seeds): model_zoo > naive, model_zoo > er and model_zoo > er_class_balanced
(memory 500 for all).

Inference cost: Model Zoo's ``cost`` reports it (FlopCounterMode on one forward of a member, times the members
predict runs); for single-model strategies the same count is made here on one forward of the model.

Run: ``python experiments/model_zoo_check.py [--seeds 0 1 2] [--epochs 3] [--threads 1] [--out DIR]
[--write FILE.md]``; about a minute on one core. Exit status 1 if a criterion fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

import cltoolbox
from cltoolbox.models.mlp import mlp
from cltoolbox.strategies.model_zoo import forward_flops
from cltoolbox.tables import mean_std

MEMORY = 500
STRATEGIES = [
    {"name": "naive"},
    {"name": "er", "memory_size": MEMORY},
    {"name": "er", "memory_size": MEMORY, "policy": "class_balanced", "label": "er_class_balanced"},
    {"name": "isolated"},
    {"name": "model_zoo", "memory_size": MEMORY},
    {"name": "model_zoo", "memory_size": MEMORY, "tasks_per_model": 2, "label": "model_zoo_b2"},
    {"name": "model_zoo", "memory_size": MEMORY, "weighting": "samples", "label": "model_zoo_samples"},
]
PARITY = [{"name": "naive", "label": "naive_2x400"}, {"name": "er", "memory_size": MEMORY, "label": "er_2x400"}]


def model_flops(hidden: list[int]) -> float:
    return forward_flops(mlp((784,), 10, hidden=hidden), torch.zeros(1, 784))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (batch-10 MLPs run best on one)")
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--write", default=None, help="also write the table as markdown to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = {
        "name": "model_zoo_check",
        "scenario": {"name": "task_incremental", "dataset": "mnist5k", "n_experiences": 5},
        "train": {"epochs": args.epochs, "batch_size": 10, "optimizer": "sgd", "lr": 0.1},
        "seeds": args.seeds,
    }
    configs = [({**base, "model": {"name": "mlp", "hidden": [100, 100]}, "strategy": STRATEGIES}, [100, 100]),
               ({**base, "name": "model_zoo_check_parity", "model": {"name": "mlp", "hidden": [400, 400]},
                 "strategy": PARITY}, [400, 400])]
    runs: dict[str, list[dict]] = {}
    flops: dict[str, float] = {}
    widths: dict[str, str] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for config, hidden in configs:
            for r in cltoolbox.run(config, out=args.out or tmp, overwrite=True, quiet=True):
                label = r["labels"]["strategy"]
                runs.setdefault(label, []).append(r)
                widths[label] = f"{len(hidden)}x{hidden[0]}"
                cost = r["cost"]  # a single model's FLOPs unless the strategy reports an ensemble's
                flops[label] = cost["inference_flops_per_sample"] if "inference_flops_per_sample" in cost \
                    else model_flops(hidden)

    mean = {k: statistics.mean(r["task_il"]["acc"] for r in rs) for k, rs in runs.items()}
    title = (f"Task-IL Split-MNIST-5k (5 tasks x 2 classes, task ids given), SGD lr 0.1, {args.epochs} epoch(s), "
             f"batch 10, memory {MEMORY} for er/model_zoo, seeds {args.seeds}; torch {torch.__version__}, "
             f"{args.threads} thread(s), {time.perf_counter() - start:.0f} s")
    header = ("| strategy | model | task-IL ACC | task-IL ACC per seed | task-IL forgetting | class-IL ACC | "
              "params (all members) | forwards / test sample | inference MFLOPs / sample | memory items | "
              "memory KiB | train s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for k, rs in runs.items():
        c = rs[0]["cost"]
        params = int(c.get("ensemble_params", c["n_params"]))
        per_seed = " ".join(f"{r['task_il']['acc']:.3f}" for r in rs)
        lines.append(
            f"| {k} | MLP {widths[k]} | {mean_std([r['task_il']['acc'] for r in rs], 4)} | "
            f"{per_seed} | "
            f"{mean_std([r['task_il']['forgetting'] for r in rs], 4)} | "
            f"{mean_std([r['class_il']['acc'] for r in rs], 4)} | "
            f"{params:,} | {c.get('inference_forwards_per_sample', 1.0):.0f} | {flops[k] / 1e6:.3f} | "
            f"{c['memory_items']} | {c['memory_bytes'] / 1024:.0f} | "
            f"{statistics.mean(r['cost']['train_s'] for r in rs):.1f} |")
    checks = [("model_zoo > naive (task-IL ACC)", mean["model_zoo"] > mean["naive"]),
              (f"model_zoo > er, memory {MEMORY} both (task-IL ACC)", mean["model_zoo"] > mean["er"]),
              (f"model_zoo > er_class_balanced, memory {MEMORY} both (task-IL ACC)",
               mean["model_zoo"] > mean["er_class_balanced"])]
    verdicts = [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks]
    print(title)
    print("\n".join(lines))
    print()
    print("\n".join(verdicts))
    if args.write:
        with open(args.write, "w") as f:
            f.write(f"{title}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
