"""The quadratic penalty ``c * sum_i w_i (theta_i - a_i)^2`` of importance regularisers (EWC, online EWC, SI,
MAS), over the model's trained parameters flattened into one vector (:mod:`cltoolbox.flat`).

The penalty ``c * sum_i w_i (theta_i - a_i)^2`` is a custom autograd function (:class:`WeightedSquare`):
its value is computed with the same ops as the plain expression and its gradient is written in closed
form, ``2 (c w) (theta - a)``, which is bit-for-bit what autograd derives through the cat, square, product
and sum (tests/test_regularization.py checks it), without the cat's and the power's backward nodes and
their temporaries (each op over P values costs ~12 us for a 2x100 MLP; the penalty's graph was ~1/3 of
an EWC step). On CPU, for the loop's backward (grad_out == 1), ``2 c w`` is computed once per
importance, not per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from cltoolbox.flat import flat_parameters, trained_parameters
from cltoolbox.plugin import Plugin, tensor_bytes


class WeightedSquare(torch.autograd.Function):
    """``scale * (sum(weight * (theta - anchor)^2) [+ const])`` over the flattened parameters ``params``.

    The value uses the same ops, in the same order, as that expression on ``torch.cat`` of the parameters.
    The gradient is autograd's for it, written out: grad_out * scale, times weight (MulBackward), times
    2 (theta - anchor) (PowBackward of the square); for grad_out == 1 (the loop's backward) the factor
    2 * (scale * weight) is cached per importance tensor, as doubling is exact so the product rounds once
    either way. The gradient reaches each parameter as a view of one flat vector, as through CatBackward.
    """

    @staticmethod
    def forward(ctx, owner: QuadraticPenalty, diff: torch.Tensor, weight: torch.Tensor, scale: float,
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


class QuadraticPenalty(Plugin):
    """Shared machinery: the protected parameters (cached per model), their flattened values (computed once
    per step) and the penalty ``scale * sum_i w_i (theta_i - a_i)^2`` (:class:`WeightedSquare`)."""

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
        return WeightedSquare.apply(self, diff, weight, scale, const, *self.params(learner))

    def _scaled_weight(self, weight: torch.Tensor, scale: float, grad_out: torch.Tensor) -> torch.Tensor:
        """``2 * ((grad_out * scale) * weight)``, the gradient factor of :class:`WeightedSquare`."""
        if grad_out.device.type != "cpu" or float(grad_out) != 1.0:
            return 2 * ((grad_out * scale) * weight)
        c = self._weight_cache
        if c is None or c[0] is not weight or c[1] != weight._version or c[2] != scale:
            k = 2 * ((torch.ones((), dtype=grad_out.dtype) * scale) * weight)
            self._weight_cache = c = (weight, weight._version, scale, k)
        return c[3]

    def check_size(self, learner, stored: torch.Tensor) -> None:
        n = sum(p.numel() for p in self.params(learner))
        if stored.shape[-1] != n:
            raise RuntimeError(f"{type(self).__name__}: stored importance has {stored.shape[-1]} entries but the "
                               f"model has {n} trained parameters; the model changed after the checkpoint")


class ImportancePenalty(QuadraticPenalty):
    """One consolidated importance ``omega`` and one ``anchor`` (SI, MAS): their checkpoint and memory."""

    omega: torch.Tensor | None
    anchor: torch.Tensor | None

    def state_dict(self) -> dict[str, Any]:
        return {"omega": self.omega, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.omega, self.anchor = state["omega"], state["anchor"]

    def memory_usage(self) -> tuple[int, int]:
        return 0, tensor_bytes(self.omega, self.anchor)
