"""The in-memory dataset contract shared by every dataset source."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TensorData:
    """A whole dataset held as tensors: the fast data path.

    ``x_*`` are float32, already scaled/normalised, shaped ``(N, *input_shape)``;
    ``y_*`` are int64 class labels in ``[0, n_classes)``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])
