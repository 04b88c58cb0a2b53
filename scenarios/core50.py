"""CORe50's two standard protocols (Lomonaco & Maltoni 2017, "CORe50: a New Dataset and Benchmark for
Continuous Object Recognition"): new instances (NI) and new classes (NC), on ``dataset: core50``.

Both read the session of every sample from the dataset's sources (``data.train.sessions``); no image is
decoded to build a stream. Training uses the 8 training sessions (1, 2, 4, 5, 6, 8, 9, 11), testing the
fixed test set of sessions 3, 7 and 10.
"""

from __future__ import annotations

from typing import Literal

import torch

from cltoolbox.data.base import Dataset
from cltoolbox.data.catalogue import CORE50_OBJECTS_PER_CATEGORY
from cltoolbox.errors import ConfigError
from cltoolbox.registry import register_scenario
from cltoolbox.stream import Experience, Samples, Stream


def _sessions(data: Dataset, scenario: str) -> tuple[torch.Tensor, torch.Tensor]:
    train, test = getattr(data.train, "sessions", None), getattr(data.test, "sessions", None)
    if train is None or test is None:
        raise ConfigError(f"scenario.name: {scenario} needs the sessions of CORe50; dataset {data.name!r} has none, "
                          "use `dataset: core50`")
    return train, test


@register_scenario("core50_ni", test_dataset=None)  # needs a CORe50 layout: tests/test_catalogue.py
def core50_ni(
    data: Dataset,
    seed: int,
    session_order: Literal["fixed", "seeded"] | list[int] = "fixed",
    object_level: bool = True,
) -> Stream:
    """CORe50 NI (new instances): one training session per experience, every class in every one.

    One experience per training session, in ascending order (``fixed``), a permutation drawn from the run
    seed (``seeded``), or an explicit list of the training sessions. All classes are present every time, so
    the stream is domain-incremental (no task ids). ``object_level``: the 50 objects as classes (the
    benchmark's default); false gives the 10 categories (object o_k is category (k - 1) // 5).

    Evaluation follows the protocol: the one fixed test set (sessions 3, 7, 10), tested once after every
    experience, is the stream's single test task (``test_experiences``, schedule 0, 0, ...), so the accuracy
    matrix has one column, the accuracy on the whole test set after each session.
    """
    train_sessions, _ = _sessions(data, "core50_ni")
    available = sorted(set(train_sessions.tolist()))
    if isinstance(session_order, list):
        if sorted(session_order) != available:
            raise ConfigError(f"scenario.session_order: must list each training session once, {available} in any "
                              f"order, got {session_order}; or use 'fixed' or 'seeded'")
        order = list(session_order)
    elif session_order == "seeded":
        perm = torch.randperm(len(available), generator=torch.Generator().manual_seed(seed)).tolist()
        order = [available[i] for i in perm]
    else:
        order = available
    n_classes = data.n_classes if object_level else data.n_classes // CORE50_OBJECTS_PER_CATEGORY

    def labelled(s: Samples) -> Samples:
        return s if object_level else s.relabel(s.y // CORE50_OBJECTS_PER_CATEGORY)

    classes = tuple(range(n_classes))
    test = labelled(Samples(data.test))
    everything = Experience(0, 0, classes, labelled(Samples(data.train)), test)
    experiences = [
        Experience(i, 0, classes, labelled(Samples(data.train, torch.nonzero(train_sessions == s).flatten())), test)
        for i, s in enumerate(order)
    ]
    return Stream(f"core50_ni-{data.name}", experiences, n_classes, data.input_shape, list(classes),
                  "domain_incremental", False, info={"sessions": order, "object_level": object_level},
                  test_experiences=[everything], schedule=[0] * len(experiences))


@register_scenario("core50_nc", test_dataset=None)
def core50_nc(
    data: Dataset,
    seed: int,
    n_experiences: int = 9,
    first_classes: int | None = 10,
    class_order: Literal["fixed", "seeded"] | list[int] = "seeded",
) -> Stream:
    """CORe50 NC (new classes): the 50 objects in disjoint splits, all 8 training sessions of each; class-IL.

    The benchmark's NC split: 9 experiences, 10 objects in the first and 5 in each of the others, objects
    in an order drawn from the run seed (``class_order: seeded``; ``fixed`` or a list also work). Each
    experience trains on every training-session frame of its objects and tests on the test sessions'
    frames of the same objects; no task ids at test time (class-IL).
    """
    from cltoolbox.scenarios.incremental import split_by_class

    _sessions(data, "core50_nc")
    split = split_by_class(data, seed, n_experiences, class_order, first_classes, None, False)
    return Stream(f"core50_nc-{data.name}", split.experiences, split.n_classes, split.input_shape,
                  split.class_order, "class_incremental", False)
