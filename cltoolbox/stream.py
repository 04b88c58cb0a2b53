"""Experience and Stream: the contract between scenario generators and the training loop.

A scenario generator is a function ``(data: Dataset, seed: int, **params) -> Stream``. An experience holds
:class:`Samples`: *which* samples of a data source it trains and tests on (indices and labels), never copies
of the samples themselves, so a stream over ImageNet-R costs its labels, not its pixels. Nothing else in
the system knows how a stream was made: the loop fetches training batches by index and the evaluator
fetches every test set after each experience.

**Keys.** Every sample a stream can fetch has a key: ``view << 40 | index``, where ``view`` numbers the
distinct (source, transform) pairs of the stream in order of appearance and ``index`` is the sample's row
in its source. Keys are what replay memories and exemplar sets store; ``Stream.fetch(keys)`` returns the
samples, and a frozen extractor caches features by key. The numbering is deterministic, so keys survive a
checkpoint and a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from cltoolbox.data.source import Source, TensorSource

VIEW_SHIFT = 40
INDEX_MASK = (1 << VIEW_SHIFT) - 1

BatchTransform = Callable[[torch.Tensor], torch.Tensor]


class Samples:
    """Samples ``index`` (int64) of ``source``, labelled ``y`` as the stream sees them (default: the source's
    labels), with an optional batch ``transform`` applied after fetching (a per-experience permutation or
    rotation; it must be deterministic and act on each sample independently)."""

    def __init__(self, source: Source, index: torch.Tensor | None = None, y: torch.Tensor | None = None,
                 transform: BatchTransform | None = None) -> None:
        self.source = source
        self.index = torch.arange(len(source)) if index is None else index.to(torch.int64)
        self.y = source.labels[self.index.to(source.labels.device)] if y is None else y.to(torch.int64)
        if self.y.shape[0] != self.index.shape[0]:
            raise ValueError(f"Samples: {self.index.shape[0]} indices but {self.y.shape[0]} labels")
        self.transform = transform

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def subset(self, rows: torch.Tensor) -> Samples:
        """The samples at positions ``rows`` (int64 positions or a bool mask) of this set."""
        rows = rows.to(self.index.device)
        return Samples(self.source, self.index[rows], self.y[rows.to(self.y.device)], self.transform)

    def relabel(self, y: torch.Tensor) -> Samples:
        return Samples(self.source, self.index, y, self.transform)

    def fetch(self, rows: torch.Tensor | None = None, device: torch.device | None = None) -> torch.Tensor:
        """The model-ready inputs of ``rows`` (positions in this set; default all) on ``device``."""
        index = self.index if rows is None else self.index[rows.to(self.index.device)]
        x = self.source.fetch(index, device)
        return x if self.transform is None else self.transform(x)

    @staticmethod
    def of_tensors(x: torch.Tensor, y: torch.Tensor, key: str = "tensors") -> Samples:
        """A set holding the tensors themselves (inputs as they are, no normalisation)."""
        return Samples(TensorSource(x, y, key))

    @property
    def native_bytes(self) -> int:
        return self.source.native_bytes


@dataclass(eq=False)
class Experience:
    """One step of a stream: its index, task id, classes (global ids), and train and test :class:`Samples`."""

    index: int
    task_id: int
    classes: tuple[int, ...]
    train: Samples
    test: Samples

    @classmethod
    def from_tensors(cls, index: int, task_id: int, classes: Sequence[int], x_train: torch.Tensor,
                     y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> Experience:
        """An experience over in-memory tensors (float inputs used as they are, int64 labels)."""
        return cls(index, task_id, tuple(classes), Samples.of_tensors(x_train, y_train, f"exp{index}/train"),
                   Samples.of_tensors(x_test, y_test, f"exp{index}/test"))

    @property
    def y_train(self) -> torch.Tensor:
        return self.train.y

    @property
    def y_test(self) -> torch.Tensor:
        return self.test.y

    @property
    def x_train(self) -> torch.Tensor:
        """All training inputs, fetched at once: for small in-memory streams and tests; strategies walk large
        sets in batches instead (``Stream.batches``)."""
        return self.train.fetch()

    @property
    def x_test(self) -> torch.Tensor:
        return self.test.fetch()

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_test(self) -> int:
        return len(self.test)


@dataclass(eq=False)
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

    def __post_init__(self) -> None:
        # views: the distinct (source, transform) pairs, numbered in order of appearance
        self.views: list[tuple[Source, BatchTransform | None]] = []
        self._view_of: dict[tuple[int, int], int] = {}
        for e in [*self.experiences, *(self.test_experiences or [])]:
            for s in (e.train, e.test):
                self._view(s)

    def _view(self, s: Samples) -> int:
        pair = (id(s.source), id(s.transform))
        if pair not in self._view_of:
            self._view_of[pair] = len(self.views)
            self.views.append((s.source, s.transform))
        return self._view_of[pair]

    def __len__(self) -> int:
        return len(self.experiences)

    @property
    def multi_label(self) -> bool:
        """Multi-label stream (``info["multi_label"]``, set by scenario ``multi_label``): labels are multi-hot
        rows (N, n_classes), training uses a sigmoid/BCE head and the evaluator mAP/CF1/OF1."""
        return bool(self.info.get("multi_label", False))

    def __iter__(self):
        return iter(self.experiences)

    def __getitem__(self, i: int) -> Experience:
        return self.experiences[i]

    # -- keys and fetching -----------------------------------------------------------------------------
    def keys(self, samples: Samples) -> torch.Tensor:
        """The stream-wide keys of ``samples`` (int64, on the samples' index device)."""
        return samples.index | (self._view(samples) << VIEW_SHIFT)

    def fetch(self, keys: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """The model-ready inputs of ``keys``, in order, on ``device`` (default: the sources')."""
        if len(self.views) == 1:
            return self._fetch_view(0, keys, device)
        views = keys >> VIEW_SHIFT
        lo, hi = int(views.min()) if keys.numel() else 0, int(views.max()) if keys.numel() else 0
        if lo == hi:
            return self._fetch_view(lo, keys & INDEX_MASK, device)
        out = None
        for v in torch.unique(views).tolist():
            rows = torch.nonzero(views == v).flatten()
            part = self._fetch_view(v, keys[rows] & INDEX_MASK, device)
            if out is None:
                out = part.new_empty((keys.shape[0], *part.shape[1:]))
            out[rows.to(part.device)] = part
        return out

    def _fetch_view(self, view: int, index: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        source, transform = self.views[view]
        x = source.fetch(index & INDEX_MASK, device)
        return x if transform is None else transform(x)

    def batches(self, key_batches: Sequence[torch.Tensor], device: torch.device,
                workers: int = 0) -> Iterator[torch.Tensor]:
        """``fetch`` of each key batch in turn. Batches of one file-backed view are decoded ahead by ``workers``
        DataLoader processes; the batches (so the results) are the same for any number of workers."""
        if not key_batches:
            return
        views = torch.unique(torch.cat([k >> VIEW_SHIFT for k in key_batches])).tolist()
        if len(views) != 1:
            for k in key_batches:
                yield self.fetch(k, device)
            return
        source, transform = self.views[views[0]]
        for x in source.batches([k & INDEX_MASK for k in key_batches], device, workers):
            yield x if transform is None else transform(x)

    def sample_bytes(self) -> int:
        """Bytes of one training sample at its native (stored) size: what a memory copying it would hold."""
        return max((s.native_bytes for e in self.experiences for s in (e.train,)), default=0)

    def file_backed(self) -> bool:
        return any(src.file_backed() for src, _ in self.views)

    # -- tasks -----------------------------------------------------------------------------------------
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

    def to(self, device: torch.device | str, move_sources: bool = True) -> Stream:
        """The stream with in-memory sources, indices and labels on ``device``; shared sources and sample sets
        (recurring streams reuse test sets) are moved once, so views and keys stay the same.
        ``move_sources=False`` moves indices and labels only (data too large for the device stays on the host)."""
        sources: dict[int, Source] = {}
        sets: dict[int, Samples] = {}

        def move(s: Samples) -> Samples:
            if id(s) not in sets:
                if id(s.source) not in sources:
                    sources[id(s.source)] = s.source.to(device) if move_sources else s.source
                sets[id(s)] = Samples(sources[id(s.source)], s.index.to(device), s.y.to(device), s.transform)
            return sets[id(s)]

        def exps(es: list[Experience]) -> list[Experience]:
            return [Experience(e.index, e.task_id, e.classes, move(e.train), move(e.test)) for e in es]

        return Stream(
            self.name, exps(self.experiences), self.n_classes, self.input_shape, self.class_order, self.scenario,
            self.task_labels, dict(self.info),
            None if self.test_experiences is None else exps(self.test_experiences),
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
        order = torch.randperm(e.n_train, generator=g)
        k = int(round(fraction * e.n_train))
        if k == 0 or k == e.n_train:
            raise ConfigError(f"scenario.validation: {fraction} leaves experience {e.index} with {k} validation "
                              f"samples out of {e.n_train}; choose a fraction that keeps both parts non-empty")
        val, train = order[:k].sort().values, order[k:].sort().values
        experiences.append(Experience(e.index, e.task_id, e.classes, e.train.subset(train), e.train.subset(val)))
    return Stream(stream.name, experiences, stream.n_classes, stream.input_shape, stream.class_order,
                  stream.scenario, stream.task_labels, {**stream.info, "validation": fraction})
