"""Parameter-importance regularisers: EWC, online EWC, Synaptic Intelligence and Memory Aware Synapses.

All four add a quadratic penalty ``strength * sum_i Omega_i (theta_i - theta*_i)^2`` that anchors the
parameters that mattered for past experiences; they differ in how the importance ``Omega`` is measured:

* EWC (Kirkpatrick et al. 2017): diagonal empirical Fisher after each experience, one penalty per
  past experience.
* online EWC (Schwarz et al. 2018): one running Fisher ``F <- gamma F + F_new`` and one anchor.
* SI (Zenke et al. 2017): the path integral of the task-loss gradient along the training trajectory.
* MAS (Aljundi et al. 2018): the sensitivity of the squared L2 norm of the output, unsupervised.

Implementation notes shared by all of them:

* Parameters are the model's ``requires_grad`` parameters in ``named_parameters`` order (frozen ones are
  excluded, BatchNorm affine weights are included, buffers such as running statistics are not).
  Importances and anchors are stored flattened: one vector of length P (number of trained scalars) per
  quantity, so a penalty is one ``torch.cat`` of the parameters plus a few elementwise ops per step.
* The penalty ``c * sum_i w_i (theta_i - a_i)^2`` is a custom autograd function (:class:`_WeightedSquare`):
  its value is computed with the same ops as the plain expression and its gradient is written in closed
  form, ``2 (c w) (theta - a)``, which is bit-for-bit what autograd derives through the cat, square, product
  and sum (tests/test_regularization.py checks it), without the cat's and the power's backward nodes and
  their temporaries (each op over P values costs ~12 us for a 2x100 MLP; the penalty's graph was ~1/3 of
  an EWC step). On CPU, for the loop's backward (grad_out == 1), ``2 c w`` is computed once per
  importance, not per step.
* Per-sample statistics (EWC's Fisher, MAS's importance) are computed exactly, once per experience, on
  the experience's training data, with the model in eval mode (dropout off, BatchNorm on running
  statistics: the importance of the trained model, not of a noisy sub-network); see
  :func:`per_sample_mean` (matmuls for Linear layers, ``torch.func.vmap`` otherwise).
* ``state_dict`` holds only tensors and numbers; ``memory_usage`` reports ``(0, bytes)``: 0 items
  because a regulariser stores no data samples (items count samples across the toolbox), bytes of the
  stored importances and anchors (each model-sized).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from cltoolbox.errors import ConfigError
from cltoolbox.models.cache import sample_keys
from cltoolbox.plugin import MASKED_LOGIT, Batch, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.gem import flat_grad

# Elements (samples x parameters) held at once by the per-sample gradient chunks (~128 MiB in float32).
_CHUNK_ELEMENTS = 1 << 25


# -- helpers -------------------------------------------------------------------------------------------
def trained_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a regulariser protects: every ``requires_grad`` parameter, in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_parameters(params: list[nn.Parameter]) -> torch.Tensor:
    """One vector of all parameters (differentiable: gradients flow back to each parameter)."""
    return torch.cat([p.reshape(-1) for p in params])


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
    chunk = min(4096, max(1, _CHUNK_ELEMENTS // max(1, sample)))
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
    chunk = max(1, min(1024, _CHUNK_ELEMENTS // max(1, n_params)))
    sums = {n: torch.zeros_like(p) for n, p in named}
    for s, (_, x) in zip(range(0, data.shape[0], chunk), _chunks(learner, data, chunk), strict=True):
        g = per_sample(params, x, t[s : s + chunk], y[s : s + chunk])
        for n in sums:
            sums[n] += transform(g[n]).sum(0)
    return torch.cat([sums[n].reshape(-1) for n, _ in named])


def _task_logits(learner, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Training logits as the loop sees them: masked to the sample's task in multi-head streams."""
    if learner.multi_head:
        return logits.masked_fill(~learner.task_mask[t], MASKED_LOGIT)
    return logits


def _check_nonneg(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ConfigError(f"strategy.{name}: must be >= 0, got {value}; 0 disables the penalty")


class _WeightedSquare(torch.autograd.Function):
    """``scale * (sum(weight * (theta - anchor)^2) [+ const])`` over the flattened parameters ``params``.

    The value uses the same ops, in the same order, as that expression on ``torch.cat`` of the parameters.
    The gradient is autograd's for it, written out: grad_out * scale, times weight (MulBackward), times
    2 (theta - anchor) (PowBackward of the square); for grad_out == 1 (the loop's backward) the factor
    2 * (scale * weight) is cached per importance tensor, as doubling is exact so the product rounds once
    either way. The gradient reaches each parameter as a view of one flat vector, as through CatBackward.
    """

    @staticmethod
    def forward(ctx, owner: _QuadraticPenalty, diff: torch.Tensor, weight: torch.Tensor, scale: float,
                const: torch.Tensor | None, *params: torch.Tensor) -> torch.Tensor:
        total = diff.square().mul_(weight).sum()  # = (weight * diff.square()).sum(), one temporary less
        if const is not None:
            total = total + const
        ctx.owner, ctx.weight, ctx.scale, ctx.diff = owner, weight, scale, diff
        ctx.shapes = [p.shape for p in params]
        return total * scale

    @staticmethod
    @once_differentiable  # the closed form is first order: a double backward raises instead of being wrong
    def backward(ctx, grad_out: torch.Tensor):
        factor = ctx.owner._scaled_weight(ctx.weight, ctx.scale, grad_out)
        flat = factor * ctx.diff
        grads, offset = [], 0
        for shape in ctx.shapes:
            n = shape.numel()
            grads.append(flat[offset : offset + n].view(shape))
            offset += n
        ctx.diff = ctx.weight = None
        return (None, None, None, None, None, *grads)


class _QuadraticPenalty(Plugin):
    """Shared machinery: the protected parameters (cached per model), their flattened values (computed once
    per step) and the penalty ``scale * sum_i w_i (theta_i - a_i)^2`` (:class:`_WeightedSquare`)."""

    def __init__(self) -> None:
        self._params: list[nn.Parameter] | None = None
        self._model: nn.Module | None = None
        self._flat: tuple[tuple, torch.Tensor] | None = None  # (step and version counters, theta)
        self._weight_cache: tuple[torch.Tensor, int, float, torch.Tensor] | None = None

    def params(self, learner) -> list[nn.Parameter]:
        if self._model is not learner.model:
            self._model = learner.model
            self._params = [p for _, p in trained_parameters(learner.model)]
        return self._params

    def theta(self, learner) -> torch.Tensor:
        return flat_parameters(self.params(learner))

    def flat_theta(self, learner) -> torch.Tensor:
        """The flattened parameters without autograd, computed once per step: reused while ``learner.step``
        and every parameter's version counter (bumped by in-place updates, the optimiser's included) are
        unchanged, i.e. between ``loss`` and ``after_backward`` of one step."""
        params = self.params(learner)
        key = (learner.step, *(p._version for p in params))
        if self._flat is None or self._flat[0] != key:
            with torch.no_grad():
                self._flat = (key, flat_parameters(params))
        return self._flat[1]

    def penalty(self, learner, weight: torch.Tensor, anchor: torch.Tensor, scale: float,
                const: torch.Tensor | None = None) -> torch.Tensor:
        """``scale * ((weight * (theta - anchor).square()).sum() [+ const])``, bit-identical in value and
        gradient to that expression on ``self.theta(learner)``."""
        return self.penalty_at(learner, self.flat_theta(learner) - anchor, weight, scale, const)

    def penalty_at(self, learner, diff: torch.Tensor, weight: torch.Tensor, scale: float,
                   const: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`penalty` for a precomputed ``diff = theta - anchor`` of this step (SI reuses it)."""
        return _WeightedSquare.apply(self, diff, weight, scale, const, *self.params(learner))

    def _scaled_weight(self, weight: torch.Tensor, scale: float, grad_out: torch.Tensor) -> torch.Tensor:
        """``2 * ((grad_out * scale) * weight)``, the gradient factor of :class:`_WeightedSquare`."""
        if grad_out.device.type != "cpu" or float(grad_out) != 1.0:
            return 2 * ((grad_out * scale) * weight)
        c = self._weight_cache
        if c is None or c[0] is not weight or c[1] != weight._version or c[2] != scale:
            k = 2 * ((torch.ones((), dtype=grad_out.dtype) * scale) * weight)
            self._weight_cache = c = (weight, weight._version, scale, k)
        return c[3]

    def _check_size(self, learner, stored: torch.Tensor) -> None:
        n = sum(p.numel() for p in self.params(learner))
        if stored.shape[-1] != n:
            raise RuntimeError(f"{type(self).__name__}: stored importance has {stored.shape[-1]} entries but the "
                               f"model has {n} trained parameters; the model changed after the checkpoint")


class _ImportancePenalty(_QuadraticPenalty):
    """One consolidated importance ``omega`` and one ``anchor`` (SI, MAS): their checkpoint and memory."""

    omega: torch.Tensor | None
    anchor: torch.Tensor | None

    def state_dict(self) -> dict[str, Any]:
        return {"omega": self.omega, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.omega, self.anchor = state["omega"], state["anchor"]

    def memory_usage(self) -> tuple[int, int]:
        return 0, tensor_bytes(self.omega, self.anchor)


# -- EWC and online EWC --------------------------------------------------------------------------------
def empirical_fisher(learner, data: torch.Tensor, y: torch.Tensor, task_id: int) -> torch.Tensor:
    """Diagonal empirical Fisher: mean over samples of the squared per-sample gradient of log p(y|x).
    ``data``: stream keys or model-ready inputs (see :func:`per_sample_mean`).

    Per sample, not per mini-batch: the Fisher is an expectation of squared per-sample score vectors; the
    square of a mini-batch mean gradient is smaller by roughly the batch size (cross-sample terms cancel)
    and so changes the scale that lambda multiplies. :func:`per_sample_mean` keeps the exact version cheap
    (for the MLPs: one batched backward and one matmul per layer; 4000 MNIST images take well under 1 s).
    """
    t = torch.full_like(y, task_id)

    def nll(logits: torch.Tensor, ti: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_task_logits(learner, logits, ti), yi, reduction="none")

    return per_sample_mean(learner, data, t, y, nll, "square")


class EWCPlugin(_QuadraticPenalty):
    """EWC (``online=False``: one Fisher and anchor row per past experience) or online EWC (one row)."""

    def __init__(self, ewc_lambda: float, online: bool, gamma: float = 1.0) -> None:
        super().__init__()
        self.ewc_lambda = ewc_lambda
        self.online = online
        self.gamma = gamma
        self.fisher: torch.Tensor | None = None  # (K, P): K past experiences (EWC) or 1 (online EWC)
        self.anchor: torch.Tensor | None = None  # (K, P)
        self._collapsed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # derived, see loss

    def loss(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor | float:
        if self.fisher is None or self.ewc_lambda == 0:
            return 0.0
        # sum_k F_k (theta - theta*_k)^2 = F (theta - m)^2 + c with F = sum_k F_k and m the F-weighted mean
        # anchor: the K separate penalties of the original, exactly, at the cost of one (O(P), not O(K P))
        if self._collapsed is None:
            self._collapsed = self._collapse()
        f_sum, mean, const = self._collapsed
        return self.penalty(learner, f_sum, mean, 0.5 * self.ewc_lambda, const)

    def _collapse(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f_sum = self.fisher.sum(0)
        weighted = (self.fisher * self.anchor).sum(0)
        mean = torch.where(f_sum > 0, weighted / f_sum.clamp_min(1e-30), torch.zeros_like(f_sum))
        const = (self.fisher * (self.anchor - mean).square()).sum()
        return f_sum, mean, const

    def after_experience(self, learner, exp) -> None:
        fisher = empirical_fisher(learner, learner.stream.keys(exp.train), exp.y_train, exp.task_id).unsqueeze(0)
        anchor = self.theta(learner).detach().clone().unsqueeze(0)
        if self.fisher is None:
            self.fisher, self.anchor = fisher, anchor
        elif self.online:
            self.fisher, self.anchor = self.gamma * self.fisher + fisher, anchor
        else:
            self.fisher = torch.cat((self.fisher, fisher))
            self.anchor = torch.cat((self.anchor, anchor))
        self._collapsed = None

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher, self.anchor = state["fisher"], state["anchor"]
        self._collapsed = None

    def memory_usage(self) -> tuple[int, int]:
        return 0, tensor_bytes(self.fisher, self.anchor)


@register_strategy("ewc")
def ewc(ewc_lambda: float = 3.0) -> list[Plugin]:
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017): per-experience Fisher-weighted anchors.

    After each experience, stores the diagonal empirical Fisher F_k (mean over the experience's training
    samples of squared per-sample gradients of log p(y|x), with the true labels) and the parameters
    theta*_k; training then minimises CE + ewc_lambda/2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2, one
    separate penalty per past experience as in the paper (memory grows by 2 model sizes per experience).

    Default ewc_lambda=3: the paper tunes lambda per benchmark and gives no universal value; 3 is the best
    of {1, 3, 10} tuned here on Permuted-MNIST-5k with the toolbox's default optimiser (2x100 MLP, SGD
    lr 0.1, batch 10; experiments/regularization_check.py). Stability: with plain SGD the penalty alone
    diverges once lr * ewc_lambda * max_i sum_k F_k,i > 2 (per-sample Fisher entries reach ~1 for MNIST
    MLPs), so lambda=30 already diverges at lr 0.1 on that benchmark; the large lambdas (100-10000) seen in
    the literature go with lr ~1e-3 or Adam.
    """
    _check_nonneg("ewc_lambda", ewc_lambda)
    return [EWCPlugin(ewc_lambda, online=False)]


@register_strategy("online_ewc")
def online_ewc(ewc_lambda: float = 3.0, gamma: float = 1.0) -> list[Plugin]:
    """Online EWC (Schwarz et al. 2018, Progress & Compress): one running Fisher and one anchor.

    After each experience: F <- gamma * F + F_new (F_new: the per-sample empirical Fisher, as in ewc) and
    theta* <- the current parameters; the penalty is ewc_lambda/2 * sum_i F_i (theta_i - theta*_i)^2, so
    memory stays at 2 model sizes. gamma < 1 lets old experiences fade.

    Defaults: gamma=1.0 (no decay; P&C tunes gamma per domain, 1.0 is the common benchmark default, e.g.
    van de Ven et al.'s continual-learning code); ewc_lambda=3 as for ewc (no universal value in the
    paper; on Permuted-MNIST-5k with SGD lr 0.1, 10 was best here and 30 diverged: with gamma=1 the
    running Fisher grows with every experience, so the default keeps a margin below the SGD stability
    limit lr * ewc_lambda * max_i F_i < 2).
    """
    _check_nonneg("ewc_lambda", ewc_lambda)
    if not 0 < gamma <= 1:
        raise ConfigError(f"strategy.gamma: must be in (0, 1], got {gamma}; 1 keeps every past Fisher in full")
    return [EWCPlugin(ewc_lambda, online=True, gamma=gamma)]


# -- Synaptic Intelligence -----------------------------------------------------------------------------
class SIPlugin(_ImportancePenalty):
    """Path-integral importance (see :func:`si`).

    Per step: after_backward stores the task-loss gradient g (p.grad minus the gradient of our own penalty,
    which is known in closed form) and the parameters; after_step adds -g * (theta_after - theta_before),
    the actual change of the step, whatever the optimiser (momentum, Adam, weight decay) did.

    Every snapshot is a copy (``torch.cat`` allocates). Avalanche 0.6.0's SI stores its snapshots with
    ``param.detach().cpu().flatten()``, which on a CPU model is a view of the live parameter: the step's
    delta and theta - theta* read 0, so its penalty is exactly 0 and it reproduces naive; it also clips
    the importance at 1e-3. tests/test_regularization.py checks that ours is active and changes results.
    """

    def __init__(self, si_c: float, xi: float) -> None:
        super().__init__()
        self.si_c = si_c
        self.xi = xi
        self.omega: torch.Tensor | None = None  # (P,) consolidated importance Omega
        self.anchor: torch.Tensor | None = None  # (P,) parameters at the end of the last experience
        self._start: torch.Tensor | None = None  # parameters at the start of this experience
        self._path: torch.Tensor | None = None  # running path integral omega of this experience
        self._grad: torch.Tensor | None = None
        self._before: torch.Tensor | None = None
        self._correction: tuple | None = None  # (Omega, 2 si_c Omega), computed once per experience
        self._diff: tuple[torch.Tensor, torch.Tensor] | None = None  # (theta, theta - anchor) of this step's penalty

    def before_experience(self, learner, exp) -> None:
        theta = self.theta(learner).detach()
        if self.omega is not None:
            self._check_size(learner, self.omega)
        self._start = theta.clone()
        self._path = torch.zeros_like(theta)

    def loss(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor | float:
        if self.omega is None or self.si_c == 0:
            return 0.0
        theta = self.flat_theta(learner)
        self._diff = (theta, theta - self.anchor)  # reused by the gradient correction in after_backward
        return self.penalty_at(learner, self._diff[1], self.omega, self.si_c)

    @torch.no_grad()
    def after_backward(self, learner, batch: Batch) -> None:
        params = self.params(learner)
        theta = self.flat_theta(learner)  # computed by this step's loss when the penalty is on
        grad = flat_grad(params)  # a copy: a later plugin may edit p.grad in place (gradient surgery)
        if self.omega is not None and self.si_c != 0:
            # the importance measures the task loss's path integral (Zenke et al.'s "unregularised"
            # gradient), so our own penalty's gradient 2c Omega (theta - theta*) is removed; 2c Omega is
            # computed once per experience, theta - theta* comes from this step's penalty
            if self._correction is None or self._correction[0] is not self.omega:  # a new Omega each experience
                self._correction = (self.omega, 2 * self.si_c * self.omega)
            d = self._diff  # theta - theta* of this step's penalty, when it ran on this theta
            diff = d[1] if d is not None and d[0] is theta else theta - self.anchor
            grad -= self._correction[1] * diff
        self._grad, self._before = grad, theta

    @torch.no_grad()
    def after_step(self, learner, batch: Batch) -> None:
        # flat vectors rather than torch._foreach_* over the parameter tensors: on CPU the per-tensor
        # dispatch of the foreach ops cost more than the concatenation saves (measured for a 2x100 MLP).
        # path -= grad * (theta_after - theta_before); theta_after is cached for the next step's penalty
        self._path -= (self.flat_theta(learner) - self._before).mul_(self._grad)

    @torch.no_grad()
    def after_experience(self, learner, exp) -> None:
        theta = self.theta(learner).detach().clone()
        new = self._path / ((theta - self._start).square() + self.xi)
        # summed over experiences and clipped at 0, as the authors' code does (a negative importance would
        # push parameters away from the anchor)
        self.omega = (new if self.omega is None else self.omega + new).clamp_(min=0)
        self.anchor = theta
        self._start = self._path = self._grad = self._before = self._diff = None


@register_strategy("si")
def si(si_c: float = 0.1, xi: float = 0.1) -> list[Plugin]:
    """Synaptic Intelligence (Zenke et al. 2017): importance from each parameter's path integral.

    During an experience, omega_i accumulates -g_i * delta_i over the optimiser steps (g: task-loss
    gradient before the step, delta: the step's actual parameter change). At its end,
    Omega_i += omega_i / (Delta_i^2 + xi) with Delta_i the parameter's total change over the experience
    (Omega summed over experiences, clipped at 0); training then minimises
    CE + si_c * sum_i Omega_i (theta_i - theta*_i)^2 with theta* the parameters at the last experience end.

    Defaults si_c=0.1, xi=0.1: the paper's Permuted-MNIST values (its code: xi=0.1, c swept up to 0.1);
    si_c=0.1 was also the best of {0.03, 0.1, 0.3} here on Permuted-MNIST-5k with SGD lr 0.1 (0.3
    diverged). For Split-MNIST the paper uses si_c=1, xi=1e-3 (experiments/si_task_split_mnist5k.yaml).
    Working memory while training: about 7 extra model-sized vectors (start, path, grad, previous and
    current flattened parameters, theta - theta*, 2 c Omega); memory_usage reports the 2 that persist
    (Omega, theta*).
    """
    _check_nonneg("si_c", si_c)
    if not xi > 0:
        raise ConfigError(f"strategy.xi: must be > 0 (it damps the division by the squared total change), got {xi}")
    return [SIPlugin(si_c, xi)]


# -- Memory Aware Synapses ------------------------------------------------------------------------------
def output_sensitivity(learner, data: torch.Tensor, task_id: int) -> torch.Tensor:
    """MAS importance: mean over samples of |d ||f(x)||_2^2 / d theta| (per sample, then averaged).
    ``data``: stream keys or model-ready inputs (see :func:`per_sample_mean`).

    f is the logits vector; in multi-head streams only the task's own outputs (the other entries are
    zeroed, never the -1e9 fill that would dominate the norm).
    """
    t = torch.full((data.shape[0],), task_id, dtype=torch.long, device=data.device)

    def sq_norm(logits: torch.Tensor, ti: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        if learner.multi_head:
            logits = logits * learner.task_mask[ti]
        return logits.square().sum(1)

    return per_sample_mean(learner, data, t, t, sq_norm, "abs")


class MASPlugin(_ImportancePenalty):
    def __init__(self, mas_lambda: float) -> None:
        super().__init__()
        self.mas_lambda = mas_lambda
        self.omega: torch.Tensor | None = None
        self.anchor: torch.Tensor | None = None

    def loss(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor | float:
        if self.omega is None or self.mas_lambda == 0:
            return 0.0
        return self.penalty(learner, self.omega, self.anchor, self.mas_lambda)

    def after_experience(self, learner, exp) -> None:
        new = output_sensitivity(learner, learner.stream.keys(exp.train), exp.task_id)
        self.omega = new if self.omega is None else self.omega + new
        self.anchor = self.theta(learner).detach().clone()


@register_strategy("mas")
def mas(mas_lambda: float = 1.0) -> list[Plugin]:
    """Memory Aware Synapses (Aljundi et al. 2018): importance = sensitivity of the output's squared norm.

    After each experience, Omega_i += mean over its training inputs of |d ||f(x)||_2^2 / d theta_i|
    (unsupervised: labels unused; per sample, as the paper's equation and its code's batch-size-1 mode),
    summed over experiences as in the authors' code (accumulate_reg_params). Training minimises
    CE + mas_lambda * sum_i Omega_i (theta_i - theta*_i)^2, theta* = parameters at the last experience end.

    Default mas_lambda=1: the paper's value for its object-recognition sequences (its code: "In object
    recognition it was set to 1"). It is too strong for Permuted-MNIST-5k with a 2x100 MLP and SGD lr 0.1,
    where 0.03 was the best of {0.01, 0.03, 0.1} (experiments/regularization_check.py); with plain SGD
    keep lr * 2 * mas_lambda * max_i Omega_i < 2 or the penalty diverges.
    """
    _check_nonneg("mas_lambda", mas_lambda)
    return [MASPlugin(mas_lambda)]
