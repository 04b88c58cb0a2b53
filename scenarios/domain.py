"""Domain-incremental streams: every experience holds all classes under a different input transform."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cltoolbox.data.base import Dataset
from cltoolbox.errors import ConfigError
from cltoolbox.params import PositiveInt
from cltoolbox.registry import register_scenario
from cltoolbox.stream import Experience, Samples, Stream


def _subsample(n: int, k: int | None, g: torch.Generator) -> torch.Tensor:
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=g)[:k].sort().values


def _domain_stream(kind: str, data: Dataset, seed: int, transforms: list, train_samples: int | None) -> Stream:
    g = torch.Generator().manual_seed(seed + 1)
    classes = tuple(range(data.n_classes))
    experiences = []
    for i, fn in enumerate(transforms):
        idx = _subsample(data.y_train.shape[0], train_samples, g)
        # the transform applies per fetched batch: no transformed copy of the dataset per experience
        experiences.append(Experience(i, i, classes, Samples(data.train, idx, transform=fn),
                                      Samples(data.test, transform=fn)))
    return Stream(f"{kind}-{data.name}", experiences, data.n_classes, data.input_shape, list(classes),
                  "domain_incremental", task_labels=False)


@register_scenario("permuted", test_params={"n_experiences": 3, "train_samples": 200})
def permuted(
    data: Dataset, seed: int, n_experiences: PositiveInt = 10, keep_first: bool = False,
    train_samples: PositiveInt | None = None
) -> Stream:
    """Permuted inputs (Permuted-MNIST): a seeded fixed pixel permutation per experience; all classes each time.

    ``keep_first`` leaves the first experience unpermuted; ``train_samples`` subsamples each experience's
    training set (e.g. 1000 as in A-GEM's protocol).
    """
    g = torch.Generator().manual_seed(seed)
    d = math.prod(data.input_shape)
    shape = data.input_shape

    perms = [torch.arange(d) if (keep_first and i == 0) else torch.randperm(d, generator=g)
             for i in range(n_experiences)]
    return _domain_stream("permuted", data, seed, [Permute(p, shape) for p in perms], train_samples)


class Permute:
    """A fixed permutation of each sample's values (flattened), applied to fetched batches on their device."""

    def __init__(self, perm: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.perm, self.shape = perm, shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm.device != x.device:
            self.perm = self.perm.to(x.device)
        n = x.shape[0]
        return x.reshape(n, -1).index_select(1, self.perm).reshape(n, *self.shape)


class Rotate:
    """A fixed rotation by ``degrees`` with background ``fill`` per channel, applied to fetched batches."""

    def __init__(self, degrees: float, fill: torch.Tensor) -> None:
        self.degrees, self.fill = degrees, fill

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.degrees, self.fill.to(x.device))


def rotate(x: torch.Tensor, degrees: float, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate a batch of images (N, C, H, W) counter-clockwise about the centre, bilinear (batched).

    Corners that come from outside the image get ``fill`` (per channel, shape (C,)); by default each
    channel's minimum in ``x``, i.e. the background of normalised data, not 0 (which is grey after
    normalisation).
    """
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype,
                         device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    bg = (x.amin(dim=(0, 2, 3)) if fill is None else fill).to(x.dtype).view(1, -1, 1, 1)
    return F.grid_sample(x - bg, grid, align_corners=False) + bg


@register_scenario("rotated", test_params={"n_experiences": 3, "train_samples": 200})
def rotated(
    data: Dataset,
    seed: int,
    n_experiences: PositiveInt = 5,
    angles: list[float] | None = None,
    max_angle: float = 180.0,
    train_samples: PositiveInt | None = None,
) -> Stream:
    """Rotated images (Rotated-MNIST): experience i rotates every image by angles[i] degrees.

    Without ``angles``, the angles are spread evenly over [0, max_angle].
    """
    if len(data.input_shape) != 3:
        raise ConfigError(f"scenario.name: rotated needs image data (C, H, W); '{data.name}' has {data.input_shape}")
    if angles is None:
        step = max_angle / max(1, n_experiences - 1)
        angles = [i * step for i in range(n_experiences)]
    elif len(angles) != n_experiences:
        raise ConfigError(
            f"scenario.angles: {len(angles)} angles for n_experiences={n_experiences}; give one per experience"
        )
    # one background per channel for train and test alike (a subsample's minimum could differ)
    fill = data.train.black_level()
    transforms = [Rotate(a, fill) for a in angles]
    stream = _domain_stream("rotated", data, seed, transforms, train_samples)
    stream.info["angles"] = list(angles)
    return stream
