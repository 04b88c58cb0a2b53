"""Power-law rehearsal vs sequential training on Permuted-MNIST-5k (3 seeds); prints a table and verdicts.

The qualitative claim of Gandhi et al. 2024 ("Catastrophic Interference is Mitigated in Naturalistic
Power-Law Learning Environments"): a model trained with plain SGD (no CL method) in an environment where
tasks recur with probability decaying as a power law of the time since they were last seen forgets less
than the same model trained on the tasks one after the other, for the same number of training steps.

Setting: scenario ``power_law`` on mnist5k, tasks = 5 seeded pixel permutations (domain-incremental),
50 experiences of 200 training samples each (task k introduced at step 10k), exponent 1.0; the control is
the same generator with ``rehearsal: false`` (each task trained in one block of 10 experiences: the same
50 x 200 samples, the same 1000 SGD steps). Strategy ``naive`` (fine-tuning), MLP 2x100, SGD lr 0.05,
1 epoch per experience, batch 10. Evaluation after every experience on the 5 tasks' test sets (1000
images each); metrics per task use the step at which the task was first trained (``first_seen``).
Forgetting (Chaudhry et al.: best accuracy on a task at any earlier step minus its final accuracy) is the
measure; BWT is not shown, as its reference (accuracy right after the first of a task's experiences) is
taken after a fraction of the task's training in both schedules.

Criteria (means over seeds): power-law forgetting < sequential forgetting, and power-law final ACC >
sequential final ACC; the forgetting criterion must also hold for every seed.

Run: ``python experiments/power_law_check.py [--seeds 0 1 2] [--exponent 1.0] [--threads 1] [--out DIR]``;
about a minute on one core. Exit status 1 if a criterion fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import pandas as pd
import torch

import cltoolbox
from cltoolbox.tables import mean_std


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--exponent", type=float, default=1.0)
    ap.add_argument("--n-tasks", type=int, default=5)
    ap.add_argument("--n-experiences", type=int, default=50)
    ap.add_argument("--samples", type=int, default=200, help="training samples per experience")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (batch-10 MLPs run best on one)")
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, rehearsal in (("power_law", True), ("sequential", False)):
            config = {
                "name": f"power_law_check_{label}",
                "scenario": {"name": "power_law", "dataset": "mnist5k", "n_tasks": args.n_tasks,
                             "n_experiences": args.n_experiences, "exponent": args.exponent,
                             "samples_per_experience": args.samples, "tasks": "permuted", "rehearsal": rehearsal},
                "model": {"name": "mlp", "hidden": [100, 100]},
                "strategy": {"name": "naive"},
                "train": {"epochs": 1, "batch_size": 10, "optimizer": "sgd", "lr": 0.05},
                "seeds": args.seeds,
            }
            results[label] = cltoolbox.run(config, out=args.out or tmp, overwrite=True, quiet=True)
            for r in results[label]:  # the per-task final accuracies, from the run folder
                R = pd.read_csv(f"{r['run_dir']}/matrices/accuracy_class_il.csv", index_col="trained_exp")
                r["final_per_task"] = R.to_numpy()[-1].tolist()

    print(f"Permuted-MNIST-5k, {args.n_tasks} tasks, {args.n_experiences} experiences x {args.samples} samples, "
          f"exponent {args.exponent}; naive, MLP 2x100, SGD lr 0.05, 1 epoch, batch 10; seeds {args.seeds}")
    header = f"{'schedule':<12}{'final ACC':>16}{'forgetting':>16}{'acc task 0':>16}{'train s':>9}"
    print(header)
    print("-" * len(header))
    for label, rs in results.items():
        print(f"{label:<12}{mean_std([r['class_il']['acc'] for r in rs]):>16}"
              f"{mean_std([r['class_il']['forgetting'] for r in rs]):>16}"
              f"{mean_std([r['final_per_task'][0] for r in rs]):>16}"
              f"{statistics.mean(r['cost']['train_s'] for r in rs):>9.1f}")
    print()
    for label, rs in results.items():
        for seed, r in zip(args.seeds, rs, strict=True):
            per = " ".join(f"{a:.3f}" for a in r["final_per_task"])
            print(f"{label:<12} seed {seed}: ACC {r['class_il']['acc']:.3f}  forgetting "
                  f"{r['class_il']['forgetting']:.3f}  final per task [{per}]")

    pl, sq = results["power_law"], results["sequential"]
    f_pl = [r["class_il"]["forgetting"] for r in pl]
    f_sq = [r["class_il"]["forgetting"] for r in sq]
    checks = [
        ("mean forgetting: power_law < sequential", statistics.mean(f_pl) < statistics.mean(f_sq)),
        ("forgetting: power_law < sequential for every seed", all(a < b for a, b in zip(f_pl, f_sq, strict=True))),
        ("mean final ACC: power_law > sequential",
         statistics.mean(r["class_il"]["acc"] for r in pl) > statistics.mean(r["class_il"]["acc"] for r in sq)),
    ]
    print()
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
