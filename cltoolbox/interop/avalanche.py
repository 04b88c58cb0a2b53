"""Avalanche 0.6 <-> cltoolbox streams.

* :func:`from_avalanche` turns an Avalanche benchmark (the classic generators such as ``nc_benchmark`` /
  ``SplitMNIST``, and the new API: ``benchmark_from_datasets``, ``class_incremental_benchmark``, ...) into a
  cltoolbox :class:`~cltoolbox.stream.Stream`, so cltoolbox strategies, metrics and run folders work on it.
* :func:`to_avalanche` turns any cltoolbox stream into an Avalanche benchmark (new API), so Avalanche users
  get cltoolbox's scenario generators.

Conventions:

* Samples are read in the order the Avalanche dataset yields them, with its ``eval`` transform group (no
  random training augmentation is baked into tensors; add augmentation as a cltoolbox plugin instead).
* An experience holds one task: its Avalanche task label is the cltoolbox ``task_id``; an experience
  mixing task labels is refused.
* Train and test streams of the same length pair up: experience i tests on test experience i. A test
  stream of a different length is a set of distinct tasks (``Stream.test_experiences``) and every train
  experience is scheduled to the test experience with its task label (if the test task labels are
  distinct), else to the one sharing most classes.
* ``to_avalanche`` exports the training experiences as ``train_stream`` and ``stream.eval_experiences`` as
  ``test_stream`` (with task labels, ``classes_in_this_experience`` and the rest of Avalanche's classes
  timeline). Recurring streams also get ``task_train_stream`` (the whole training set of each distinct
  task) and ``experience_test_stream`` (each training experience's own test set); Avalanche strategies
  ignore both. The stream's metadata (name, scenario, class order, task-label
  setting, schedule, info) rides along as the ``cltoolbox_stream`` attribute, so
  ``from_avalanche(to_avalanche(s))`` gives back ``s``: same samples, labels, task ids, order and metadata.

Avalanche is imported lazily (its import takes several seconds).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from cltoolbox.stream import Experience, Samples, Stream

META_ATTR = "cltoolbox_stream"


@functools.cache
def _av() -> SimpleNamespace:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # import-time deprecation chatter
        from avalanche.benchmarks.scenarios import (
            benchmark_from_datasets,
            with_classes_timeline,
            with_task_labels,
        )
        from avalanche.benchmarks.utils import DataAttribute, TaskLabels
        from avalanche.benchmarks.utils.classification_dataset import TaskAwareSupervisedClassificationDataset
    return SimpleNamespace(benchmark_from_datasets=benchmark_from_datasets, with_classes_timeline=with_classes_timeline,
                           with_task_labels=with_task_labels, DataAttribute=DataAttribute, TaskLabels=TaskLabels,
                           Dataset=TaskAwareSupervisedClassificationDataset)


class TensorPairs(torch.utils.data.Dataset):
    """(x[i], int(y[i])) over two tensors, with the ``targets`` list Avalanche reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.targets = y.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], self.targets[i]


def avalanche_dataset(x: torch.Tensor, y: torch.Tensor, task_id: int) -> Any:
    """An Avalanche classification dataset yielding (x, y, task label) over CPU tensors."""
    av = _av()
    x, y = x.detach().cpu(), y.detach().cpu()
    return av.Dataset([TensorPairs(x, y)],
                      data_attributes=[av.DataAttribute(y.tolist(), "targets"), av.TaskLabels([int(task_id)] * len(y))])


def _meta(stream: Stream) -> dict[str, Any]:
    return {
        "name": stream.name, "n_classes": stream.n_classes, "input_shape": list(stream.input_shape),
        "class_order": list(stream.class_order), "scenario": stream.scenario, "task_labels": stream.task_labels,
        "info": copy.deepcopy(stream.info), "classes": [list(e.classes) for e in stream.experiences],
        "eval_classes": [list(e.classes) for e in stream.eval_experiences],
        "schedule": None if stream.schedule is None else list(stream.schedule),
        "recurring": stream.test_experiences is not None,
    }


def samples_tensor(samples: Samples, batch_size: int = 2048) -> torch.Tensor:
    """All inputs of ``samples`` on the CPU, fetched ``batch_size`` at a time (Avalanche datasets hold tensors)."""
    rows = torch.arange(len(samples))
    parts = [samples.fetch(r, torch.device("cpu")) for r in rows.split(batch_size)]
    return torch.cat(parts) if parts else samples.fetch(rows, torch.device("cpu"))


def to_avalanche(stream: Stream, batch_size: int = 2048) -> Any:
    """A cltoolbox stream as an Avalanche ``CLScenario`` (train_stream, test_stream; see the module doc).

    Avalanche datasets hold tensors, so every sample set is fetched (``batch_size`` samples at a time) into
    CPU memory; a set shared by several experiences (a recurring stream's test sets) is fetched once.
    """
    av = _av()
    fetched: dict[int, torch.Tensor] = {}

    def dataset(s: Samples, task_id: int) -> Any:
        if id(s) not in fetched:
            fetched[id(s)] = samples_tensor(s, batch_size)
        return avalanche_dataset(fetched[id(s)], s.y, task_id)

    streams = {
        "train": [dataset(e.train, e.task_id) for e in stream.experiences],
        "test": [dataset(e.test, e.task_id) for e in stream.eval_experiences],
    }
    if stream.test_experiences is not None:  # what the train/test streams do not carry, for the round trip
        streams["task_train"] = [dataset(e.train, e.task_id) for e in stream.test_experiences]
        streams["experience_test"] = [dataset(e.test, e.task_id) for e in stream.experiences]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = av.with_classes_timeline(av.with_task_labels(av.benchmark_from_datasets(**streams)))
    setattr(bm, META_ATTR, _meta(stream))
    return bm


def dataset_tensors(dataset: Any, batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x float32, y int64, task labels int64) of an Avalanche dataset, in its order, eval transforms."""
    ds = dataset.eval() if hasattr(dataset, "eval") else dataset
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0,
                                         collate_fn=getattr(ds, "collate_fn", None))
    xs, ys, ts = [], [], []
    for batch in loader:
        x, y = batch[0], torch.as_tensor(batch[1])
        xs.append(torch.as_tensor(x))
        ys.append(y)
        ts.append(torch.as_tensor(batch[2]) if len(batch) > 2 else torch.zeros_like(y))
    if not xs:
        raise ValueError("an Avalanche experience holds no samples; cltoolbox experiences need data")
    return torch.cat(xs).float(), torch.cat(ys).long(), torch.cat(ts).long()


def _task_of(t: torch.Tensor, where: str) -> int:
    tasks = torch.unique(t).tolist()
    if len(tasks) != 1:
        raise ValueError(f"{where} mixes task labels {tasks}; a cltoolbox experience holds one task")
    return int(tasks[0])


def _classes(*ys: torch.Tensor) -> tuple[int, ...]:
    return tuple(sorted(set().union(*(torch.unique(y).tolist() for y in ys))))


def _holds(s: Samples, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the in-memory set ``s`` (from :meth:`Samples.of_tensors`) holds exactly ``x``, ``y``."""
    return torch.equal(s.y, y) and torch.equal(s.source.x, x)


def _first_appearance(class_sets: Sequence[Sequence[int]], n_classes: int) -> list[int]:
    order: list[int] = []
    for cls in class_sets:
        order += [c for c in sorted(cls) if c not in order]
    return order + [c for c in range(n_classes) if c not in order]


def from_avalanche(benchmark: Any, name: str | None = None, use_metadata: bool = True) -> Stream:
    """An Avalanche benchmark (``train_stream`` + ``test_stream``) as a cltoolbox :class:`Stream`.

    Inferred (unless the benchmark came from :func:`to_avalanche` and ``use_metadata``): experience i's
    classes are the labels in its train and paired test data; ``n_classes`` = largest label + 1 (or the
    benchmark's ``n_classes``); ``class_order`` = the benchmark's ``classes_order`` if it has one, else
    order of first appearance; ``task_labels`` (multi-head, task ids at test time) when the train stream has
    several task labels; scenario ``task_incremental`` then, ``domain_incremental`` when every experience
    has the same classes, else ``class_incremental``.
    """
    train = list(benchmark.train_stream)
    test = list(benchmark.test_stream)
    if not train or not test:
        raise ValueError("the benchmark needs a non-empty train_stream and test_stream")
    tr = [dataset_tensors(e.dataset) for e in train]
    te = [dataset_tensors(e.dataset) for e in test]
    tr_tasks = [_task_of(t, f"train experience {i}") for i, (_, _, t) in enumerate(tr)]
    te_tasks = [_task_of(t, f"test experience {i}") for i, (_, _, t) in enumerate(te)]
    meta = getattr(benchmark, META_ATTR, None) if use_metadata else None
    if meta is not None and (len(meta["classes"]) != len(tr) or len(meta["eval_classes"]) != len(te)):
        meta = None  # the benchmark was changed after export: infer instead

    paired = len(tr) == len(te) and not (meta and meta["recurring"])
    if meta is not None:
        schedule = meta["schedule"]
    elif paired:
        schedule = None
    elif len(set(te_tasks)) == len(te_tasks):
        missing = [i for i, t in enumerate(tr_tasks) if t not in te_tasks]
        if missing:
            raise ValueError(f"train experience {missing[0]} has task label {tr_tasks[missing[0]]}, which no test "
                             "experience has")
        schedule = [te_tasks.index(t) for t in tr_tasks]
    else:
        te_cls = [set(_classes(y)) for _, y, _ in te]
        schedule = []
        for _, y, _ in tr:
            mine = set(_classes(y))
            schedule.append(max(range(len(te)), key=lambda k, c=mine: (len(c & te_cls[k]), -k)))

    n_classes = 1 + max(int(y.max()) for _, y, _ in [*tr, *te])
    n_classes = max(n_classes, int(getattr(benchmark, "n_classes", 0) or 0))
    # one in-memory source per Avalanche dataset: the tensors as read, no normalisation
    train_sets = [Samples.of_tensors(x, y, f"avalanche/train/{i}") for i, (x, y, _) in enumerate(tr)]
    test_sets = [Samples.of_tensors(x, y, f"avalanche/test/{k}") for k, (x, y, _) in enumerate(te)]
    tests = None
    experiences = []
    if paired:
        for i, (s, st) in enumerate(zip(train_sets, test_sets, strict=True)):
            classes = tuple(meta["classes"][i]) if meta else _classes(s.y, st.y)
            experiences.append(Experience(i, tr_tasks[i], classes, s, st))
    else:
        task_train = exp_test = None
        if meta is not None and hasattr(benchmark, "task_train_stream"):
            task_train = [Samples.of_tensors(*dataset_tensors(e.dataset)[:2], f"avalanche/task_train/{k}")
                          for k, e in enumerate(benchmark.task_train_stream)]
        if meta is not None and hasattr(benchmark, "experience_test_stream"):
            exp_test = [dataset_tensors(e.dataset)[:2] for e in benchmark.experience_test_stream]
        tests = []
        for k, st in enumerate(test_sets):
            mine = [i for i, s in enumerate(schedule) if s == k]
            if task_train is not None:
                s = task_train[k]
            elif mine:  # the train samples scheduled to this task stand in for its training set
                s = Samples.of_tensors(torch.cat([tr[i][0] for i in mine]), torch.cat([tr[i][1] for i in mine]),
                                       f"avalanche/task_train/{k}")
            else:
                s = st.subset(torch.arange(0))
            classes = tuple(meta["eval_classes"][k]) if meta else _classes(st.y)
            tests.append(Experience(k, te_tasks[k], classes, s, st))
        for i, s in enumerate(train_sets):
            # an experience whose test set is its task's shares the task's Samples (one copy, one view)
            st = tests[schedule[i]].test
            if exp_test is not None and not _holds(st, *exp_test[i]):
                st = Samples.of_tensors(*exp_test[i], f"avalanche/experience_test/{i}")
            classes = tuple(meta["classes"][i]) if meta else _classes(s.y, st.y)
            experiences.append(Experience(i, tr_tasks[i], classes, s, st))

    if meta is not None:
        return Stream(name or meta["name"], experiences, meta["n_classes"], tuple(meta["input_shape"]),
                      list(meta["class_order"]), meta["scenario"], meta["task_labels"], copy.deepcopy(meta["info"]),
                      tests, None if schedule is None else list(schedule))
    task_labels = len(set(tr_tasks)) > 1
    class_sets = [e.classes for e in experiences]
    if task_labels:
        scenario = "task_incremental"
    elif len(class_sets) > 1 and all(c == class_sets[0] for c in class_sets):
        scenario = "domain_incremental"
    else:
        scenario = "class_incremental"
    order = getattr(benchmark, "classes_order", None)
    if order is None or sorted(int(c) for c in order) != list(range(n_classes)):
        order = _first_appearance(class_sets, n_classes)
    bench_name = name or f"avalanche-{type(benchmark).__name__}"
    return Stream(bench_name, experiences, n_classes, tuple(experiences[0].train.source.sample_shape),
                  [int(c) for c in order], scenario, task_labels, {"source": "avalanche"}, tests, schedule)
