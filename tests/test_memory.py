"""Episodic memories: reservoir sampling is uniform, class-balanced memory keeps equal quotas; memories hold
stream keys and report the native bytes of the samples they stand for."""

from __future__ import annotations

import torch

from cltoolbox.models import mlp, reduced_resnet18
from cltoolbox.strategies.memory import ClassBalancedMemory, ReservoirMemory


def test_reservoir_keeps_every_seen_sample_with_equal_probability() -> None:
    n_items, capacity, trials = 100, 20, 1500
    counts = torch.zeros(n_items)
    for trial in range(trials):
        g = torch.Generator().manual_seed(trial)
        mem = ReservoirMemory(capacity)
        for start in range(0, n_items, 10):
            ids = torch.arange(start, start + 10)
            mem.add(ids + 1000, ids, torch.zeros_like(ids), g)  # keys 1000 + label
        kept = mem.y[: mem.size]
        assert mem.size == capacity and len(kept.unique()) == capacity  # no duplicates
        assert torch.equal(mem.key[: mem.size] - 1000, kept)  # keys, y stay paired
        counts[kept] += 1
    freq = counts / trials
    # each item is in memory with probability capacity / n_items = 0.2 (binomial sd ~0.01)
    assert (freq - 0.2).abs().max() < 0.05
    assert abs(freq[:50].mean() - freq[50:].mean()) < 0.02  # early and late items alike


def test_reservoir_fills_in_order_until_full() -> None:
    mem, g = ReservoirMemory(8), torch.Generator().manual_seed(0)
    y = torch.arange(5)
    mem.add(y + 100, y, y, g)
    assert mem.size == 5 and torch.equal(mem.y[:5], y)
    key, yy, t = mem.sample(64, g)
    assert key.shape == (64,) and key.dtype == torch.int64 and torch.equal(key - 100, yy)


def test_class_balanced_memory_has_equal_quotas() -> None:
    mem, g = ClassBalancedMemory(30), torch.Generator().manual_seed(0)
    y1 = torch.arange(2).repeat(50)
    mem.update(torch.arange(100), y1, torch.zeros(100, dtype=torch.long), g)
    assert mem.size == 30 and torch.bincount(mem.y[:30]).tolist() == [15, 15]
    y2 = torch.arange(2, 5).repeat(50)
    mem.update(torch.arange(100, 250), y2, torch.ones(150, dtype=torch.long), g)
    assert torch.bincount(mem.y[: mem.size], minlength=5).tolist() == [6, 6, 6, 6, 6]
    keys = mem.key[: mem.size]  # each key still sits with its own label (key k was offered with label y[k])
    assert torch.equal(mem.y[: mem.size], torch.cat((y1, y2))[keys])
    assert set(mem.t[: mem.size][mem.y[: mem.size] < 2].tolist()) == {0}


def test_models_give_logits_over_all_classes() -> None:
    x = torch.randn(4, 3, 32, 32)
    net = reduced_resnet18((3, 32, 32), 100)
    assert net(x).shape == (4, 100) and net.features(x).shape == (4, 160)
    m = mlp((1, 28, 28), 10, hidden=[50])
    assert m(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_class_balanced_memory_is_uniform_over_recurring_experiences() -> None:
    # the same 2 classes in 5 experiences (domain-incremental): every experience keeps ~1/5 of the slots
    counts = torch.zeros(5)
    for trial in range(40):
        mem, g = ClassBalancedMemory(50), torch.Generator().manual_seed(trial)
        for e in range(5):
            y = torch.arange(2).repeat(100)
            mem.update(torch.arange(200) + 200 * e, y, torch.full_like(y, e), g)
        assert torch.bincount(mem.y[: mem.size]).tolist() == [25, 25]
        counts += torch.bincount(mem.t[: mem.size], minlength=5)
    share = counts / counts.sum()
    assert (share - 0.2).abs().max() < 0.03, share


def test_memories_hold_keys_and_report_native_sample_bytes() -> None:
    """A memory stores int64 stream keys, yet ``usage`` counts each item at its native size (what a copy would
    take) plus its label and task id; a checkpoint holds only the keys."""
    from toys import two_task_stream

    from cltoolbox.strategies.replay import ReplayPlugin

    stream = two_task_stream()  # float32 inputs of 8 values: 32 native bytes a sample
    for policy in ("reservoir", "class_balanced"):
        plugin = ReplayPlugin(10, policy, None)
        plugin.before_fit(None, stream)
        mem = plugin.memory
        keys, y = stream.keys(stream[0].train), stream[0].y_train
        if policy == "reservoir":
            mem.add(keys, y, torch.zeros_like(y), torch.Generator().manual_seed(0))
        else:
            mem.update(keys, y, torch.zeros_like(y), torch.Generator().manual_seed(0))
        assert mem.key.dtype == torch.int64 and mem.key.dim() == 1 and "x" not in plugin.state_dict()
        assert torch.equal(stream.fetch(mem.key[:10]), stream[0].x_train[mem.key[:10]])  # view 0: keys = rows
        assert plugin.memory_usage() == (10, 10 * (8 * 4 + 2 * 8))
