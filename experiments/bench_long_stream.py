"""Does anything in a run grow with the stream length? Permuted-MNIST-5k, 100 experiences, `naive`.

One run through the real runner (``cltoolbox.run`` with a dict config, writing the run folder: checkpoint
after every experience, result files at the end). Each experience subsamples ``--train-samples`` (default
500) of the 4,000 training images (scenario ``train_samples``) so the run stays quick; every experience
keeps the full 1,000-image test set, so the evaluation after each experience tests 100 x 1,000 images and
should cost the same at experience 1 and 100.

Timing comes from thin wrappers installed by this script around ``Learner.train_experience`` (training),
``cltoolbox.session.evaluate_stream`` (evaluation), ``cltoolbox.session.atomic_write_bytes`` (the checkpoint
file write) and ``cltoolbox.session.RunSession.finish`` (result files); the per-experience "rest" (checkpoint
serialisation, progress bar) is the experience's wall time minus training and evaluation. Training time is
cross-checked with ``train_log.csv`` (samples / samples_per_s, the epoch loop alone). Process CPU time is
reported next to wall time: it is what to trust when other jobs share the machine. The default MLP is one
layer of 100 units and one torch thread, so the 10,000 test-experience evaluations fit in a minute or two.

Run: ``python experiments/bench_long_stream.py`` (``--help`` for options; ~1-3 min on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cltoolbox
from cltoolbox import session
from cltoolbox.loop import Learner


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


class Probe:
    """Wall-clock timestamps of the run's phases, recorded by wrappers around session/loop functions."""

    def __init__(self) -> None:
        self.train: list[float] = []  # per experience, wall seconds
        self.train_cpu: list[float] = []  # per experience, process CPU seconds (robust to a busy machine)
        self.eval: list[float] = []  # per call; [0] is the init row
        self.eval_cpu: list[float] = []
        self.exp_start: list[float] = []
        self.eval_end: list[float] = []
        self.ckpt_write: list[float] = []
        self.ckpt_bytes: list[int] = []
        self.finish = 0.0

    def install(self) -> list[tuple[object, str, object]]:
        saved = [(Learner, "train_experience", Learner.train_experience),
                 (session, "evaluate_stream", session.evaluate_stream),
                 (session, "atomic_write_bytes", session.atomic_write_bytes),
                 (session.RunSession, "finish", session.RunSession.finish)]
        train_experience, evaluate_stream, write, finish = (s[2] for s in saved)

        def timed_train(learner, exp):
            t0, c0 = time.perf_counter(), time.process_time()
            self.exp_start.append(t0)
            train_experience(learner, exp)
            self.train.append(time.perf_counter() - t0)
            self.train_cpu.append(time.process_time() - c0)

        def timed_eval(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            evaluate_stream(*args, **kwargs)
            t1 = time.perf_counter()
            self.eval.append(t1 - t0)
            self.eval_cpu.append(time.process_time() - c0)
            self.eval_end.append(t1)

        def timed_write(path, data):
            t0 = time.perf_counter()
            write(path, data)
            if Path(path).name == "state.pt":
                self.ckpt_write.append(time.perf_counter() - t0)
                self.ckpt_bytes.append(len(data))

        def timed_finish(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return finish(*args, **kwargs)
            finally:
                self.finish = time.perf_counter() - t0

        Learner.train_experience = timed_train
        session.evaluate_stream = timed_eval
        session.atomic_write_bytes = timed_write
        session.RunSession.finish = timed_finish
        return saved


def train_log_seconds(run_dir: Path, n_exp: int, n_samples: int) -> list[float]:
    """Seconds of the epoch loop per experience, from train_log.csv (samples / samples_per_s, summed)."""
    per = [0.0] * n_exp
    with open(run_dir / "train_log.csv") as f:
        for r in csv.DictReader(f):
            per[int(r["experience"])] += n_samples / float(r["samples_per_s"])
    return per


def report(name: str, xs: list[float], k: int = 10, unit: float = 1e3) -> float:
    first, last = mean(xs[:k]), mean(xs[-k:])
    ratio = last / first
    print(f"{name:<42} first{k} {first * unit:9.2f} ms   last{k} {last * unit:9.2f} ms   "
          f"ratio last{k}/first{k}: {ratio:.2f}x")
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiences", type=int, default=100)
    p.add_argument("--train-samples", type=int, default=500, help="scenario train_samples per experience")
    p.add_argument("--hidden", type=int, nargs="+", default=[100],
                   help="MLP widths (default one layer of 100: the 100x100 evaluations dominate otherwise)")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out", help="run folder root (default: a temporary folder, removed afterwards)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = {
        "name": "bench_long_stream",
        "scenario": {"name": "permuted", "dataset": "mnist5k", "n_experiences": args.experiences,
                     "train_samples": args.train_samples},
        "model": {"name": "mlp", "hidden": args.hidden},
        "strategy": {"name": "naive"},
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": args.lr, "device": "cpu"},
        "seeds": [0],
    }
    print(f"permuted mnist5k, {args.experiences} experiences x {args.train_samples} train samples "
          f"(1000 test each), naive, mlp {args.hidden}, batch {args.batch_size}, 1 epoch, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    # torch 2.x imports torch._dynamo (seconds) when the first optimizer is built; do it now so that
    # experience 1 is not charged with a one-time import (bench_startup.py measures that)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    probe = Probe()
    saved = probe.install()
    with tempfile.TemporaryDirectory(prefix="bench_long_") as tmp:
        out = args.out or tmp
        t0 = time.perf_counter()
        try:
            (summary,) = cltoolbox.run(config, out=out, overwrite=True, quiet=True)
        finally:
            for obj, attr, fn in saved:
                setattr(obj, attr, fn)
        wall = time.perf_counter() - t0
        run_dir = Path(summary["run_dir"])
        logged = train_log_seconds(run_dir, args.experiences, args.train_samples)
        files = {f.name: f.stat().st_size for f in run_dir.rglob("*") if f.is_file()}

    T = args.experiences
    evals = probe.eval[1:]  # after each experience
    # everything of experience i that is neither training nor evaluation: checkpoint, progress bar
    rest = [(probe.exp_start[i + 1] if i + 1 < T else probe.eval_end[-1]) - probe.exp_start[i] - probe.train[i]
            - evals[i] for i in range(T)]
    rest[-1] = float("nan")  # the last experience has no following start; measured below via checkpoint
    r_train = report("train per experience (wall)", probe.train)
    r_train_cpu = report("train per experience (CPU)", probe.train_cpu)
    report("  epoch loop (train_log.csv, wall)", logged)
    r_eval = report(f"eval per experience ({T} test exps, wall)", evals)
    r_eval_cpu = report(f"eval per experience ({T} test exps, CPU)", probe.eval_cpu[1:])
    report("checkpoint write (fsync) per exp", probe.ckpt_write)
    report("rest (state_dict, torch.save, bar)", rest[:-1])
    print(f"checkpoint size first/last: {probe.ckpt_bytes[0] / 2**20:.2f} / {probe.ckpt_bytes[-1] / 2**20:.2f} MiB")
    print(f"init evaluation {probe.eval[0]:.2f} s; result files at the end (_finish) {probe.finish:.2f} s; "
          f"per_class.csv {files.get('per_class.csv', 0) / 2**20:.1f} MiB")
    print(f"total wall {wall:.1f} s (train {sum(probe.train):.1f} s, eval {sum(probe.eval):.1f} s, "
          f"checkpoints {sum(probe.ckpt_write):.1f} s); final class-IL acc {summary['class_il']['acc']:.3f}")
    print(f"ratio last10/first10: {r_train:.2f}x train, {r_eval:.2f}x eval (wall); "
          f"{r_train_cpu:.2f}x train, {r_eval_cpu:.2f}x eval (CPU time); target <= 1.2")


if __name__ == "__main__":
    main()
