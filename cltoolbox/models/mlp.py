from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.registry import register_model


class MLP(nn.Module):
    """Flatten -> (Linear -> activation [-> Dropout]) x len(hidden) -> Linear over all classes.

    ``features`` returns the penultimate representation (used by NME-style heads).
    """

    def __init__(self, in_features: int, hidden: list[int], n_classes: int, dropout: float,
                 activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], n_classes: int, hidden: list[int] = [400, 400],  # noqa: B006
        dropout: float = 0.0, activation: Literal["relu", "tanh"] = "relu") -> MLP:
    """Fully connected network (default 2x400 ReLU, as in the Split/Permuted-MNIST literature)."""
    for i, h in enumerate(hidden):
        if h < 1:
            raise ConfigError(f"model.hidden[{i}]: a layer width must be >= 1, got {h}; e.g. `hidden: [400, 400]`")
    if not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout: must be in [0, 1) (the probability of zeroing a unit), got {dropout}")
    act = nn.ReLU if activation == "relu" else nn.Tanh
    return MLP(math.prod(input_shape), list(hidden), n_classes, dropout, act)
