"""Recurring streams: tasks and classes that come back (power-law revisits, class-incremental with repetition).

Both generators train on more experiences than they have distinct tasks, so they set
``Stream.test_experiences`` (one per distinct task, carrying the task's full training set and its test set)
and ``Stream.schedule`` (the task each training experience draws from). The evaluator then tests the
distinct tasks after every experience, the metrics use ``first_seen``, and ``stream.json`` records the
schedule.

The helpers at the top (class order, shared test subsets) are also used by the online, few-shot and
curriculum generators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
import torch

from cltoolbox.data.base import Dataset
from cltoolbox.data.source import Source
from cltoolbox.errors import ConfigError
from cltoolbox.params import Interval, PositiveInt
from cltoolbox.registry import register_scenario
from cltoolbox.stream import Experience, Samples, Stream

# ---------------------------------------------------------------------------------------------------------
# shared helpers


def resolve_class_order(n_classes: int, class_order: Literal["fixed", "seeded"] | list[int], seed: int) -> list[int]:
    """The class order of ``class_incremental``: fixed (0..C-1), seeded permutation, or an explicit list."""
    if isinstance(class_order, list):
        if sorted(class_order) != list(range(n_classes)):
            raise ConfigError(
                f"scenario.class_order: must be a permutation of 0..{n_classes - 1}, got {class_order}; "
                "list every class once, or use 'fixed' or 'seeded'")
        return list(class_order)
    if class_order == "seeded":
        return torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    return list(range(n_classes))


class ClassSubsets:
    """The samples of a set of classes in one source, cached per class set, so that experiences with the same
    classes share one :class:`Samples` (one index tensor, and the same test set for the evaluator) instead of
    each holding its own (a long stream would otherwise repeat the test indices once per experience)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._cache: dict[tuple[int, ...], Samples] = {}

    def __call__(self, classes: Sequence[int]) -> Samples:
        key = tuple(sorted(int(c) for c in classes))
        if key not in self._cache:
            y = self.source.labels
            mask = torch.isin(y, torch.tensor(key, dtype=y.dtype, device=y.device))
            self._cache[key] = Samples(self.source, torch.nonzero(mask).flatten())
        return self._cache[key]


def task_experience(index: int, task_id: int, classes: Sequence[int], train: ClassSubsets,
                    test: ClassSubsets) -> Experience:
    """One class-group task with all its training and test samples (a ``test_experiences`` entry)."""
    classes = tuple(int(c) for c in classes)
    return Experience(index, task_id, classes, train(classes), test(classes))


def concat(parts: Sequence[Samples]) -> Samples:
    """The samples of ``parts`` one after the other (all of one source and transform)."""
    first = parts[0]
    if any(p.source is not first.source or p.transform is not first.transform for p in parts):
        raise ValueError("concat: the parts must share their source and transform")
    return Samples(first.source, torch.cat([p.index for p in parts]), torch.cat([p.y for p in parts]),
                   first.transform)


# ---------------------------------------------------------------------------------------------------------
# power-law revisits


def introduction_steps(n_tasks: int, n_experiences: int) -> list[int]:
    """The step at which each task is first trained: evenly spaced, task 0 at step 0 (the paper's phases)."""
    return [k * n_experiences // n_tasks for k in range(n_tasks)]


def power_law_schedule(n_tasks: int, n_experiences: int, exponent: float, seed: int) -> list[int]:
    """The task trained at each step of a power-law environment.

    Task ``k`` is introduced (trained for the first time) at step ``introduction_steps(...)[k]``. Every
    other step revisits one of the tasks introduced so far, task ``k`` with probability proportional to
    ``(t - last_k) ** -exponent``, where ``t - last_k >= 1`` is the number of steps since ``k`` was last
    trained: the need probability of Anderson & Schooler (1991), which decays as a power law of the time
    since the last encounter. Seeded (numpy PCG64).
    """
    rng = np.random.default_rng(seed)
    intro = introduction_steps(n_tasks, n_experiences)
    last = np.zeros(n_tasks, dtype=np.int64)
    schedule: list[int] = []
    introduced = 0
    for t in range(n_experiences):
        if introduced < n_tasks and t == intro[introduced]:
            task = introduced
            introduced += 1
        else:
            w = (t - last[:introduced]).astype(np.float64) ** -exponent
            c = np.cumsum(w)
            task = min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), introduced - 1)
        last[task] = t
        schedule.append(task)
    return schedule


def sequential_schedule(n_tasks: int, n_experiences: int) -> list[int]:
    """The control without revisits: each task trained in one block, introduced at the same steps."""
    intro = introduction_steps(n_tasks, n_experiences) + [n_experiences]
    return [k for k in range(n_tasks) for _ in range(intro[k + 1] - intro[k])]


def fit_power_law_exponent(schedule: Sequence[int], max_exponent: float = 10.0) -> float:
    """Maximum-likelihood estimate of the exponent of a schedule made by :func:`power_law_schedule`.

    Every step that revisits a task is a choice among the tasks seen before it, each with probability
    ``lag ** -a / sum_k lag_k ** -a`` (lag = steps since that task was last trained); first appearances are
    not choices and are skipped. The log-likelihood is concave in ``a``; it is maximised by bisection on
    its derivative over ``[0, max_exponent]``.
    """
    n_tasks = max(schedule) + 1
    last = np.full(n_tasks, -1, dtype=np.int64)
    L = np.full((len(schedule), n_tasks), np.nan)  # log lag of every introduced task at every revisit
    c = np.zeros(len(schedule))
    rows = np.zeros(len(schedule), dtype=bool)
    for t, task in enumerate(schedule):
        seen = last >= 0
        if seen[task] and seen.sum() > 1:
            L[t, seen] = np.log(t - last[seen])
            c[t] = math.log(t - last[task])
            rows[t] = True
        last[task] = t
    if not rows.any():
        raise ValueError("the schedule has no revisit with two or more candidate tasks; nothing to fit")
    L, c = L[rows], c[rows]
    valid = ~np.isnan(L)
    shift = np.nanmin(L, axis=1)  # per-row shift (cancels in the ratio): keeps exp(-a * L0) <= 1
    L0 = np.where(valid, L - shift[:, None], 0.0)
    c = c - shift

    def dlogl(a: float) -> float:
        # d/da sum_t [-a log lag_chosen - log sum_k lag_k^-a] = sum_t [E_p(a)[log lag] - log lag_chosen]
        w = np.where(valid, np.exp(-a * L0), 0.0)
        return float(((w * L0).sum(1) / w.sum(1) - c).sum())

    lo, hi = 0.0, max_exponent
    if dlogl(lo) <= 0:
        return 0.0
    if dlogl(hi) >= 0:
        return max_exponent
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dlogl(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


@register_scenario("power_law", test_params={"n_tasks": 3, "n_experiences": 6, "samples_per_experience": 100})
def power_law(
    data: Dataset,
    seed: int,
    n_tasks: PositiveInt = 5,
    n_experiences: int = 50,
    exponent: Annotated[float, Interval(0, math.inf, high_open=True)] = 1.0,
    samples_per_experience: PositiveInt = 200,
    tasks: Literal["permuted", "class_split"] = "permuted",
    rehearsal: bool = True,
) -> Stream:
    """Power-law environment: tasks recur with probability decaying as a power of the time since last seen.

    The naturalistic environments of Gandhi, Shah, Marupudi & Varma 2024, "Catastrophic Interference is
    Mitigated in Naturalistic Power-Law Learning Environments" (arXiv 2401.10393; later versions: "Natural
    Mitigation of Catastrophic Interference: Continual Learning in Power-Law Learning Environments"), after
    Anderson & Schooler 1991: ``n_tasks`` tasks are introduced in order at evenly spaced steps of an
    ``n_experiences``-step schedule; every other step revisits a task already introduced, task k with
    probability proportional to ``(steps since k was last trained) ** -exponent`` (see
    :func:`power_law_schedule`; :func:`fit_power_law_exponent` recovers the exponent from a schedule).
    Each experience is a seeded random subset of ``samples_per_experience`` training samples of its task.
    Exponents of 0.5-1 match Anderson & Schooler's environments; 0 revisits uniformly; well above 1 the
    task trained last (lag 1) dominates and the stream rarely switches.

    ``tasks``: ``permuted`` (domain-incremental Permuted-MNIST style: one seeded pixel permutation per task,
    all classes each time, task ids 0..n_tasks-1 as in ``permuted``) or ``class_split`` (the classes split
    evenly into n_tasks groups in class order, class-IL, task id 0). ``rehearsal: false`` is the control
    with the same steps and samples: each task trained in one block, never revisited.

    Evaluation: ``test_experiences`` holds one entry per task (its whole training and test set); the
    accuracy matrices have one column per task and ``schedule`` maps every experience to its task.
    """
    if n_experiences < n_tasks:
        raise ConfigError(f"scenario.n_experiences: {n_experiences} steps cannot introduce {n_tasks} tasks; "
                          f"set n_experiences >= n_tasks ({n_tasks})")
    C = data.n_classes
    if tasks == "permuted":
        from cltoolbox.scenarios.domain import permuted

        task_exps = permuted(data, seed, n_experiences=n_tasks).experiences
        kind, class_order = "domain_incremental", list(range(C))
    else:
        if C % n_tasks:
            raise ConfigError(f"scenario.n_tasks: {C} classes cannot be split evenly into {n_tasks} tasks; "
                              f"choose a divisor of {C}")
        per = C // n_tasks
        train, test = ClassSubsets(data.train), ClassSubsets(data.test)
        task_exps = [task_experience(k, 0, range(k * per, (k + 1) * per), train, test) for k in range(n_tasks)]
        kind, class_order = "class_incremental", list(range(C))
    smallest = min(e.n_train for e in task_exps)
    if samples_per_experience > smallest:
        raise ConfigError(f"scenario.samples_per_experience: {samples_per_experience} exceeds the {smallest} "
                          f"training samples of the smallest task; set it <= {smallest}")

    schedule = (power_law_schedule(n_tasks, n_experiences, exponent, seed) if rehearsal
                else sequential_schedule(n_tasks, n_experiences))
    g = torch.Generator().manual_seed(seed + 2)
    experiences = []
    for i, k in enumerate(schedule):
        task = task_exps[k]
        idx = torch.randperm(task.n_train, generator=g)[:samples_per_experience]
        # every experience of a task shares the task's test set (the same Samples as its test experience)
        experiences.append(Experience(i, task.task_id, task.classes, task.train.subset(idx), task.test))
    info = {"tasks": tasks, "exponent": exponent, "rehearsal": rehearsal,
            "introduction_steps": introduction_steps(n_tasks, n_experiences)}
    return Stream(f"power_law-{data.name}", experiences, C, data.input_shape, class_order, kind,
                  task_labels=False, info=info, test_experiences=task_exps, schedule=schedule)


# ---------------------------------------------------------------------------------------------------------
# class-incremental with repetition


def repetition_plan(n_groups: int, group_size: int, n_experiences: int, p_repeat: float,
                    seed: int) -> tuple[list[int | None], list[list[int]]]:
    """For each experience: the class group it introduces (None after the last one) and the positions (in
    class order) of the earlier classes that come back, each independently with probability ``p_repeat``.
    An experience that would be empty (all groups introduced, nothing drawn) gets one earlier class drawn
    uniformly. Seeded."""
    g = torch.Generator().manual_seed(seed + 3)
    new: list[int | None] = []
    repeats: list[list[int]] = []
    for i in range(n_experiences):
        seen = min(i, n_groups) * group_size
        draws = torch.rand(seen, generator=g) < p_repeat
        rep = torch.nonzero(draws).flatten().tolist()
        if i >= n_groups and not rep:
            rep = [int(torch.randint(seen, (1,), generator=g))]
        new.append(i if i < n_groups else None)
        repeats.append(rep)
    return new, repeats


@register_scenario("repetition", test_params={"n_experiences": 7, "new_classes_per_exp": 2, "p_repeat": 0.3,
                                "repeat_fraction": 0.5})
def repetition(
    data: Dataset,
    seed: int,
    n_experiences: int = 10,
    new_classes_per_exp: int = 2,
    p_repeat: Annotated[float, Interval(0, 1)] = 0.3,
    repeat_fraction: Annotated[float, Interval(0, 1, low_open=True)] = 1.0,
    class_order: Literal["fixed", "seeded"] | list[int] = "fixed",
) -> Stream:
    """Class-incremental with repetition: new classes in order, earlier classes come back with p_repeat.

    In the spirit of Hemati et al. 2023, "Class-Incremental Learning with Repetition": the classes (in
    ``class_order``) form groups of ``new_classes_per_exp``; experience i < n_groups introduces group i,
    and in every experience each class introduced earlier comes back independently with probability
    ``p_repeat`` (seeded), with a seeded ``repeat_fraction`` of its training samples. Experiences after the
    last group hold repeats only (one earlier class drawn uniformly if none came back).

    Evaluation: one test experience per class group (its test samples), so the accuracy matrices have one
    column per group; ``schedule`` maps an experience to the group it introduces, or, for repeat-only
    experiences, to the group with most classes in it (lowest index on ties). Each group is first
    trained by the experience that introduces it, so ``first_seen`` is 1..n_groups.
    """
    C = data.n_classes
    order = resolve_class_order(C, class_order, seed)
    if new_classes_per_exp < 1 or C % new_classes_per_exp:
        raise ConfigError(f"scenario.new_classes_per_exp: {new_classes_per_exp} does not divide the {C} classes; "
                          f"choose a divisor of {C}")
    n_groups = C // new_classes_per_exp
    if n_experiences < n_groups:
        raise ConfigError(f"scenario.n_experiences: {n_experiences} experiences cannot introduce {n_groups} class "
                          f"groups of {new_classes_per_exp}; set n_experiences >= {n_groups}")
    if p_repeat == 0.0 and n_experiences > n_groups:
        raise ConfigError(f"scenario.p_repeat: 0 leaves the {n_experiences - n_groups} experiences after the "
                          f"last new group without data; set p_repeat > 0 or n_experiences: {n_groups}")

    groups = [order[k * new_classes_per_exp:(k + 1) * new_classes_per_exp] for k in range(n_groups)]
    group_of = {c: k for k, grp in enumerate(groups) for c in grp}
    train, test = ClassSubsets(data.train), ClassSubsets(data.test)
    by_class = {c: train([c]) for c in range(C)}
    new, repeats = repetition_plan(n_groups, new_classes_per_exp, n_experiences, p_repeat, seed)
    g = torch.Generator().manual_seed(seed + 4)
    experiences, schedule, info_new, info_rep = [], [], [], []
    for i in range(n_experiences):
        fresh = groups[new[i]] if new[i] is not None else []
        rep = [order[p] for p in repeats[i]]
        parts = [by_class[c] for c in fresh]
        for c in rep:
            keep = max(1, round(repeat_fraction * len(by_class[c])))
            idx = torch.randperm(len(by_class[c]), generator=g)[:keep].sort().values
            parts.append(by_class[c].subset(idx))
        classes = tuple(sorted(fresh + rep))
        experiences.append(Experience(i, 0, classes, concat(parts), test(classes)))
        if new[i] is not None:
            schedule.append(new[i])
        else:
            counts = np.bincount([group_of[c] for c in rep], minlength=n_groups)
            schedule.append(int(counts.argmax()))
        info_new.append(list(fresh))
        info_rep.append(sorted(rep))
    tests = [task_experience(k, 0, grp, train, test) for k, grp in enumerate(groups)]
    info = {"p_repeat": p_repeat, "repeat_fraction": repeat_fraction, "groups": groups,
            "new_classes": info_new, "repeated_classes": info_rep}
    return Stream(f"repetition-{data.name}", experiences, C, data.input_shape, order, "class_incremental",
                  task_labels=False, info=info, test_experiences=tests, schedule=schedule)
