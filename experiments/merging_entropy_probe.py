"""Is AdaMerging's objective (prediction entropy) a surrogate of class-IL accuracy on Split-MNIST-5k? With class-mean
heads it is not (AdaMerging trails task arithmetic); with ``--head-init orthogonal`` runs it is (AdaMerging leads).

Reads finished ``adamerging`` runs of experiments/merging_check.py (their checkpoints hold theta_0, the five task
vectors, the head rows and the learned coefficients) and, on the 1,000 test digits, scores merged models
theta_0 + lambda * sum of task vectors along task arithmetic's grid, and the model AdaMerging learned:

* class-IL and task-aware ACC (task-aware: each sample scored over its own experience's classes);
* ``H task``: the mean entropy of each test input's prediction over its own experience's classes, the quantity
  AdaMerging minimises (the paper's per-task heads);
* ``H seen``: the mean entropy over all ten classes (``entropy_over: seen``).

If entropy were a surrogate of class-IL accuracy, the lambda of lowest entropy would be the lambda of highest
class-IL accuracy. Test labels are used only to score, as in any evaluation.

    python experiments/merging_check.py --only adamerging --cache /tmp/maps.pt --out runs/merge [--head-init orthogonal]
    python experiments/merging_entropy_probe.py --cache /tmp/maps.pt runs/merge/merging_check/adamerging/*/seed_*
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from merging_check import embed
from torch.func import functional_call

from cltoolbox.models.lite0_tail import TailClassifier, split_lite0
from cltoolbox.models.pretrained import efficientnet_lite0_imagenet
from cltoolbox.runfolder import load_checkpoint
from cltoolbox.strategies.merging import CosineNet

GRID = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]


def entropy(z: torch.Tensor) -> torch.Tensor:
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


@torch.no_grad()
def score(net: CosineNet, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
          own: torch.Tensor) -> dict[str, float]:
    """ACC and entropies of ``net`` with the merged ``params`` (named as in the plugin's CosineNet) on inputs ``x``
    (``own``: each input's experience's classes as a boolean mask)."""
    logits = torch.cat([functional_call(net, params, (x[s : s + 250],)) for s in range(0, len(x), 250)])
    task = logits.masked_fill(~own, float("-inf"))
    return {"class_il": float((logits.argmax(1) == y).float().mean()),
            "task_aware": float((task.argmax(1) == y).float().mean()),
            "h_task": float(entropy(logits.masked_fill(~own, -1e4)).mean()),
            "h_seen": float(entropy(logits).mean())}


def merged(base: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]],
           coef) -> dict[str, torch.Tensor]:
    """``base`` with every merged tensor k at theta_0[k] + sum_j coef(j, k) * tau_j[k] (names as in CosineNet)."""
    out = dict(base)
    for k in theta0:
        out[k] = theta0[k] + sum(coef(j, k) * t[k] for j, t in enumerate(taus))
    return out


def _strategy_metrics(run: Path) -> dict:
    try:
        return json.loads((run / "metrics.json").read_text()).get("strategy", {})
    except (OSError, ValueError, AttributeError):
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="seed folders of finished adamerging runs")
    parser.add_argument("--cache", type=Path, default=None, help="the frozen part's outputs (as merging_check)")
    parser.add_argument("--tail-blocks", type=int, default=1)
    parser.add_argument("--resize", type=int, default=96)
    parser.add_argument("--head-scale", type=float, default=16.0)
    args = parser.parse_args()
    for run in args.runs:  # checked before the minutes of embedding
        if not (run / "DONE").exists() or "adamerging_coefficients" not in _strategy_metrics(run):
            print(f"error: {run}: not the seed folder of a finished adamerging run; run experiments/merging_check.py "
                  "--only adamerging --out DIR and pass DIR/merging_check/adamerging/*/seed_*", file=sys.stderr)
            sys.exit(2)
    data = embed(args.tail_blocks, args.resize, args.cache)
    x, y = data.x_test, data.y_test
    _, tail = split_lite0(efficientnet_lite0_imagenet(True), args.tail_blocks)
    model = TailClassifier(None, tail, data.n_classes, tuple(x.shape[1:]), args.resize)
    net = CosineNet(model, None, args.head_scale).eval()
    rows: dict[str, list[dict[str, float]]] = {}
    for run in args.runs:
        stream = json.loads((run / "stream.json").read_text())
        exp_of = torch.empty(data.n_classes, dtype=torch.long)
        for e in stream["experiences"]:
            exp_of[torch.as_tensor(e["classes"])] = e["index"]
        own = exp_of[y].unsqueeze(1) == exp_of.unsqueeze(0)  # [n, classes]: the input's experience's classes
        state = load_checkpoint(run / "checkpoint" / "state.pt")["learner"]
        model.load_state_dict(state["model"])
        plugin = state["plugins"][0]
        theta0, taus = plugin["theta0"], plugin["taus"]
        base = dict(net.state_dict())  # the head rows and BatchNorm statistics of the run
        for lam in GRID:
            params = merged(base, theta0, taus, lambda j, k, lam=lam: lam)
            rows.setdefault(f"task arithmetic, lambda {lam}", []).append(score(net, params, x, y, own))
        coefs = _strategy_metrics(run)["adamerging_coefficients"]
        last = max(r["merged_after"] for r in coefs)
        learned = {(r["task"], r["layer"]): r["coefficient"] for r in coefs if r["merged_after"] == last}
        params = merged(base, theta0, taus, lambda j, k, c=learned: c.get((j, k), c.get((j, "all"))))
        rows.setdefault("adamerging (learned coefficients)", []).append(score(net, params, x, y, own))
    print(f"Split-MNIST-5k test set, {len(args.runs)} run(s); mean over runs")
    print(f"{'merged model':<36} {'class-IL ACC':<13} {'task-aware ACC':<15} {'H task':<8} H seen")
    for name, scores in rows.items():
        mean = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
        print(f"{name:<36} {mean['class_il']:<13.3f} {mean['task_aware']:<15.3f} {mean['h_task']:<8.3f} "
              f"{mean['h_seen']:.3f}")
    grid = {k: v for k, v in rows.items() if k.startswith("task arithmetic")}
    means = {k: {m: sum(s[m] for s in v) / len(v) for m in v[0]} for k, v in grid.items()}
    best_acc = max(means, key=lambda k: means[k]["class_il"])
    low_h = min(means, key=lambda k: means[k]["h_task"])
    print(f"\nhighest class-IL ACC: {best_acc}; lowest per-task entropy (AdaMerging's objective): {low_h}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
