"""Overhead of cltoolbox's `naive` strategy over a hand-written PyTorch loop doing exactly the same work.

Both sides train the cltoolbox MLP (2x400, identical init via ``torch.manual_seed(seed)``) on
Split-MNIST-5k (class_incremental, 5 experiences, fixed class order) with the same data order (one
``torch.Generator().manual_seed(seed)`` feeding ``torch.randperm`` per epoch), the same batches, a plain
SGD optimizer re-created for every experience, the same loss accumulation, and the same evaluation
(before training and after every experience: every test experience, class-IL and task-IL accuracy and
loss, in batches of ``eval_batch_size`` under ``torch.inference_mode``). The script asserts that both
sides produce identical accuracy and loss matrices (bit-for-bit), which proves they did the same work.

Two cltoolbox timings, each against the same hand loop:

* ``loop``: ``Learner.fit`` + ``evaluate_stream`` (what ``execute_run`` drives), model built, no files.
  The hand side times its model build + loop + evaluation.
* ``full``: ``cltoolbox.run(dict_config, out=tmpdir, overwrite=True, quiet=True)``, i.e. config
  validation, dataset load (tensor cache), stream build, the run folder (config.yaml, env.json, a
  checkpoint written and fsynced after every experience, CSVs, matrices, metrics.json, DONE). The hand
  side additionally times its dataset load (the same tensor cache) and class split.

The hand loop is the plain PyTorch idiom (``torch.optim.SGD``'s ``step``/``zero_grad``); cltoolbox's loop
updates plain SGD bit-identically without the optimizer's per-call machinery (``cltoolbox.optim.PlainSGD``),
so its ratio can be below 1x (measured 0.92x loop / 0.93x full run at batch 10 after that change).

The sides run interleaved in one process (cl, hand, hand, cl, ... per repeat) and the median of each is
reported, with process CPU time next to wall time. Both sides use one torch thread by default
(``--threads``): on a shared 2-core machine two intra-op threads made the same 400 steps take 14-41 s.
Run: ``python experiments/bench_overhead.py`` (``--help`` for options; ~1-2 min on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cltoolbox
from cltoolbox import config as cfgmod
from cltoolbox.build import build_model, build_plugins, build_stream
from cltoolbox.data import load_dataset
from cltoolbox.evaluate import History, evaluate_stream
from cltoolbox.loop import Learner

N_EXP = 5


def make_config(args: argparse.Namespace, batch_size: int, out: str) -> dict:
    return {
        "name": "bench_overhead",
        "scenario": {"name": "class_incremental", "dataset": "mnist5k", "n_experiences": N_EXP},
        "model": {"name": "mlp", "hidden": [400, 400]},
        "strategy": {"name": "naive"},
        "train": {"epochs": args.epochs, "batch_size": batch_size, "optimizer": "sgd", "lr": args.lr,
                  "eval_batch_size": args.eval_batch_size, "device": "cpu"},
        "seeds": [args.seed],
        "out": out,
    }


# -- cltoolbox side ------------------------------------------------------------------------------------
class Clock:
    """Wall time (perf_counter) and this process's CPU time (process_time) of a block."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def cl_loop(resolved: dict, stream, seed: int) -> tuple[tuple[float, float], torch.Tensor, torch.Tensor]:
    """Learner.fit + evaluate_stream, as execute_run drives them, without files."""
    run_cfg = cfgmod.run_config(resolved, resolved["strategy"][0], seed)
    clock = Clock()
    torch.manual_seed(seed)
    model = build_model(run_cfg, stream)
    learner = Learner(model, build_plugins(run_cfg["strategy"]), cfgmod.train_config(run_cfg), seed=seed)
    history = History(len(stream), stream.n_classes)
    learner.begin(stream)
    evaluate_stream(learner, stream, -1, history)
    learner.fit(stream, on_experience_end=lambda lrn, e: evaluate_stream(lrn, stream, e.index, history))
    return clock.stop(), history.accuracy, history.loss


def cl_full(config: dict) -> tuple[tuple[float, float], Path]:
    """cltoolbox.run into a fresh folder (a previous run there is removed before the clock starts)."""
    shutil.rmtree(config["out"], ignore_errors=True)
    clock = Clock()
    (summary,) = cltoolbox.run(config, quiet=True)
    return clock.stop(), Path(summary["run_dir"])


def read_accuracy_csv(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    acc = torch.full((N_EXP + 1, N_EXP, 2), float("nan"), dtype=torch.float64)
    loss = acc.clone()
    with open(run_dir / "accuracy.csv") as f:
        for r in csv.DictReader(f):
            i, j, s = int(r["trained_exp"]) + 1, int(r["eval_exp"]), ("class_il", "task_il").index(r["setting"])
            acc[i, j, s], loss[i, j, s] = float(r["accuracy"]), float(r["loss"])
    return acc, loss


# -- hand-written side ---------------------------------------------------------------------------------
def hand_split(data) -> list[tuple]:
    """Split-MNIST: experience i holds classes (2i, 2i+1); the task-IL mask is those two classes."""
    exps = []
    for i in range(N_EXP):
        cls = torch.tensor([2 * i, 2 * i + 1])
        tr, te = torch.isin(data.y_train, cls), torch.isin(data.y_test, cls)
        mask = torch.zeros(data.n_classes, dtype=torch.bool)
        mask[cls] = True
        exps.append((data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te], mask))
    return exps


def hand_loop(exps: list[tuple], seed: int, batch_size: int, epochs: int, lr: float,
              eval_bs: int) -> tuple[tuple[float, float], torch.Tensor, torch.Tensor]:
    clock = Clock()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(),
                          nn.Linear(400, 10))
    g = torch.Generator().manual_seed(seed)
    acc = torch.full((N_EXP + 1, N_EXP, 2), float("nan"), dtype=torch.float64)
    losses = acc.clone()

    def evaluate(row: int) -> None:
        model.eval()
        with torch.inference_mode():
            for j, (_, _, xte, yte, mask) in enumerate(exps):
                logits = torch.cat([model(xte[s : s + eval_bs]) for s in range(0, xte.shape[0], eval_bs)])
                for s, out in enumerate((logits, logits.masked_fill(~mask, float("-inf")))):
                    acc[row, j, s] = (out.argmax(1) == yte).double().mean().item()
                    losses[row, j, s] = F.cross_entropy(out, yte).item()
        model.train()

    evaluate(0)
    for i, (x, y, _, _, _) in enumerate(exps):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        n = y.shape[0]
        for _ in range(epochs):
            loss_sum, n_batches = torch.zeros(()), 0
            order = torch.randperm(n, generator=g)
            for s in range(0, n, batch_size):
                idx = order[s : s + batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                n_batches += 1
            if not math.isfinite(float(loss_sum) / n_batches):
                raise RuntimeError("diverged")
        evaluate(i + 1)
    return clock.stop(), acc, losses


def hand_full(seed: int, batch_size: int, epochs: int, lr: float, eval_bs: int):
    """The hand loop plus its data preparation (the same tensor cache cltoolbox reads)."""
    clock = Clock()
    exps = hand_split(load_dataset("mnist5k"))
    _, acc, loss = hand_loop(exps, seed, batch_size, epochs, lr, eval_bs)
    return clock.stop(), acc, loss


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


def bench(args: argparse.Namespace, batch_size: int, tmp: str) -> None:
    config = make_config(args, batch_size, str(Path(tmp) / f"bs{batch_size}"))
    resolved = cfgmod.validate(dict(config))
    data = load_dataset("mnist5k")
    stream = build_stream(resolved, data, args.seed)
    exps = hand_split(data)
    hargs = (args.seed, batch_size, args.epochs, args.lr, args.eval_batch_size)

    # warm-up (imports, registries, allocator) and the proof of identical work
    _, cl_acc, cl_loss = cl_loop(resolved, stream, args.seed)
    _, h_acc, h_loss = hand_loop(exps, *hargs)
    _, run_dir = cl_full(config)
    f_acc, f_loss = read_accuracy_csv(run_dir)
    assert same(cl_acc, h_acc) and same(cl_loss, h_loss), "loop: cltoolbox and hand loop differ"
    assert same(f_acc, h_acc) and same(f_loss, h_loss), "full run: accuracy.csv differs from the hand loop"
    hand_full(*hargs)

    t: dict[str, list[tuple[float, float]]] = {"cl_loop": [], "hand_loop": [], "cl_full": [], "hand_full": []}
    for r in range(args.repeats):
        runs = [("cl_loop", lambda: cl_loop(resolved, stream, args.seed)[0]),
                ("hand_loop", lambda: hand_loop(exps, *hargs)[0]),
                ("cl_full", lambda: cl_full(config)[0]),
                ("hand_full", lambda: hand_full(*hargs)[0])]
        order = runs if r % 2 == 0 else [runs[1], runs[0], runs[3], runs[2]]  # ABBA: no position bias
        for name, fn in order:
            t[name].append(fn())
    final = h_acc[-1, :, 0].mean().item()
    for mode, what in (("loop", "loop only: Learner.fit + evaluate_stream"),
                       ("full", "full run: cltoolbox.run writing a run folder")):
        cl_wall, hand_wall = (statistics.median(w for w, _ in t[f"{side}_{mode}"]) for side in ("cl", "hand"))
        cl_cpu, hand_cpu = (statistics.median(c for _, c in t[f"{side}_{mode}"]) for side in ("cl", "hand"))
        # each repeat ran both sides back to back: the median of those paired ratios resists load drift
        paired = statistics.median(c[0] / h[0] for c, h in zip(t[f"cl_{mode}"], t[f"hand_{mode}"], strict=True))
        print(f"batch_size={batch_size} cltoolbox={cl_wall:.3f}s hand={hand_wall:.3f}s "
              f"ratio: {cl_wall / hand_wall:.2f}x  [{what}; CPU-time ratio {cl_cpu / hand_cpu:.2f}x, "
              f"median paired wall ratio {paired:.2f}x]")
    spread = ", ".join(f"{k} {min(w for w, _ in v):.3f}-{max(w for w, _ in v):.3f}s" for k, v in t.items())
    print(f"  identical accuracy/loss matrices (final class-IL acc {final:.4f}); wall range: {spread}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 128])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--eval-batch-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=10, help="timed runs per side and mode (median reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for both sides (0: torch's default). 1 by default: on a shared "
                        "2-core machine two intra-op threads make every step wait for a busy core")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, epochs={args.epochs}, "
          f"repeats={args.repeats}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        for bs in args.batch_sizes:
            bench(args, bs, tmp)


if __name__ == "__main__":
    main()
