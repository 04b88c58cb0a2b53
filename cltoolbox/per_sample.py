"""Exact per-sample gradient statistics: ``mean_n kind(d objective_n / d theta)`` over a data set, for
importance measures such as EWC's empirical Fisher (squares) and MAS's output sensitivity (absolute values).

Computed once per experience on its training data with the model in eval mode (dropout off, BatchNorm on
running statistics: the importance of the trained model, not of a noisy sub-network): matmuls for models
made of Linear layers, ``torch.func.vmap`` otherwise (see :func:`per_sample_mean`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn

from cltoolbox.flat import trained_parameters
from cltoolbox.models.cache import sample_keys

# Elements (samples x parameters) held at once by the per-sample gradient chunks (~128 MiB in float32).
CHUNK_ELEMENTS = 1 << 25


def _chunks(learner, data: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
    """(keys, inputs) of ``data`` ``size`` samples at a time: stream keys are fetched chunk by chunk
    (``learner.batches``), model-ready inputs are sliced (keys None)."""
    if torch.is_floating_point(data):
        for s in range(0, data.shape[0], size):
            yield None, data[s : s + size]
    else:
        yield from learner.batches(data, size)


def per_sample_mean(
    learner,
    data: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    objective: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    kind: Literal["square", "abs"],
    method: Literal["auto", "vmap"] = "auto",
) -> torch.Tensor:
    """``mean_n kind(d objective_n / d theta)`` as one flat vector (length P, ``trained_parameters`` order).

    ``data``: stream keys (int64; the samples are fetched a chunk at a time, never all at once) or model-ready
    inputs. ``objective(logits, t, y)`` returns one value per sample (shape ``(B,)``). Two exact computations:

    * models whose trained parameters all belong to ``nn.Linear`` layers (the MLPs): the per-sample
      gradient of a weight is the outer product g_n a_n^T of the layer's output gradient and input, and
      square and abs are multiplicative, so ``sum_n kind(g_n a_n^T) = kind(G)^T kind(A)``: one batched
      backward and one matmul per layer, no per-sample gradient is ever materialised;
    * any other model: ``torch.func.vmap`` over ``grad``, in chunks of samples (``method="vmap"`` forces it).

    The model is put in eval mode, so samples do not interact (BatchNorm uses running statistics).
    """
    model = learner.model
    named = trained_parameters(model)
    transform = torch.square if kind == "square" else torch.abs
    was_training = model.training
    model.eval()
    try:
        out = _linear_path(learner, named, data, t, y, objective, transform) if method == "auto" else None
        if out is None:
            out = _vmap_path(learner, named, data, t, y, objective, transform)
    finally:
        model.train(was_training)
    return out / max(1, data.shape[0])


def _linear_path(learner, named, data, t, y, objective, transform) -> torch.Tensor | None:
    """Sum over samples via per-layer matmuls, or None when the model is not made of plain Linear layers."""
    model = learner.model
    owner: dict[int, tuple[nn.Linear, str]] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for pname, p in module.named_parameters(recurse=False):
                owner[id(p)] = (module, pname)
    if not named or any(id(p) not in owner for _, p in named):
        return None
    layers = list(dict.fromkeys(owner[id(p)][0] for _, p in named))
    seen: dict[nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in layers}

    def capture(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen[module].append((inputs[0].detach(), output))

    sums = {id(p): torch.zeros_like(p) for _, p in named}
    # 4096 samples a chunk (the sums depend on the chunking), fewer for large inputs (a frozen ViT under a head)
    sample = math.prod(data.shape[1:] if torch.is_floating_point(data) else learner.stream.input_shape)
    chunk = min(4096, max(1, CHUNK_ELEMENTS // max(1, sample)))
    handles = [m.register_forward_hook(capture) for m in layers]
    try:
        for s, (keys, x) in zip(range(0, data.shape[0], chunk), _chunks(learner, data, chunk), strict=True):
            for m in layers:
                seen[m].clear()
            with torch.enable_grad(), sample_keys(keys, learner.stream):
                value = objective(model(x), t[s : s + chunk], y[s : s + chunk]).sum()
                # a layer used twice, or on inputs with extra dims, breaks the outer-product form
                if any(len(v) != 1 or v[0][0].dim() != 2 for v in seen.values()):
                    return None
                outs = [seen[m][0][1] for m in layers]
                grads = torch.autograd.grad(value, outs, allow_unused=True)
            for m, g in zip(layers, grads, strict=True):
                if g is None:
                    continue
                a, tg = transform(seen[m][0][0]), transform(g)
                if m.weight.requires_grad:
                    sums[id(m.weight)] += tg.T @ a
                if m.bias is not None and m.bias.requires_grad:
                    sums[id(m.bias)] += tg.sum(0)
    finally:
        for h in handles:
            h.remove()
    return torch.cat([sums[id(p)].reshape(-1) for _, p in named])


def _vmap_path(learner, named, data, t, y, objective, transform) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    model = learner.model
    params = {n: p.detach() for n, p in named}
    buffers = dict(model.named_buffers())
    n_params = sum(p.numel() for _, p in named)

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, ti: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return objective(logits, ti.unsqueeze(0), yi.unsqueeze(0)).sum()

    per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0))
    chunk = max(1, min(1024, CHUNK_ELEMENTS // max(1, n_params)))
    sums = {n: torch.zeros_like(p) for n, p in named}
    for s, (_, x) in zip(range(0, data.shape[0], chunk), _chunks(learner, data, chunk), strict=True):
        g = per_sample(params, x, t[s : s + chunk], y[s : s + chunk])
        for n in sums:
            sums[n] += transform(g[n]).sum(0)
    return torch.cat([sums[n].reshape(-1) for n, _ in named])
