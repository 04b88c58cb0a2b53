"""Curriculum-ordered class-incremental streams: classes ordered by inter-class feature similarity."""

from __future__ import annotations

import math
from typing import Literal

import torch

from cltoolbox.data.base import Dataset
from cltoolbox.errors import ConfigError
from cltoolbox.params import PositiveInt
from cltoolbox.registry import register_scenario
from cltoolbox.scenarios.incremental import split_by_class
from cltoolbox.stream import Stream

CHUNK_BYTES = 64 << 20  # float32 inputs fetched at a time for the class means
# rows: MKL's products of a few rows can round differently from a product over many (1 row did on MNIST);
# from 64 rows up they gave the whole set's values bit for bit
MIN_CHUNK = 256


def class_features(data: Dataset, features: Literal["pixels", "random_projection"], feature_dim: int,
                   seed: int) -> torch.Tensor:
    """Mean feature vector of every class (C, D) over its training samples.

    ``pixels``: the flattened inputs. ``random_projection``: ReLU(x W) with a fixed Gaussian W (seeded,
    ``feature_dim`` columns), a cheap stand-in for the paper's pretrained teacher network (random ReLU
    features approximate an arc-cosine kernel on the inputs).

    The training set is fetched in chunks of about ``CHUNK_BYTES`` of inputs, never whole. Each class's sum
    accumulates in float64 sample by sample in index order whatever the chunking, and the chunks are of
    near-equal size (no small remainder chunk): the means, hence the order, are those of one pass over the
    whole set, to the bit on MNIST-5k and digits.
    """
    d = math.prod(data.input_shape)
    n = len(data.train)
    w = None
    if features == "random_projection":
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d, feature_dim, generator=g) / math.sqrt(d)
    rows = max(MIN_CHUNK, CHUNK_BYTES // (4 * d))
    chunks = torch.arange(n).tensor_split(max(1, -(-n // rows)))
    sums = torch.zeros(data.n_classes, d if w is None else feature_dim, dtype=torch.float64)
    for idx, x in zip(chunks, data.train.batches(chunks, torch.device("cpu")), strict=True):
        x = x.reshape(x.shape[0], -1)
        if w is not None:
            x = torch.relu(x @ w)
        sums.index_add_(0, data.y_train[idx].cpu(), x.double())
    counts = torch.bincount(data.y_train.cpu(), minlength=data.n_classes).clamp_min(1)
    return sums / counts[:, None]


def curriculum_order(means: torch.Tensor, order: Literal["easy_to_hard", "hard_to_easy"]) -> tuple[list[int], dict]:
    """Classes ordered by the Curriculum Designer's criterion (Singh et al. 2023).

    D[i, j] is the cosine distance between the class means of i and j; each row is normalised to sum to
    one; a class's score is the variance of its row (scores normalised to sum to one). A low score is a
    class about equally far from all others ("centrally located", the paper's preferred start: easy); a
    high score is a class with near neighbours it is easily confused with (hard). ``easy_to_hard`` sorts
    by increasing score (ties: lower class id first); ``hard_to_easy`` is its exact reverse.
    """
    unit = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dist = (1.0 - unit @ unit.T).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    norm = dist / dist.sum(1, keepdim=True).clamp_min(1e-12)
    score = norm.var(dim=1, unbiased=False)
    score = score / score.sum().clamp_min(1e-300)
    ranked = sorted(range(means.shape[0]), key=lambda c: (float(score[c]), c))
    if order == "hard_to_easy":
        ranked = ranked[::-1]
    info = {"scores": [float(s) for s in score], "distance": [[float(v) for v in row] for row in dist]}
    return ranked, info


@register_scenario("curriculum", test_params={"n_experiences": 5})
def curriculum(
    data: Dataset,
    seed: int,
    n_experiences: PositiveInt | None = None,
    first_classes: PositiveInt | None = None,
    classes_per_exp: PositiveInt | None = None,
    order: Literal["easy_to_hard", "hard_to_easy"] = "easy_to_hard",
    features: Literal["pixels", "random_projection"] = "random_projection",
    feature_dim: PositiveInt = 256,
) -> Stream:
    """Class-IL splits in a curriculum order computed from inter-class feature similarity.

    A cheap version of the Curriculum Designer of Singh et al. 2023, "Learning to Learn: How to Continuously
    Teach Humans and Machines" (ICCV): class prototypes (mean features: ``pixels`` or a seeded
    ``random_projection`` with ``feature_dim`` ReLU units in place of the paper's pretrained network),
    pairwise cosine distances between prototypes, row-normalised, and each class scored by the variance of
    its distances; ``order: easy_to_hard`` starts with the centrally located classes (low variance, the
    paper's preferred start) and ends with the classes that have close, confusable neighbours;
    ``hard_to_easy`` is the reverse. The paper's full designer also ranks whole curricula by similarity to
    the first classes; this keeps its class score only.

    The ordered classes are then split as in ``class_incremental`` (``n_experiences``, ``first_classes``,
    ``classes_per_exp``). The order depends only on the data and (for random_projection) the seed, so the
    same seed gives the same curriculum; ``info`` records the scores and the distance matrix.
    """
    missing = [c for c in range(data.n_classes) if not bool((data.y_train == c).any())]
    if missing:
        raise ConfigError(f"scenario.dataset: class {missing[0]} has no training sample, so it has no prototype; "
                          "use a dataset with samples of every class")
    means = class_features(data, features, feature_dim, seed)
    ranked, info = curriculum_order(means, order)
    stream = split_by_class(data, seed, n_experiences, ranked, first_classes, classes_per_exp, False)
    stream.name = f"curriculum-{data.name}"
    stream.info.update(order=order, features=features, **info)
    return stream
