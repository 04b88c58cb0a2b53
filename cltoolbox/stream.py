"""Experience and Stream: the contract between scenario generators and the training loop.

A scenario generator is a function ``(data: TensorData, seed: int, **params) -> Stream``. Nothing else in
the system knows how a stream was made: the loop trains on ``Experience.x_train/y_train`` and the
evaluator tests every ``Experience.x_test/y_test`` after each experience.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Experience:
    """One step of a stream. Tensors are float32 inputs and int64 labels (global class ids)."""

    index: int
    task_id: int
    classes: tuple[int, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.y_test.shape[0])

    def to(self, device: torch.device | str, _copies: dict | None = None) -> Experience:
        """The experience on ``device``; tensors shared between experiences are copied once (``_copies``)."""
        copies = {} if _copies is None else _copies

        def move(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in copies:
                copies[id(t)] = t.to(device)
            return copies[id(t)]

        return Experience(self.index, self.task_id, self.classes, move(self.x_train), move(self.y_train),
                          move(self.x_test), move(self.y_test))


@dataclass
class Stream:
    """The ordered experiences plus what a strategy may know about them.

    ``scenario`` is one of ``class_incremental``, ``task_incremental``, ``domain_incremental`` (or a
    generator's own word, e.g. ``online``). ``task_labels`` says whether task ids are given at test time
    (multi-head training and inference).

    Recurring and task-free streams train on more experiences than they have distinct tasks: they set
    ``test_experiences`` (one per distinct task, indexed 0..K-1, holding the test sets) and ``schedule``
    (for each training experience, the index of the test experience/task it draws from). The evaluator
    then tests ``eval_experiences`` and the metrics use ``first_seen``. Otherwise both stay None and
    every experience is its own task.
    """

    name: str
    experiences: list[Experience]
    n_classes: int
    input_shape: tuple[int, ...]
    class_order: list[int]
    scenario: str
    task_labels: bool = False
    info: dict = field(default_factory=dict)
    test_experiences: list[Experience] | None = None
    schedule: list[int] | None = None

    def __len__(self) -> int:
        return len(self.experiences)

    def __iter__(self):
        return iter(self.experiences)

    def __getitem__(self, i: int) -> Experience:
        return self.experiences[i]

    @property
    def eval_experiences(self) -> list[Experience]:
        """What the evaluator tests after every experience: the distinct tasks."""
        return self.test_experiences if self.test_experiences is not None else self.experiences

    def first_seen(self) -> list[int]:
        """For each eval experience, the row (1-based training experience) that first trains it; 0 = never."""
        schedule = self.schedule if self.schedule is not None else list(range(len(self.experiences)))
        out = [0] * len(self.eval_experiences)
        for row, task in enumerate(schedule, start=1):
            if out[task] == 0:
                out[task] = row
        return out

    @property
    def n_tasks(self) -> int:
        return max(e.task_id for e in [*self.experiences, *(self.test_experiences or [])]) + 1

    def task_class_mask(self) -> torch.Tensor:
        """Bool (n_tasks, n_classes): which outputs belong to each task (used for task-IL masking)."""
        mask = torch.zeros(self.n_tasks, self.n_classes, dtype=torch.bool)
        for e in [*self.experiences, *(self.test_experiences or [])]:
            mask[e.task_id, list(e.classes)] = True
        return mask

    def to(self, device: torch.device | str) -> Stream:
        copies: dict = {}  # recurring streams share test tensors across experiences: move each once
        return Stream(
            self.name,
            [e.to(device, copies) for e in self.experiences],
            self.n_classes,
            self.input_shape,
            self.class_order,
            self.scenario,
            self.task_labels,
            dict(self.info),
            None if self.test_experiences is None else [e.to(device, copies) for e in self.test_experiences],
            None if self.schedule is None else list(self.schedule),
        )


def validation_stream(stream: Stream, fraction: float, seed: int) -> Stream:
    """The validation protocol: hold out ``fraction`` of each experience's training data (a seeded random
    subset, drawn per experience) and evaluate on it instead of the test set, which is never looked at.

    Used for hyperparameter selection (``scenario.validation``); streams that revisit tasks share test sets
    across experiences and are not supported.
    """
    from cltoolbox.errors import ConfigError

    if stream.test_experiences is not None:
        raise ConfigError("scenario.validation: not supported for streams that revisit tasks; use a "
                          "class-, task- or domain-incremental scenario for validation-based tuning")
    g = torch.Generator().manual_seed(10_007 * seed + 17)
    experiences = []
    for e in stream.experiences:
        order = torch.randperm(e.n_train, generator=g).to(e.y_train.device)
        k = int(round(fraction * e.n_train))
        if k == 0 or k == e.n_train:
            raise ConfigError(f"scenario.validation: {fraction} leaves experience {e.index} with {k} validation "
                              f"samples out of {e.n_train}; choose a fraction that keeps both parts non-empty")
        val, train = order[:k].sort().values, order[k:].sort().values
        experiences.append(Experience(e.index, e.task_id, e.classes, e.x_train[train], e.y_train[train],
                                      e.x_train[val], e.y_train[val]))
    out = Stream(stream.name, experiences, stream.n_classes, stream.input_shape, stream.class_order,
                 stream.scenario, stream.task_labels, {**stream.info, "validation": fraction})
    return out
