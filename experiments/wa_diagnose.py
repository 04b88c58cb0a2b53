"""Why WA's weight aligning narrows the old/new gap less than ER on Split-MNIST-5k at 1 epoch: measurements.

For each seed, on exemplar_check's setting (class_incremental mnist5k, 5 x 2 classes, MLP 2x400, SGD 0.1, batch 10,
memory 500, ``--epochs`` epochs), WA is trained and, at every incremental step, prints the mean weight norm of the
old and the new classes' rows of the output layer before aligning, gamma = old / new, and the old- and new-class
test accuracy just before and after aligning. After the last step, a diagnostic scan (on the test set, so not a
method, only a measurement of how much a scalar correction could do) scales the last task's rows by a further
factor g and prints old / new / sample-weighted accuracy for each g.

Reading: at 1 epoch the rows' norms barely differ (gamma ~ 0.96-1.01), so aligning changes little, while the scan
shows a further ~0.9 would balance old and new (and reach ~0.87 ACC): the bias towards the new classes is not in
the rows' norms but in how the adapted features align with them. At 5 epochs the new rows grow (gamma 0.87-0.93) and
aligning does its job (exemplar_check --epochs 5: WA's gap below ER's at the same ACC).

Run: ``python experiments/wa_diagnose.py [--seeds 0 1 2] [--epochs 1]``; about 5 s a seed and epoch on one core.
"""

from __future__ import annotations

import argparse
import sys

import torch

import cltoolbox.strategies  # noqa: F401 - registers the strategies
import cltoolbox.strategies.bias_correction as bc
from cltoolbox.data import load_dataset
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.models.mlp import mlp
from cltoolbox.registry import SCENARIOS, STRATEGIES


def old_new(learner: Learner, stream, upto: int) -> tuple[float, float]:
    """Sample-weighted class-IL accuracy on experiences < upto (old) and == upto (new)."""
    hits, counts = [0, 0], [0, 0]
    for e in stream.experiences[: upto + 1]:
        x = stream.fetch(stream.keys(e.test), learner.device)
        pred = learner.logits(x, torch.zeros(len(e.y_test), dtype=torch.long)).argmax(1).cpu()
        k = int(e.index == upto)
        hits[k] += int((pred == e.y_test.cpu()).sum())
        counts[k] += len(e.y_test)
    return hits[0] / max(1, counts[0]), hits[1] / counts[1]


def run_seed(seed: int, epochs: int) -> None:
    stream = SCENARIOS.get("class_incremental").factory(load_dataset("mnist5k"), seed, n_experiences=5)
    torch.manual_seed(seed)
    learner = Learner(mlp(stream.input_shape, stream.n_classes, hidden=[400, 400]),
                      STRATEGIES.get("wa").factory(memory_size=500),
                      TrainConfig(epochs=epochs, batch_size=10, lr=0.1, device="cpu"), seed=seed)
    step = {"i": 0}
    align = bc.align_weights

    def measured(head: torch.nn.Linear, old: torch.Tensor, new: torch.Tensor) -> float:
        norms = head.weight.detach().norm(dim=1)
        before = old_new(learner, stream, step["i"])
        gamma = align(head, old, new)
        after = old_new(learner, stream, step["i"])
        print(f"  step {step['i']}: mean norm old {float(norms[old].mean()):.3f} new {float(norms[new].mean()):.3f} "
              f"gamma {gamma:.3f} | old / new acc before aligning {before[0]:.3f} / {before[1]:.3f}, "
              f"after {after[0]:.3f} / {after[1]:.3f}")
        return gamma

    bc.align_weights = measured
    try:
        learner.begin(stream)
        for e in stream.experiences:
            step["i"] = e.index
            learner.train_experience(e)
    finally:
        bc.align_weights = align
    last = torch.tensor(sorted(stream.experiences[-1].y_train.unique().tolist()))
    head = learner.model.head
    w = head.weight.detach().clone()
    T = len(stream) - 1
    n_old, n_new = sum(e.n_test for e in stream.experiences[:T]), stream.experiences[T].n_test
    for g in (0.7, 0.8, 0.85, 0.9, 0.95, 1.0):
        with torch.no_grad():
            head.weight.copy_(w)
            head.weight[last] *= g
        o, n = old_new(learner, stream, T)
        print(f"  scan (test-set diagnostic) last task's rows x {g:.2f}: old {o:.3f} new {n:.3f} "
              f"ACC (sample-weighted) {(o * n_old + n * n_new) / (n_old + n_new):.3f}")
    with torch.no_grad():
        head.weight.copy_(w)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for seed in args.seeds:
        print(f"seed {seed}, {args.epochs} epoch(s):")
        run_seed(seed, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
