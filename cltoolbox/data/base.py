"""The dataset contract shared by every dataset: a train and a test source, and the number of classes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cltoolbox.data.source import Source, TensorSource


@dataclass(eq=False)
class Dataset:
    """A labelled dataset: ``train`` and ``test`` sources (see ``cltoolbox.data.source``), labels in
    ``[0, n_classes)``. Scenario generators read labels (``y_train``/``y_test``) and select samples by
    index; they never need the samples themselves."""

    name: str
    train: Source
    test: Source
    n_classes: int

    @classmethod
    def from_tensors(cls, name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                     y_test: torch.Tensor, n_classes: int, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> Dataset:
        """A dataset held in memory. uint8 inputs stay uint8 and are scaled to [0, 1] and normalised by
        ``mean``/``std`` per fetched batch; float inputs are used as they are."""
        return cls(name, TensorSource(x_train, y_train, f"{name}/train", mean, std),
                   TensorSource(x_test, y_test, f"{name}/test", mean, std), n_classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.sample_shape)

    @property
    def y_train(self) -> torch.Tensor:
        return self.train.labels

    @property
    def y_test(self) -> torch.Tensor:
        return self.test.labels

    @property
    def x_train(self) -> torch.Tensor:
        """Every training input, model-ready (float): only for small in-memory sets."""
        return self.train.fetch(torch.arange(len(self.train)))

    @property
    def x_test(self) -> torch.Tensor:
        return self.test.fetch(torch.arange(len(self.test)))
