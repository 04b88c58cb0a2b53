"""Avalanche 0.6 <-> cltoolbox: round trips keep samples, labels, task ids and order; exports train in Avalanche."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from cltoolbox.data import load_dataset
from cltoolbox.interop.avalanche import dataset_tensors, from_avalanche, to_avalanche
from cltoolbox.registry import SCENARIOS
from cltoolbox.stream import Stream


@pytest.fixture(scope="module")
def av() -> SimpleNamespace:
    """Avalanche, imported once for the module (several seconds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avalanche.benchmarks import nc_benchmark
        from avalanche.benchmarks.scenarios import class_incremental_benchmark
        from avalanche.evaluation.metrics import accuracy_metrics
        from avalanche.training import Naive
        from avalanche.training.plugins import EvaluationPlugin
    return SimpleNamespace(nc_benchmark=nc_benchmark, class_incremental_benchmark=class_incremental_benchmark,
                           Naive=Naive, EvaluationPlugin=EvaluationPlugin, accuracy_metrics=accuracy_metrics)


class TensorSet(torch.utils.data.Dataset):
    """A plain dataset with ``targets``, the input Avalanche's generators take."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.targets = x, y, y.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], self.targets[i]


def assert_same_stream(a: Stream, b: Stream) -> None:
    assert (a.name, a.n_classes, a.input_shape, a.class_order, a.scenario, a.task_labels, a.schedule, a.info) == \
        (b.name, b.n_classes, b.input_shape, b.class_order, b.scenario, b.task_labels, b.schedule, b.info)
    assert (a.test_experiences is None) == (b.test_experiences is None)
    for e1, e2 in zip([*a, *(a.test_experiences or [])], [*b, *(b.test_experiences or [])], strict=True):
        assert (e1.index, e1.task_id, e1.classes) == (e2.index, e2.task_id, e2.classes)
        for k in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(e1, k), getattr(e2, k)), k


def assert_matches_benchmark(stream: Stream, bm) -> None:
    """Every experience of the stream holds exactly what Avalanche yields, in the same order."""
    train, test = list(bm.train_stream), list(bm.test_stream)
    assert len(stream) == len(train)
    for ours, theirs in zip(stream, train, strict=True):
        x, y, t = dataset_tensors(theirs.dataset)
        assert torch.equal(ours.x_train, x) and torch.equal(ours.y_train, y) and (t == ours.task_id).all()
    for ours, theirs in zip(stream.eval_experiences, test, strict=True):
        x, y, t = dataset_tensors(theirs.dataset)
        assert torch.equal(ours.x_test, x) and torch.equal(ours.y_test, y) and (t == ours.task_id).all()


def test_split_mnist_round_trip(av) -> None:
    data = load_dataset("mnist5k")
    bm = av.nc_benchmark(TensorSet(data.x_train, data.y_train), TensorSet(data.x_test, data.y_test),
                         n_experiences=5, task_labels=False, shuffle=False, fixed_class_order=list(range(10)))
    s = from_avalanche(bm)
    assert_matches_benchmark(s, bm)
    assert s.scenario == "class_incremental" and not s.task_labels and s.class_order == list(range(10))
    assert [e.classes for e in s] == [tuple(e.classes_in_this_experience) for e in bm.train_stream]
    ours = SCENARIOS.get("class_incremental").factory(data, 0, n_experiences=5)  # same samples per experience
    for a, b in zip(s, ours, strict=True):
        assert a.classes == b.classes
        assert torch.equal(a.x_train.flatten(1).sum(1).sort().values, b.x_train.flatten(1).sum(1).sort().values)

    back = to_avalanche(s)
    assert_matches_benchmark(s, back)
    assert [e.task_label for e in back.train_stream] == [0] * 5
    assert [sorted(e.classes_in_this_experience) for e in back.train_stream] == [list(e.classes) for e in s]
    assert_same_stream(from_avalanche(back), s)


def test_new_api_benchmarks_round_trip(av) -> None:
    data = load_dataset("digits")
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    bm = av.class_incremental_benchmark({"train": TensorSet(data.x_train, data.y_train),
                                         "test": TensorSet(data.x_test, data.y_test)},
                                        class_order=order, num_experiences=5)
    s = from_avalanche(bm)
    assert_matches_benchmark(s, bm)
    assert [e.classes for e in s] == [tuple(sorted(order[2 * k:2 * k + 2])) for k in range(5)]
    assert s.class_order == [c for k in range(5) for c in sorted(order[2 * k:2 * k + 2])]
    assert_same_stream(from_avalanche(to_avalanche(s)), s)

    # task labels and a recurring stream (more train than test experiences), through benchmark_from_datasets
    for name, params in (("task_incremental", {"n_experiences": 5}),
                         ("power_law", {"n_tasks": 3, "n_experiences": 7, "samples_per_experience": 40}),
                         ("online", {"n_tasks": 2, "chunk_size": 300, "blur": 0.1})):
        ours = SCENARIOS.get(name).factory(data, 0, **params)
        exported = to_avalanche(ours)
        assert [e.task_label for e in exported.train_stream] == [e.task_id for e in ours]
        assert len(exported.test_stream) == len(ours.eval_experiences)
        assert_matches_benchmark(ours, exported)
        assert_same_stream(from_avalanche(exported), ours)
    inferred = from_avalanche(exported, use_metadata=False)  # the online stream, without our metadata
    assert len(inferred.test_experiences) == 2 and inferred.scenario == "class_incremental"
    assert all(torch.equal(a.x_train, b.x_train) for a, b in zip(inferred, ours, strict=True))


def test_shared_test_sets_are_fetched_once_and_come_back_shared(av, monkeypatch) -> None:
    """A power-law stream's experiences test on their task's test set (one Samples per task): the export
    fetches each sample set once, and the import shares the task's set again."""
    import cltoolbox.interop.avalanche as interop

    ours = SCENARIOS.get("power_law").factory(load_dataset("digits"), 0, n_tasks=3, n_experiences=7,
                                                samples_per_experience=40)
    fetched = []
    fetch = interop.samples_tensor
    monkeypatch.setattr(interop, "samples_tensor", lambda s, *a: fetched.append(s) or fetch(s, *a))
    exported = to_avalanche(ours)
    distinct = {id(s) for e in [*ours, *ours.test_experiences] for s in (e.train, e.test)}
    assert len(fetched) == len(distinct) == len({id(s) for s in fetched}) == 7 + 3 + 3
    back = from_avalanche(exported)
    tests = [t.test for t in back.test_experiences]
    assert all(e.test is tests[k] for e, k in zip(back, back.schedule, strict=True))
    assert len(back.views) == 7 + 3 + 3  # one in-memory source per distinct set


def test_exported_stream_trains_with_avalanche_naive(av) -> None:
    torch.manual_seed(0)
    stream = SCENARIOS.get("class_incremental").factory(load_dataset("digits"), 0, n_experiences=5)
    bm = to_avalanche(stream)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no loggers": wanted here
        evaluator = av.EvaluationPlugin(av.accuracy_metrics(experience=True), loggers=[])
        strategy = av.Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            criterion=torch.nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1,
                            eval_mb_size=512, device="cpu", evaluator=evaluator)
        for exp in list(bm.train_stream)[:2]:
            strategy.train(exp)
        metrics = strategy.eval(list(bm.test_stream)[:2])
    acc = {k.rsplit("/", 1)[-1]: v for k, v in metrics.items() if k.startswith("Top1_Acc_Exp/eval_phase")}
    assert acc["Exp001"] > 0.9  # learned the last experience trained (a few dozen SGD steps)
    assert acc["Exp000"] < 0.5  # and forgot the first: plain fine-tuning, class-IL
