"""Parameter-importance regularisers: EWC, online EWC, Synaptic Intelligence and Memory Aware Synapses.

All four add a quadratic penalty ``strength * sum_i Omega_i (theta_i - theta*_i)^2`` that anchors the
parameters that mattered for past experiences; they differ in how the importance ``Omega`` is measured:

* EWC (Kirkpatrick et al. 2017): diagonal empirical Fisher after each experience, one penalty per
  past experience.
* online EWC (Schwarz et al. 2018): one running Fisher ``F <- gamma F + F_new`` and one anchor.
* SI (Zenke et al. 2017): the path integral of the task-loss gradient along the training trajectory.
* MAS (Aljundi et al. 2018): the sensitivity of the squared L2 norm of the output, unsupervised.

Implementation notes shared by all of them:

* Parameters are the model's ``requires_grad`` parameters in ``named_parameters`` order, stored
  flattened (``cltoolbox.flat``); the penalty with its closed-form gradient is ``cltoolbox.penalty``.
* Per-sample statistics (EWC's Fisher, MAS's importance) are computed exactly, once per experience, on
  the experience's training data with the model in eval mode (``cltoolbox.per_sample``).
* ``state_dict`` holds only tensors and numbers; ``memory_usage`` reports ``(0, bytes)``: 0 items
  because a regulariser stores no data samples (items count samples across the toolbox), bytes of the
  stored importances and anchors (each model-sized).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F

from cltoolbox.flat import flat_grad
from cltoolbox.params import Interval, Min, NonNegative
from cltoolbox.penalty import ImportancePenalty, QuadraticPenalty
from cltoolbox.per_sample import per_sample_mean
from cltoolbox.plugin import MASKED_LOGIT, Batch, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy


# -- helpers -------------------------------------------------------------------------------------------
def _task_logits(learner, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Training logits as the loop sees them: masked to the sample's task in multi-head streams."""
    if learner.multi_head:
        return logits.masked_fill(~learner.task_mask[t], MASKED_LOGIT)
    return logits


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


class EWCPlugin(QuadraticPenalty):
    """EWC (``online=False``: one Fisher and anchor row per past experience) or online EWC (one row)."""
    supports_ddp = True  # per-batch state from the global batch only (cltoolbox.distributed)

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
def ewc(ewc_lambda: NonNegative = 3.0) -> list[Plugin]:
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
    return [EWCPlugin(ewc_lambda, online=False)]


@register_strategy("online_ewc")
def online_ewc(ewc_lambda: NonNegative = 3.0,
               gamma: Annotated[float, Interval(0, 1, low_open=True, why="1 keeps every past Fisher in full")] = 1.0
               ) -> list[Plugin]:
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
    return [EWCPlugin(ewc_lambda, online=True, gamma=gamma)]


# -- Synaptic Intelligence -----------------------------------------------------------------------------
class SIPlugin(ImportancePenalty):
    """Path-integral importance (see :func:`si`).

    Per step: after_backward stores the task-loss gradient g (p.grad minus the gradient of our own penalty,
    which is known in closed form) and the parameters; after_step adds -g * (theta_after - theta_before),
    the actual change of the step, whatever the optimiser (momentum, Adam, weight decay) did.

    Every snapshot is a copy (``torch.cat`` allocates). Avalanche 0.6.0's SI stores its snapshots with
    ``param.detach().cpu().flatten()``, which on a CPU model is a view of the live parameter: the step's
    delta and theta - theta* read 0, so its penalty is exactly 0 and it reproduces naive; it also clips
    the importance at 1e-3. tests/test_regularization.py checks that ours is active and changes results.
    """
    supports_ddp = True  # per-batch state from the global batch only (cltoolbox.distributed)

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
            self.check_size(learner, self.omega)
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
def si(si_c: NonNegative = 0.1,
       xi: Annotated[float, Min(0, strict=True, why="it damps the division by the squared total change")] = 0.1
       ) -> list[Plugin]:
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


class MASPlugin(ImportancePenalty):
    supports_ddp = True  # per-batch state from the global batch only (cltoolbox.distributed)
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
def mas(mas_lambda: NonNegative = 1.0) -> list[Plugin]:
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
    return [MASPlugin(mas_lambda)]
