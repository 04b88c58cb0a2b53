"""Properties of the online, few-shot, power-law, curriculum and repetition scenario generators.

Most checks use a toy dataset whose single input feature is the sample's index, so that where every
sample went (which chunk, which session, which experience) can be read off the stream.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import cltoolbox
from cltoolbox.data import load_dataset
from cltoolbox.data.base import Dataset
from cltoolbox.errors import ConfigError
from cltoolbox.scenarios.curriculum import curriculum
from cltoolbox.scenarios.few_shot import few_shot
from cltoolbox.scenarios.online import online
from cltoolbox.scenarios.recurring import (
    fit_power_law_exponent,
    introduction_steps,
    power_law,
    power_law_schedule,
    repetition,
)


def toy(n_classes: int = 10, per_class: int = 20, per_class_test: int = 5) -> Dataset:
    """x = the sample's index (train and test numbered separately), classes in blocks."""
    y_tr = torch.arange(n_classes).repeat_interleave(per_class)
    y_te = torch.arange(n_classes).repeat_interleave(per_class_test)
    x_tr = torch.arange(len(y_tr), dtype=torch.float32)[:, None]
    x_te = torch.arange(len(y_te), dtype=torch.float32)[:, None]
    return Dataset.from_tensors("toy", x_tr, y_tr, x_te, y_te, n_classes)


def ids(x: torch.Tensor) -> list[int]:
    return x[:, 0].long().tolist()


# -- online -------------------------------------------------------------------------------------------------
def test_online_chunks_are_task_free_and_cover_every_sample_once() -> None:
    data = toy()
    s = online(data, 0, n_tasks=5, chunk_size=7)
    per_task = 40  # 2 classes x 20
    assert len(s) == 5 * math.ceil(per_task / 7)
    assert sorted(sum((ids(e.x_train) for e in s), [])) == list(range(200))  # every sample exactly once
    assert s.schedule == [k for k in range(5) for _ in range(math.ceil(per_task / 7))]
    for k in range(5):
        sizes = [e.n_train for e, t in zip(s, s.schedule, strict=True) if t == k]
        assert sizes == [7] * 5 + [5]  # chunk_size, the remainder last
    for e, k in zip(s, s.schedule, strict=True):
        assert e.task_id == 0  # task-free: no task id ...
        assert e.classes == tuple(sorted(set(e.y_train.tolist())))  # ... classes = those present
        assert set(e.classes) <= {2 * k, 2 * k + 1}  # blur 0: only the task's own classes
    assert not ({"schedule", "boundaries_at", "task"} & set(s.info)) and s.info["task_free"] is True
    assert [t.classes for t in s.test_experiences] == [(2 * k, 2 * k + 1) for k in range(5)]
    assert [t.task_id for t in s.test_experiences] == [0] * 5
    for t in s.test_experiences:  # the task's whole test set
        assert sorted(t.y_test.tolist()) == sorted([c for c in t.classes for _ in range(5)])
    assert s.first_seen() == [1 + 6 * k for k in range(5)]
    assert [e.classes for e in online(data, 0, n_tasks=5, chunk_size=7)] == [e.classes for e in s]


def test_online_boundaries_give_task_ids() -> None:
    s = online(toy(), 0, n_tasks=2, chunk_size=25, boundaries=True)
    assert [e.task_id for e in s] == s.schedule and [t.task_id for t in s.test_experiences] == [0, 1]
    assert s.info["task_free"] is False


def test_online_blur_moves_the_set_fraction_into_neighbouring_tasks() -> None:
    data = toy(per_class=50)  # 100 samples per task
    s = online(data, 3, n_tasks=5, chunk_size=10, blur=0.2)
    moved = {}  # (task of origin, task of the chunk) -> samples
    for e, k in zip(s, s.schedule, strict=True):
        for c in e.y_train.tolist():
            moved[(c // 2, k)] = moved.get((c // 2, k), 0) + 1
    for k in range(5):
        out = {j: n for (o, j), n in moved.items() if o == k and j != k}
        assert sum(out.values()) == 20  # round(0.2 * 100)
        assert set(out) <= {k - 1, k + 1}  # neighbours only
        if 0 < k < 4:
            assert out == {k - 1: 10, k + 1: 10}
    assert sorted(sum((ids(e.x_train) for e in s), [])) == list(range(500))
    other = online(data, 4, n_tasks=5, chunk_size=10, blur=0.2)
    assert [ids(e.x_train) for e in other] != [ids(e.x_train) for e in s]  # seeded


@pytest.mark.parametrize("params, field", [({"n_tasks": 3}, "scenario.n_tasks"), ({"blur": 0.6}, "scenario.blur"),
                                           ({"chunk_size": 0}, "scenario.chunk_size"),
                                           ({"n_tasks": 1, "blur": 0.1}, "scenario.blur")])
def test_online_validation(params: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        online(toy(), 0, **params)


# -- few-shot -----------------------------------------------------------------------------------------------
def test_few_shot_sessions_hold_ways_classes_with_shots_samples() -> None:
    data = toy()
    s = few_shot(data, 0, base_classes=4, ways=2, shots=3, n_sessions=3)
    assert [e.classes for e in s] == [(0, 1, 2, 3), (4, 5), (6, 7), (8, 9)]
    assert s[0].n_train == 80  # the base session: every sample of its classes
    for e in s.experiences[1:]:
        assert torch.bincount(e.y_train, minlength=10)[list(e.classes)].tolist() == [3, 3]
        picked = ids(e.x_train)
        assert len(set(picked)) == 6 and all(data.y_train[i] in e.classes for i in picked)
    for e in s:  # all test samples of the session's classes
        assert sorted(e.y_test.tolist()) == sorted(c for c in e.classes for _ in range(5))
    shots = {int(c): v for c, v in s.info["shot_indices"].items()}
    assert shots == {c: sorted(i for i in ids(e.x_train) if data.y_train[i] == c)
                     for e in s.experiences[1:] for c in e.classes}
    again, other = few_shot(data, 0, 4, 2, 3, 3), few_shot(data, 1, 4, 2, 3, 3)
    assert [ids(e.x_train) for e in again] == [ids(e.x_train) for e in s]
    assert [ids(e.x_train) for e in other] != [ids(e.x_train) for e in s]
    assert few_shot(data, 0, 4, 2, 3, 3, base_shots=5)[0].n_train == 20


def test_few_shot_cifar100_yaml_builds_the_standard_protocol(tmp_path: Path) -> None:
    """experiments/few_shot_cifar100.yaml on a tiny fake CIFAR-100 (real file format, 6 + 2 images per class)."""
    import pickle

    import numpy as np

    from cltoolbox import config as cfgmod
    from cltoolbox.build import build_stream

    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for split, per in (("train", 6), ("test", 2)):
        labels = [c for c in range(100) for _ in range(per)]
        pixels = rng.integers(0, 256, (len(labels), 3072)).astype(np.uint8)
        blob = {"filenames": ["x"] * len(labels), "batch_label": split, "fine_labels": labels,
                "coarse_labels": [c // 5 for c in labels], "data": pixels}
        (base / split).write_bytes(pickle.dumps(blob, protocol=2))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)],
                                              "coarse_label_names": [str(i) for i in range(20)]}, protocol=2))
    yaml_path = Path(__file__).resolve().parents[1] / "experiments" / "few_shot_cifar100.yaml"
    raw = cfgmod.apply_overrides(cfgmod.load_yaml(yaml_path), [f"scenario.root={tmp_path}"])
    resolved = cfgmod.validate(raw)
    data = load_dataset("cifar100", str(tmp_path))
    s = build_stream(resolved, data, 0)
    assert len(s) == 9 and s[0].classes == tuple(range(60)) and s[0].n_train == 360
    assert [e.classes for e in s.experiences[1:]] == [tuple(range(60 + 5 * k, 65 + 5 * k)) for k in range(8)]
    assert all(e.n_train == 25 and e.n_test == 10 for e in s.experiences[1:])


def test_few_shot_validation() -> None:
    with pytest.raises(ConfigError, match="scenario.n_sessions.*100 classes.*has 10"):
        few_shot(toy(), 0)  # the CIFAR-100 protocol on a 10-class set
    with pytest.raises(ConfigError, match="scenario.shots: class 4 has only 20"):
        few_shot(toy(), 0, base_classes=4, ways=2, shots=21, n_sessions=3)
    with pytest.raises(ConfigError, match="scenario.base_shots"):
        few_shot(toy(), 0, base_classes=4, ways=2, shots=2, n_sessions=1, base_shots=30)


# -- power law ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_power_law_exponent_is_recovered_from_a_long_schedule(exponent: float) -> None:
    schedule = power_law_schedule(n_tasks=10, n_experiences=20_000, exponent=exponent, seed=0)
    fitted = fit_power_law_exponent(schedule)
    assert abs(fitted - exponent) <= 0.1 * exponent, fitted


def test_power_law_schedule_introduces_tasks_in_order_and_revisits_only_seen_ones() -> None:
    s = power_law_schedule(5, 200, 0.8, seed=1)
    intro = introduction_steps(5, 200)
    assert intro == [0, 40, 80, 120, 160]
    assert [s.index(k) for k in range(5)] == intro  # first appearance of task k at its step
    assert all(task <= max(s[:t + 1]) for t, task in enumerate(s))
    assert len(set(s[41:80])) > 1  # revisits happen
    assert power_law_schedule(5, 200, 0.8, seed=1) == s and power_law_schedule(5, 200, 0.8, seed=2) != s


def test_power_law_stream() -> None:
    data = toy()
    s = power_law(data, 0, n_tasks=5, n_experiences=30, samples_per_experience=8, tasks="class_split")
    assert len(s) == 30 and s.schedule == power_law_schedule(5, 30, 1.0, 0)
    assert [t.classes for t in s.test_experiences] == [(2 * k, 2 * k + 1) for k in range(5)]
    for e, k in zip(s, s.schedule, strict=True):
        assert e.n_train == 8 and set(e.y_train.tolist()) <= {2 * k, 2 * k + 1}
        assert len(set(ids(e.x_train))) == 8  # a random subset, no repeats
    assert s.first_seen() == [1 + 6 * k for k in range(5)]
    seq = power_law(data, 0, n_tasks=5, n_experiences=30, samples_per_experience=8, tasks="class_split",
                    rehearsal=False)
    assert seq.schedule == [k for k in range(5) for _ in range(6)]  # blocks, same steps

    digits = load_dataset("digits")
    p = power_law(digits, 0, n_tasks=3, n_experiences=6, samples_per_experience=50)
    assert p.scenario == "domain_incremental" and [t.task_id for t in p.test_experiences] == [0, 1, 2]
    for e, k in zip(p, p.schedule, strict=True):  # rows of its task's permuted training set
        task = p.test_experiences[k]
        assert e.task_id == k and torch.equal(e.x_test, task.x_test)
        assert (torch.cdist(e.x_train.flatten(1), task.x_train.flatten(1)).min(1).values == 0).all()


@pytest.mark.parametrize("params, field", [({"n_experiences": 3}, "scenario.n_experiences"),
                                           ({"exponent": -1.0}, "scenario.exponent"),
                                           ({"samples_per_experience": 10_000}, "scenario.samples_per_experience"),
                                           ({"tasks": "class_split", "n_tasks": 3}, "scenario.n_tasks")])
def test_power_law_validation(params: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        power_law(toy(), 0, **params)


# -- curriculum ---------------------------------------------------------------------------------------------
def blobs(seed: int = 0) -> Dataset:
    """10 well separated Gaussian classes in 20-d, except classes 3 and 7, which nearly coincide."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(10, 20, generator=g) * 3
    means[7] = means[3] + 0.05
    y = torch.arange(10).repeat_interleave(30)
    x = means[y] + 0.3 * torch.randn(300, 20, generator=g)
    return Dataset.from_tensors("blobs", x, y, x.clone(), y.clone(), 10)


def test_curriculum_order_is_reproducible_and_puts_confusable_classes_last() -> None:
    data = blobs()
    s = curriculum(data, 0, n_experiences=5, features="pixels")
    assert sorted(s.class_order) == list(range(10)) and set(s.class_order[-2:]) == {3, 7}
    assert [e.classes for e in s] == [tuple(s.class_order[2 * k:2 * k + 2]) for k in range(5)]
    hard = curriculum(data, 0, n_experiences=5, order="hard_to_easy", features="pixels")
    assert hard.class_order == s.class_order[::-1]
    scores = s.info["scores"]
    assert [scores[c] for c in s.class_order] == sorted(scores)
    for seed in (0, 1):  # random-projection features: the same seed gives the same curriculum
        a = curriculum(data, seed, n_experiences=5).class_order
        assert a == curriculum(data, seed, n_experiences=5).class_order and set(a[-2:]) == {3, 7}
    with pytest.raises(ConfigError, match="scenario.feature_dim"):
        curriculum(data, 0, n_experiences=5, feature_dim=0)


@pytest.mark.parametrize("features", ["pixels", "random_projection"])
def test_curriculum_class_means_walk_the_data_in_chunks(monkeypatch, features: str) -> None:
    """The class means come from chunks of the training set, with the values of one pass over all of it
    (the float64 sums of the whole-set computation, bit for bit), so the curriculum is unchanged."""
    import cltoolbox.scenarios.curriculum as cur

    data = load_dataset("mnist5k")
    x = data.x_train.reshape(data.y_train.shape[0], -1)
    if features == "random_projection":
        w = torch.randn(x.shape[1], 64, generator=torch.Generator().manual_seed(5)) / math.sqrt(x.shape[1])
        x = torch.relu(x @ w)
    whole = torch.zeros(10, x.shape[1], dtype=torch.float64).index_add_(0, data.y_train, x.double())
    whole /= torch.bincount(data.y_train, minlength=10)[:, None]
    sizes = []
    fetch = data.train.fetch
    monkeypatch.setattr(data.train, "fetch", lambda idx, device=None: sizes.append(len(idx)) or fetch(idx, device))
    monkeypatch.setattr(cur, "CHUNK_BYTES", 600 * 4 * 28 * 28)  # 600 rows: 7 chunks of 571-572
    means = cur.class_features(data, features, 64, seed=5)
    assert len(sizes) == 7 and sum(sizes) == 4000 and min(sizes) >= 571
    assert torch.equal(means, whole)


# -- repetition ---------------------------------------------------------------------------------------------
def test_repetition_class_counts_and_repeat_rate() -> None:
    data = toy()
    p = 0.3
    s = repetition(data, 0, n_experiences=200, new_classes_per_exp=2, p_repeat=p, repeat_fraction=0.5)
    chances = repeats = 0
    for i, e in enumerate(s):
        new = s.info["new_classes"][i]
        rep = s.info["repeated_classes"][i]
        assert new == ([2 * i, 2 * i + 1] if i < 5 else [])
        assert set(rep) <= set(range(2 * min(i, 5)))  # only classes introduced earlier
        assert e.classes == tuple(sorted(new + rep))
        counts = torch.bincount(e.y_train, minlength=10).tolist()
        assert all(counts[c] == 20 for c in new) and all(counts[c] == 10 for c in rep)
        assert sum(counts) == e.n_train
        chances += 2 * min(i, 5)
        repeats += len(rep)
    rate = repeats / chances
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / chances) + 0.01, rate
    assert s.schedule[:5] == [0, 1, 2, 3, 4] and s.first_seen() == [1, 2, 3, 4, 5]
    assert [t.classes for t in s.test_experiences] == [(2 * k, 2 * k + 1) for k in range(5)]
    for i in range(5, 200):  # repeat-only: the group with most classes in the experience
        groups = [c // 2 for c in s.info["repeated_classes"][i]]
        assert s.schedule[i] == max(range(5), key=lambda k, g=groups: (g.count(k), -k))
    with pytest.raises(ConfigError, match="scenario.p_repeat"):
        repetition(data, 0, n_experiences=6, p_repeat=0.0)
    with pytest.raises(ConfigError, match="scenario.n_experiences"):
        repetition(data, 0, n_experiences=4)


# -- end to end: a task-free stream through the runner --------------------------------------------------------
def test_online_run_has_one_column_per_task_and_records_the_schedule(tmp_path: Path) -> None:
    config = {
        "name": "online", "scenario": {"name": "online", "dataset": "digits", "n_tasks": 2, "chunk_size": 300},
        "model": {"name": "mlp", "hidden": [32]}, "strategy": {"name": "naive"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}, "seeds": [0], "out": str(tmp_path),
    }
    (summary,) = cltoolbox.run(config, quiet=True)
    run = Path(summary["run_dir"])
    R = pd.read_csv(run / "matrices" / "accuracy_class_il.csv", index_col="trained_exp")
    stream = json.loads((run / "stream.json").read_text())
    T = len(stream["experiences"])
    assert R.shape == (T + 1, 2) and T == summary["labels"]["n_experiences"]
    assert stream["schedule"] == sorted(stream["schedule"]) and stream["first_seen"][0] == 1
    assert [e["classes"] for e in stream["eval_experiences"]] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert all(e["task_id"] == 0 for e in stream["experiences"])
