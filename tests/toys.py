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
        exps.append(Experience(i, i, (2 * i, 2 * i + 1), x[:48], y[:48], x[48:], y[48:]))
    return Stream("toy", exps, 4, (8,), [0, 1, 2, 3], "class_incremental")
