"""Parameters and gradients as one flat vector: the shared machinery of importance penalties (EWC, SI, MAS)
and gradient surgery (GEM, A-GEM).

The trained parameters are the model's ``requires_grad`` ones (frozen ones are excluded, BatchNorm affine
weights are included, buffers such as running statistics are not), in ``named_parameters`` order; a
quantity per parameter (an importance, an anchor, a gradient) is one vector of length P, so a penalty or a
projection is one ``torch.cat`` plus a few elementwise ops per step.
"""

from __future__ import annotations

import torch
from torch import nn


def trained_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a regulariser protects: every ``requires_grad`` parameter, in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_parameters(params: list[nn.Parameter]) -> torch.Tensor:
    """One vector of all parameters (differentiable: gradients flow back to each parameter)."""
    return torch.cat([p.reshape(-1) for p in params])


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every ``requires_grad`` parameter of ``model``, in ``parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The current .grad of ``params`` as one vector (zeros for parameters without a gradient)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def write_flat_grad(params: list[torch.nn.Parameter], vec: torch.Tensor) -> None:
    """Write one vector (``flat_grad``'s layout) back into the ``.grad`` of ``params``."""
    offset = 0
    for p in params:
        n = p.numel()
        g = vec[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n
