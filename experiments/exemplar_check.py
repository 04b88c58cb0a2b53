"""Check the exemplar class-IL strategies (er_ace, wa, bic, lucir, podnet, xder) and the expansion ones (der_expand,
foster, memo) on Split-MNIST-5k, 3 seeds; prints a table.

Offline class-IL: class_incremental mnist5k, 5 experiences x 2 classes, MLP 2x400, SGD (``--lr`` 0.1, no momentum
or weight decay by default), batch 10, ``--epochs`` epochs (default 1), memory 500 for every memory method; naive
and er for reference, and wa without its weight aligning (``wa_noalign``) as an ablation. Besides ACC
the table gives the final step's accuracy on the old classes (experiences 1-4) and on the new ones
(experience 5), each sample-weighted, and their gap new - old: the bias towards new classes that BiC and WA
exist to remove. Online class-IL: the ``online`` scenario of ``experiments/online_split_mnist5k.yaml`` (chunks
of 10, 10% blurry boundaries, hidden boundaries, one pass, batch 10), er vs er_ace, memory 500.

Criteria (on the mean over seeds): each of er_ace, wa, bic, lucir, podnet, xder, der_expand, foster, memo beats
naive by >= 0.25 class-IL ACC;
er_ace beats er online; bic and wa have a smaller |new - old| gap than er at the final step and an ACC no
lower than er's minus one standard deviation of er's.

Run: ``python experiments/exemplar_check.py [--seeds 0 1 2] [--epochs 1] [--lr 0.1] [--momentum 0] [--weight-decay 0]
[--threads 1] [--out DIR] [--skip-online] [--only LABEL ...]``; about 6 minutes on one core (``--only`` runs a
subset of rows, e.g. ``--only naive der_expand memo``). Exit status 1 if a criterion fails.
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

MEMORY = 500
OFFLINE = [{"name": "naive"}, {"name": "er", "memory_size": MEMORY}, {"name": "er_ace", "memory_size": MEMORY},
           {"name": "wa", "memory_size": MEMORY},
           {"name": "wa", "memory_size": MEMORY, "align": False, "label": "wa_noalign"},  # ablation: no aligning
           # ablation: softmax over all 10 outputs, as before mask_unseen (future classes' rows pushed to 0)
           {"name": "wa", "memory_size": MEMORY, "mask_unseen": False, "label": "wa_nomask"},
           {"name": "bic", "memory_size": MEMORY},
           {"name": "lucir", "memory_size": MEMORY}, {"name": "podnet", "memory_size": MEMORY},
           {"name": "xder", "memory_size": MEMORY}, {"name": "der_expand", "memory_size": MEMORY},
           {"name": "der_expand", "memory_size": MEMORY, "prune": True, "label": "der_prune"},  # DER w/ P
           {"name": "foster", "memory_size": MEMORY},
           # FOSTER with class weights that still differ at this budget (see strategies/foster.py)
           {"name": "foster", "memory_size": MEMORY, "beta1": 0.995, "beta2": 0.995, "label": "foster995"},
           {"name": "memo", "memory_size": MEMORY}]
ONLINE = [{"name": "er", "memory_size": MEMORY}, {"name": "er_ace", "memory_size": MEMORY}]
BEAT_NAIVE = ("er_ace", "wa", "bic", "lucir", "podnet", "xder", "der_expand", "foster", "memo")


def old_new(run: dict, out: Path) -> tuple[float, float]:
    """(old, new) sample-weighted class-IL accuracy after the last experience, from the run's accuracy.csv."""
    import pandas as pd

    lab = run["labels"]
    path = out / lab["experiment"] / lab["strategy"] / lab["scenario"] / f"seed_{lab['seed']}" / "accuracy.csv"
    acc = pd.read_csv(path).query("setting == 'class_il'")
    last = acc[acc.trained_exp == acc.trained_exp.max()]
    T = int(acc.trained_exp.max())
    parts = []
    for rows in (last[last.eval_exp < T], last[last.eval_exp == T]):
        parts.append(float((rows.accuracy * rows.n_samples).sum() / rows.n_samples.sum()))
    return parts[0], parts[1]


def params(cost: dict) -> str:
    """Parameters used at inference after the last experience (expansion methods: every extractor and the
    classifier; the others: the model), in thousands."""
    return f"{cost.get('expansion_params', cost['n_params']) / 1000:.0f}k"


def by_label(results: list[dict]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for r in results:
        runs.setdefault(r["labels"]["strategy"], []).append(r)
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (batch-10 MLPs run best on one)")
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--skip-online", action="store_true")
    ap.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                    help="run only these rows (labels as in the table, e.g. naive er wa; 'online' for the online "
                         "part); criteria on absent rows are skipped")
    args = ap.parse_args(argv)
    rows = [r for r in OFFLINE if args.only is None or r.get("label", r["name"]) in args.only]
    if not rows and "online" not in (args.only or []):
        ap.error(f"--only: none of {args.only} is a row; rows: {[r.get('label', r['name']) for r in OFFLINE]}")
    torch.set_num_threads(args.threads)
    train = {"epochs": args.epochs, "batch_size": 10, "optimizer": "sgd", "lr": args.lr, "momentum": args.momentum,
             "weight_decay": args.weight_decay}
    offline = {"name": "exemplar_check", "model": {"name": "mlp", "hidden": [400, 400]},
               "scenario": {"name": "class_incremental", "dataset": "mnist5k", "n_experiences": 5},
               "strategy": rows, "train": train, "seeds": args.seeds}
    online = {"name": "exemplar_check_online", "model": {"name": "mlp", "hidden": [400, 400]},
              "scenario": {"name": "online", "dataset": "mnist5k", "n_tasks": 5, "chunk_size": 10, "blur": 0.1,
                           "boundaries": False},
              "strategy": ONLINE, "train": {**train, "epochs": 1, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
              "seeds": args.seeds}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        runs = by_label(cltoolbox.run(offline, out=str(out), overwrite=True, quiet=True))
        gaps = {k: [old_new(r, out) for r in rs] for k, rs in runs.items()}
        skip_online = args.skip_online or (args.only is not None and "online" not in args.only)
        online_runs = {} if skip_online else by_label(cltoolbox.run(online, out=str(out), overwrite=True,
                                                                         quiet=True))

    acc = {k: [r["class_il"]["acc"] for r in rs] for k, rs in runs.items()}
    mean = {k: statistics.mean(v) for k, v in acc.items()}
    gap = {k: [n - o for o, n in v] for k, v in gaps.items()}
    print(f"Split-MNIST-5k class-IL, MLP 2x400, SGD lr {args.lr} momentum {args.momentum} weight decay "
          f"{args.weight_decay}, {args.epochs} epoch(s), batch 10, memory {MEMORY}, seeds {args.seeds}")
    header = (f"{'strategy':<10}{'ACC class-IL':>16}{'old (final)':>16}{'new (final)':>16}{'new - old':>16}"
              f"{'ACC task-IL':>16}{'memory KiB':>12}{'params':>10}{'train s':>9}")
    print(header)
    print("-" * len(header))
    for k, rs in runs.items():
        old, new = [o for o, _ in gaps[k]], [n for _, n in gaps[k]]
        print(f"{k:<10}{mean_std(acc[k]):>16}{mean_std(old):>16}{mean_std(new):>16}{mean_std(gap[k]):>16}"
              f"{mean_std([r['task_il']['acc'] for r in rs]):>16}{rs[0]['cost']['memory_bytes'] / 1024:>12.0f}"
              f"{params(rs[0]['cost']):>10}"
              f"{statistics.mean(r['cost']['train_s'] for r in rs):>9.1f}")
    checks = [(f"{k} >= naive + 0.25", mean[k] >= mean["naive"] + 0.25) for k in BEAT_NAIVE
              if k in mean and "naive" in mean]
    er_sd = statistics.stdev(acc["er"]) if len(acc.get("er", [])) > 1 else 0.0
    for k in ("bic", "wa"):
        if k in mean and "er" in mean:
            checks.append((f"{k}: |new - old| < er's",
                           abs(statistics.mean(gap[k])) < abs(statistics.mean(gap["er"]))))
            checks.append((f"{k}: ACC >= er's - 1 sd", mean[k] >= mean["er"] - er_sd))
    info = [(f"wa: aligning narrows its own gap (vs {k})",
             abs(statistics.mean(gap["wa"])) < abs(statistics.mean(gap[k])))
            for k in ("wa_noalign", "wa_nomask") if "wa" in gap and k in gap]
    if online_runs:
        on = {k: [r["class_il"]["acc"] for r in rs] for k, rs in online_runs.items()}
        print(f"\nOnline Split-MNIST-5k class-IL (chunks of 10, blur 0.1, hidden boundaries), one pass, batch 10, "
              f"memory {MEMORY}")
        for k, v in on.items():
            print(f"{k:<10}{mean_std(v):>16}")
        if "er_ace" in on and "er" in on:
            checks.append(("online: er_ace > er", statistics.mean(on["er_ace"]) > statistics.mean(on["er"])))
    print()
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    for name, ok in info:  # diagnostics, not criteria
        print(f"info  {name}: {ok}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
