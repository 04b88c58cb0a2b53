"""Two ways around PyTorch's per-op cost on small CL models, measured against what cltoolbox does (neither wins;
kept as evidence for the speed notes in the README).

1. Fused MLP step. One SGD step of cltoolbox's ``mlp`` (hidden [100, 100], MNIST input) on a batch of
``--batch`` samples, two ways, interleaved in one process on the same data order:

* ``autograd``: ``model(x)``, cross-entropy, ``backward()``, a foreach SGD update (what the loop does);
* ``fused``: the same model's layers as ONE ``torch.autograd.Function`` whose backward writes the
  gradients in closed form (weight ``g^T h``, bias ``sum g``, ReLU mask), so autograd records three nodes
  (the function, log-softmax, NLL) instead of one per layer op.

It first checks that both give bit-identical gradients, then prints the median microseconds per step and
the ratio. On this 2-core CPU (one thread) autograd / fused was 1.02-1.05x at batch 10 and 0.99x at batch 128: the
custom function's Python overhead costs what the fewer autograd nodes save, so cltoolbox keeps plain
modules (which also keep module hooks and torch.func working).

2. GEM's memory gradients (one gradient per past experience at every step): one forward and backward per
experience (cltoolbox, as the paper) against one forward over all memories and one batched backward
(``autograd.grad(..., is_grads_batched=True)``, vmap over the experiences' loss weights). Same gradients to
float rounding; measured 3.1-3.5 ms per experience loop against 6.1-7.3 ms batched (4 x 100 samples).

Run: ``python experiments/bench_step_alternatives.py`` (``--batch``, ``--threads``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from cltoolbox.models.mlp import mlp


class FusedMLP(torch.autograd.Function):
    """Linear/ReLU stack: forward with addmm, backward in closed form (the gradients autograd computes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights_and_biases: torch.Tensor) -> torch.Tensor:
        n = len(weights_and_biases) // 2
        inputs, h = [], x
        for k in range(n):
            inputs.append(h)
            h = torch.addmm(weights_and_biases[2 * k + 1], h, weights_and_biases[2 * k].t())
            if k < n - 1:
                h = h.relu_()
        ctx.inputs, ctx.wb = inputs, weights_and_biases
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        wb, inputs = ctx.wb, ctx.inputs
        grads: list[torch.Tensor | None] = [None] * len(wb)
        for k in range(len(wb) // 2 - 1, -1, -1):
            grads[2 * k], grads[2 * k + 1] = g.t().mm(inputs[k]), g.sum(0)
            if k > 0:
                g = g.mm(wb[2 * k]).mul_(inputs[k] > 0)
        return (None, *grads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mlp((1, 28, 28), 10, hidden=[100, 100])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    wb = [t for m in linears for t in (m.weight, m.bias)]
    params = list(model.parameters())
    n = args.steps * args.batch
    x_all, y_all = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))

    def fused(x: torch.Tensor) -> torch.Tensor:
        return FusedMLP.apply(x.flatten(1), *wb)

    x, y = x_all[: args.batch], y_all[: args.batch]
    reference = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    candidate = torch.autograd.grad(F.cross_entropy(fused(x), y), params)
    assert all(torch.equal(a, b) for a, b in zip(reference, candidate, strict=True)), "gradients differ"

    def run(forward) -> float:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        for s in range(0, n, args.batch):
            idx = order[s : s + args.batch]
            loss = F.cross_entropy(forward(x_all.index_select(0, idx)), y_all.index_select(0, idx))
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                torch._foreach_add_(params, [p.grad for p in params], alpha=-0.01)
        return (time.perf_counter() - start) / args.steps * 1e6

    times: dict[str, list[float]] = {"autograd": [], "fused": []}
    run(model), run(fused)  # warm-up
    for _ in range(args.repeats):
        times["autograd"].append(run(model))
        times["fused"].append(run(fused))
    a, f = statistics.median(times["autograd"]), statistics.median(times["fused"])
    print(f"fused MLP step, batch {args.batch}, {args.threads} thread(s): gradients bit-identical; "
          f"autograd {a:.0f} us/step, fused {f:.0f} us/step, autograd / fused {a / f:.2f}x")
    gem_memory_gradients(model, params, args.repeats)


def gem_memory_gradients(model: nn.Module, params: list[torch.Tensor], repeats: int, tasks: int = 4,
                         per_task: int = 100) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, per_task, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (tasks, per_task), generator=gen)
    weights = torch.eye(tasks)

    def per_experience() -> torch.Tensor:
        return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            F.cross_entropy(model(x[k]), y[k]), params)]) for k in range(tasks)])

    def batched() -> torch.Tensor:
        losses = F.cross_entropy(model(x.flatten(0, 1)), y.flatten(), reduction="none").view(tasks, -1).mean(1)
        grads = torch.autograd.grad(losses, params, grad_outputs=weights, is_grads_batched=True)
        return torch.cat([g.reshape(tasks, -1) for g in grads], 1)

    a, b = per_experience(), batched()
    rel = float((a - b).norm() / a.norm())

    def timed(fn) -> float:
        start = time.perf_counter()
        for _ in range(20):
            fn()
        return (time.perf_counter() - start) / 20 * 1e3

    loop = [timed(per_experience) for _ in range(repeats)]
    vmap = [timed(batched) for _ in range(repeats)]
    lo, hi = statistics.median(loop), statistics.median(vmap)
    print(f"GEM memory gradients, {tasks} experiences x {per_task} samples: relative difference {rel:.1e}; "
          f"one backward per experience {lo:.2f} ms, batched {hi:.2f} ms, batched / loop {hi / lo:.2f}x")


if __name__ == "__main__":
    main()
