"""Class- and task-incremental splits of a labelled dataset."""

from __future__ import annotations

from typing import Literal

import torch

from cltoolbox.data.base import Dataset
from cltoolbox.errors import ConfigError
from cltoolbox.params import PositiveInt
from cltoolbox.registry import register_scenario
from cltoolbox.stream import Experience, Samples, Stream


def class_splits(
    n_classes: int, n_experiences: int | None, first_classes: int | None, classes_per_exp: int | None
) -> list[int]:
    """Number of classes in each experience; raises ConfigError for impossible splits."""
    if first_classes is not None and not 0 < first_classes <= n_classes:
        raise ConfigError(f"scenario.first_classes: must be in 1..{n_classes}, got {first_classes}")
    first = first_classes
    rest_exps = None if n_experiences is None else n_experiences - (1 if first else 0)
    remaining = n_classes - (first or 0)
    if classes_per_exp is not None:
        if classes_per_exp < 1 or remaining % classes_per_exp:
            raise ConfigError(
                f"scenario.classes_per_exp: {classes_per_exp} does not divide the {remaining} classes to split; "
                f"choose a divisor of {remaining}"
            )
        per, count = classes_per_exp, remaining // classes_per_exp
        if n_experiences is not None and count + (1 if first else 0) != n_experiences:
            raise ConfigError(
                f"scenario.n_experiences: {n_experiences} contradicts classes_per_exp={classes_per_exp} "
                f"(which gives {count + (1 if first else 0)}); set only one of them"
            )
    elif n_experiences is None:
        raise ConfigError("scenario.n_experiences: missing; set n_experiences or classes_per_exp")
    else:
        if n_experiences < 1 or (rest_exps is not None and rest_exps < 0):
            raise ConfigError(f"scenario.n_experiences: must be >= 1, got {n_experiences}")
        if rest_exps == 0:
            if remaining:
                raise ConfigError(
                    f"scenario.first_classes: {first} leaves {remaining} classes but no experience for them; "
                    "raise n_experiences"
                )
            per, count = 0, 0
        elif remaining % rest_exps:
            raise ConfigError(
                f"scenario.n_experiences: {remaining} classes cannot be split evenly into {rest_exps} experiences; "
                f"choose a divisor of {remaining} or set first_classes"
            )
        else:
            per, count = remaining // rest_exps, rest_exps
    return ([first] if first else []) + [per] * count


def class_order_list(n_classes: int, class_order: str | list[int], seed: int) -> list[int]:
    """The class order a scenario's ``class_order`` names: ``fixed`` (0..C-1), ``seeded`` (a permutation drawn
    from the run's seed) or an explicit permutation."""
    if isinstance(class_order, list):
        if sorted(class_order) != list(range(n_classes)):
            raise ConfigError(f"scenario.class_order: must be a permutation of 0..{n_classes - 1}, got {class_order}")
        return list(class_order)
    if class_order == "seeded":
        return torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    return list(range(n_classes))


def split_by_class(
    data: Dataset,
    seed: int,
    n_experiences: int | None,
    class_order: Literal["fixed", "seeded"] | list[int],
    first_classes: int | None,
    classes_per_exp: int | None,
    task_labels: bool,
) -> Stream:
    C = data.n_classes
    order = class_order_list(C, class_order, seed)
    sizes = class_splits(C, n_experiences, first_classes, classes_per_exp)
    experiences, start = [], 0
    for i, size in enumerate(sizes):
        classes = tuple(order[start : start + size])
        start += size
        cls = torch.tensor(classes)
        tr = torch.nonzero(torch.isin(data.y_train, cls)).flatten()
        te = torch.nonzero(torch.isin(data.y_test, cls)).flatten()
        experiences.append(Experience(i, i if task_labels else 0, classes, Samples(data.train, tr),
                                      Samples(data.test, te)))
    kind = "task_incremental" if task_labels else "class_incremental"
    return Stream(f"{kind}-{data.name}", experiences, C, data.input_shape, order, kind, task_labels)


@register_scenario("class_incremental", test_params={"n_experiences": 3, "first_classes": 4})
def class_incremental(
    data: Dataset,
    seed: int,
    n_experiences: PositiveInt | None = None,
    class_order: Literal["fixed", "seeded"] | list[int] = "fixed",
    first_classes: PositiveInt | None = None,
    classes_per_exp: PositiveInt | None = None,
) -> Stream:
    """Disjoint class splits, no task ids at test time (class-IL). Order: fixed, seeded, or an explicit list."""
    return split_by_class(data, seed, n_experiences, class_order, first_classes, classes_per_exp, False)


@register_scenario("task_incremental", test_params={"n_experiences": 5})
def task_incremental(
    data: Dataset,
    seed: int,
    n_experiences: PositiveInt | None = None,
    class_order: Literal["fixed", "seeded"] | list[int] = "fixed",
    first_classes: PositiveInt | None = None,
    classes_per_exp: PositiveInt | None = None,
) -> Stream:
    """The class splits of class_incremental with task ids given in training and test (multi-head task-IL)."""
    return split_by_class(data, seed, n_experiences, class_order, first_classes, classes_per_exp, True)


@register_scenario("domain_incremental", test_params={"n_experiences": 5})
def domain_incremental(
    data: Dataset,
    seed: int,
    n_experiences: int | None = None,
    class_order: Literal["fixed", "seeded"] | list[int] = "fixed",
) -> Stream:
    """Split domain-IL: the class splits of class_incremental, each label replaced by its position in its split.

    The "domain-incremental" Split MNIST / Split CIFAR-100 of van de Ven et al. (2019, "Three scenarios for
    continual learning"; 2022, "Three types of incremental learning", Nature Machine Intelligence): every
    experience is the same K-way problem (e.g. first vs second digit of the pair), one shared output per
    position, no task ids. Splits must be equal; class-IL accuracy of such a stream is domain-IL accuracy.
    """
    split = split_by_class(data, seed, n_experiences, class_order, None, None, False)
    per = len(split.experiences[0].classes)
    position = torch.empty(data.n_classes, dtype=torch.long)
    experiences = []
    for e in split.experiences:
        position[list(e.classes)] = torch.arange(per)
        experiences.append(Experience(e.index, 0, tuple(range(per)), e.train.relabel(position[e.train.y]),
                                      e.test.relabel(position[e.test.y])))
    return Stream(f"domain_incremental-{data.name}", experiences, per, data.input_shape, list(range(per)),
                  "domain_incremental", False, info={"splits": [list(e.classes) for e in split.experiences]})
