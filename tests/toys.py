"""Tiny synthetic streams shared by unit tests (importable from tests: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cltoolbox.stream import Experience, Stream


def two_task_stream() -> Stream:
    """Two linearly separable 2-class experiences in 8 dimensions, made to interfere."""
    g = torch.Generator().manual_seed(0)
    exps = []
    for i in range(2):
        y = torch.arange(2 * i, 2 * i + 2).repeat_interleave(32)
        x = torch.randn(64, 8, generator=g) + 2.0 * F.one_hot(y, 8).float()
        exps.append(Experience.from_tensors(i, i, (2 * i, 2 * i + 1), x[:48], y[:48], x[48:], y[48:]))
    return Stream("toy", exps, 4, (8,), [0, 1, 2, 3], "class_incremental")


def textured_task_stream(n_tasks: int = 4) -> Stream:
    """Split sklearn digits (2 classes per task) where task k's images carry texture k (vertical stripes,
    horizontal stripes, checkerboard, none): tasks a random-init ViT's [CLS] features tell apart, for
    testing prompt selection."""
    from cltoolbox.data import load_dataset

    d = load_dataset("digits")
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    textures = [(xx % 2).float(), (yy % 2).float(), ((xx + yy) % 2).float(), torch.zeros(8, 8)]
    exps = []
    for k in range(n_tasks):
        classes = (2 * k, 2 * k + 1)
        tr, te = (d.y_train // 2) == k, (d.y_test // 2) == k
        exps.append(Experience.from_tensors(k, 0, classes, d.x_train[tr] + 2 * textures[k], d.y_train[tr],
                                            d.x_test[te] + 2 * textures[k], d.y_test[te]))
    return Stream("textured-digits", exps, 10, (1, 8, 8), list(range(10)), "class_incremental")


def gaussian_pairs_stream(n_exp: int = 3, per_class: int = 40, dim: int = 8, noise: float = 0.5,
                          task_labels: bool = False, shuffle: bool = False) -> Stream:
    """Two Gaussian classes per experience (centres 3 std apart on average), 3/4 train, 1/4 test;
    ``task_labels``: a task-incremental stream with task id = experience index."""
    g = torch.Generator().manual_seed(0)
    n_classes = 2 * n_exp
    centres = 3.0 * torch.randn(n_classes, dim, generator=g)
    exps = []
    for i in range(n_exp):
        y = torch.arange(2 * i, 2 * i + 2).repeat_interleave(per_class)
        x = centres[y] + noise * torch.randn(len(y), dim, generator=g)
        if shuffle:
            perm = torch.randperm(len(y), generator=g)
            x, y = x[perm], y[perm]
        k = len(y) * 3 // 4
        exps.append(Experience.from_tensors(i, i if task_labels else 0, (2 * i, 2 * i + 1), x[:k], y[:k], x[k:],
                                            y[k:]))
    scenario = "task_incremental" if task_labels else "class_incremental"
    return Stream("toy", exps, n_classes, (dim,), list(range(n_classes)), scenario, task_labels=task_labels)


def fit_small_mlp(plugin) -> tuple:
    """An 8-16-4 MLP trained with ``plugin`` on :func:`two_task_stream` (seeded); returns (learner, stream)."""
    from torch import nn

    from cltoolbox.loop import Learner, TrainConfig

    torch.manual_seed(0)
    stream = two_task_stream()
    learner = Learner(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), [plugin],
                      TrainConfig(batch_size=8, lr=0.1, device="cpu"))
    learner.fit(stream)
    return learner, stream
