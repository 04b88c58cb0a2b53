"""Few-shot class-incremental learning (FSCIL): a large base session, then N-way K-shot sessions."""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from cltoolbox.data.base import Dataset
from cltoolbox.errors import ConfigError
from cltoolbox.params import Min, PositiveInt
from cltoolbox.registry import register_scenario
from cltoolbox.scenarios.recurring import resolve_class_order
from cltoolbox.stream import Experience, Samples, Stream


@register_scenario("few_shot", test_params={"base_classes": 4, "ways": 2, "shots": 5, "n_sessions": 3})
def few_shot(
    data: Dataset,
    seed: int,
    base_classes: PositiveInt = 60,
    ways: PositiveInt = 5,
    shots: PositiveInt = 5,
    n_sessions: Annotated[int, Min(0)] = 8,
    base_shots: PositiveInt | None = None,
    class_order: Literal["fixed", "seeded"] | list[int] = "fixed",
) -> Stream:
    """Few-shot class-IL: a base session of many classes, then n_sessions sessions of ways-way shots-shot.

    The FSCIL protocol of Tao et al. 2020, "Few-Shot Class-Incremental Learning" (TOPIC), used by Roy et al.
    2024, "A Bag of Tricks for Few-Shot Class-Incremental Learning": on CIFAR-100, 60 base classes with all
    their training samples, then 8 sessions of 5 new classes with 5 training samples each (the defaults).
    Classes follow ``class_order`` (``fixed``: 0..C-1, the standard split); the shots of each new class
    are a seeded random choice (the published protocol fixes them in index files; ``info['shot_indices']``
    records ours, as indices into the dataset's training set). ``base_shots`` limits the base session to
    that many samples per class (default: all).

    Every session's test set holds all test samples of its classes, so the class-IL accuracy over the
    sessions seen so far, weighted by test-set size (``acc_weighted``), is the usual FSCIL accuracy on
    all classes seen.
    """
    C = data.n_classes
    needed = base_classes + ways * n_sessions
    if needed > C:
        raise ConfigError(
            f"scenario.n_sessions: {base_classes} base classes + {n_sessions} sessions x {ways} ways need {needed} "
            f"classes but '{data.name}' has {C}; lower n_sessions, ways or base_classes")
    order = resolve_class_order(C, class_order, seed)
    counts = torch.bincount(data.y_train, minlength=C)
    test_counts = torch.bincount(data.y_test, minlength=C)
    novel = order[base_classes:needed]
    short = [c for c in novel if counts[c] < shots]
    if short:
        c = short[0]
        raise ConfigError(f"scenario.shots: class {c} has only {int(counts[c])} training samples, fewer than "
                          f"shots={shots}; lower shots")
    if base_shots is not None:
        short = [c for c in order[:base_classes] if counts[c] < base_shots]
        if short:
            c = short[0]
            raise ConfigError(f"scenario.base_shots: base class {c} has only {int(counts[c])} training samples; "
                              f"lower base_shots or set it to null")
    untested = [c for c in order[:needed] if test_counts[c] == 0]
    if untested:
        raise ConfigError(f"scenario.dataset: class {untested[0]} has no test sample, so its session cannot be "
                          "evaluated; use a dataset with test samples for every class")

    g = torch.Generator().manual_seed(seed)
    sessions = [order[:base_classes]] + [order[base_classes + s * ways:base_classes + (s + 1) * ways]
                                         for s in range(n_sessions)]
    experiences, shot_indices = [], {}
    for i, classes in enumerate(sessions):
        k = base_shots if i == 0 else shots
        idx = []
        for c in classes:
            members = torch.nonzero(data.y_train == c).flatten()
            if k is not None:
                members = members[torch.randperm(members.shape[0], generator=g)[:k]].sort().values
                shot_indices[int(c)] = members.tolist()
            idx.append(members)
        tr = torch.cat(idx).sort().values
        te = torch.nonzero(torch.isin(data.y_test, torch.tensor(classes))).flatten()
        experiences.append(Experience(i, 0, tuple(classes), Samples(data.train, tr), Samples(data.test, te)))
    info = {"base_classes": base_classes, "ways": ways, "shots": shots, "n_sessions": n_sessions,
            "base_shots": base_shots, "shot_indices": shot_indices}
    return Stream(f"few_shot-{data.name}", experiences, C, data.input_shape, order, "class_incremental",
                  task_labels=False, info=info)
