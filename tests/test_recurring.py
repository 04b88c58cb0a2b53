"""Streams that revisit tasks: evaluated on the distinct tasks, metrics use when each was first trained."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

import cltoolbox
from cltoolbox import metrics
from cltoolbox.data.base import Dataset
from cltoolbox.registry import register_scenario
from cltoolbox.stream import Experience, Samples, Stream


@register_scenario("test_recurring_abab")
def abab(data: Dataset, seed: int, repeats: int = 2) -> Stream:
    """Test-only: two class-disjoint tasks trained A, B, A, B, ... ``repeats`` times (each repeat trains and
    tests on the task's own sample sets)."""
    tasks = []
    for k, classes in enumerate(((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))):
        tr = torch.nonzero(torch.isin(data.y_train, torch.tensor(classes))).flatten()
        te = torch.nonzero(torch.isin(data.y_test, torch.tensor(classes))).flatten()
        tasks.append(Experience(k, 0, classes, Samples(data.train, tr), Samples(data.test, te)))
    schedule = [0, 1] * repeats
    exps = [Experience(i, 0, tasks[k].classes, tasks[k].train, tasks[k].test) for i, k in enumerate(schedule)]
    return Stream("abab", exps, 10, data.input_shape, list(range(10)), "class_incremental",
                  test_experiences=tasks, schedule=schedule)


def test_recurring_stream_matrices_are_indexed_by_distinct_tasks(tmp_path: Path) -> None:
    config = {
        "name": "rec", "scenario": {"name": "test_recurring_abab", "dataset": "digits", "repeats": 2},
        "model": {"name": "mlp", "hidden": [32]}, "strategy": {"name": "naive"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}, "seeds": [0], "out": str(tmp_path),
    }
    (summary,) = cltoolbox.run(config, quiet=True)
    run = Path(summary["run_dir"])
    R = pd.read_csv(run / "matrices" / "accuracy_class_il.csv", index_col="trained_exp")
    assert R.shape == (5, 2) and list(R.index) == [-1, 0, 1, 2, 3]  # 4 training experiences x 2 tasks
    stream = json.loads((run / "stream.json").read_text())
    assert stream["schedule"] == [0, 1, 0, 1] and stream["first_seen"] == [1, 2]
    assert [e["classes"] for e in stream["eval_experiences"]] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    m = R.to_numpy()
    assert summary["class_il"]["forgetting"] == metrics.forgetting(m, [1, 2])
    assert summary["class_il"]["acc"] == metrics.acc(m, [1, 2])
    # naive fine-tuning on B then A again: the final row favours the last task trained (B)
    assert m[4, 1] > m[4, 0]
