"""Relational Experience Replay: the weighted objective, the bi-level update of the relation net, and a
learning check on real MNIST-5k (slow)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toys import fit_small_mlp

import cltoolbox
from cltoolbox.errors import ConfigError
from cltoolbox.loop import Learner
from cltoolbox.plugin import Batch
from cltoolbox.strategies.rer import RelationNet, RERPlugin, rer
from cltoolbox.stream import Stream

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _fit(plugin: RERPlugin) -> tuple[Learner, Stream]:
    return fit_small_mlp(plugin)


def test_relation_net_gives_pairwise_weights_in_unit_interval() -> None:
    w = RelationNet(16)(torch.rand(5, 2), torch.rand(5, 2))
    assert w.shape == (5, 2) and ((w > 0) & (w < 1)).all()


def test_loss_is_pairwise_weighted_and_relation_net_learns_bilevel() -> None:
    plugin = RERPlugin(memory_size=40, replay_weight=1.0, meta_lr=1e-2, meta_interval=1, warmup=0.0, hidden=16)
    learner, stream = _fit(plugin)
    assert plugin.meta_updates == 6  # experience 1: 48 samples / batch 8, one bi-level step each
    items, nbytes = plugin.memory_usage()
    assert items == 40 and nbytes > 0

    exp = stream[1]
    learner.experience = exp
    learner.model.zero_grad(set_to_none=True)
    net_before = [p.detach().clone() for p in plugin.net.parameters()]
    model_before = [p.detach().clone() for p in learner.model.parameters()]
    key = stream.keys(exp.train)[:8]
    new = Batch(exp.x_train[:8], exp.y_train[:8], torch.ones(8, dtype=torch.long), key)
    batch = plugin.transform_batch(learner, new)
    assert len(batch) == 16  # 8 new + 8 replayed, paired by position
    # the replayed half is fetched from the memory's keys
    assert torch.equal(batch.key[:8], key) and torch.equal(batch.x[8:], learner.fetch(batch.key[8:]))
    logits = learner.forward(batch.x, batch.t)
    total = plugin.criterion(learner, batch, logits)
    # one bi-level step moved the relation net, and only it
    assert any(not torch.equal(a, b) for a, b in zip(net_before, plugin.net.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model_before, learner.model.parameters(), strict=True))
    assert all(p.grad is None for p in learner.model.parameters())
    # the criterion replaces CE: mean(w_new * l_new) + mean(w_mem * l_mem), with the updated relation net
    ce = F.cross_entropy(logits, batch.y, reduction="none").detach()
    norms = logits.detach().norm(dim=1)
    with torch.no_grad():
        w = plugin.net(torch.stack((ce[:8], ce[8:]), 1), torch.stack((norms[:8], norms[8:]), 1))
    torch.testing.assert_close(total.detach(), (ce[:8] * w[:, 0]).mean() + (ce[8:] * w[:, 1]).mean())
    total.backward()  # the real step's graph is intact after the look-ahead
    assert all(p.grad is not None for p in learner.model.parameters())


def test_warmup_uses_fixed_weights() -> None:
    plugin = RERPlugin(memory_size=40, replay_weight=0.5, meta_lr=1e-3, meta_interval=1, warmup=1.0, hidden=16)
    learner, stream = _fit(plugin)
    exp = stream[1]
    learner.experience = exp
    plugin.before_experience(learner, exp)
    batch = plugin.transform_batch(learner, Batch(exp.x_train[:8], exp.y_train[:8], torch.ones(8, dtype=torch.long)))
    logits = learner.forward(batch.x, batch.t)
    total = plugin.criterion(learner, batch, logits)
    ce = F.cross_entropy(logits, batch.y, reduction="none")
    torch.testing.assert_close(total, ce[:8].mean() + 0.5 * ce[8:].mean())


def test_invalid_parameters() -> None:
    with pytest.raises(ConfigError, match="memory_size"):
        rer(memory_size=0)
    with pytest.raises(ConfigError, match="warmup"):
        rer(warmup=1.5)
    with pytest.raises(ConfigError, match="meta_interval"):
        rer(meta_interval=0)


@pytest.mark.slow
def test_split_mnist_rer_beats_naive(tmp_path) -> None:
    def acc(strategy: dict) -> float:
        config = {
            "name": "rer_test", "scenario": {"name": "class_incremental", "dataset": "mnist5k", "n_experiences": 5},
            "model": {"name": "mlp", "hidden": [100, 100]}, "strategy": strategy,
            "train": {"epochs": 1, "batch_size": 10, "lr": 0.1}, "seeds": [0],
        }
        (summary,) = cltoolbox.run(config, out=str(tmp_path), overwrite=True, quiet=True)
        return summary["class_il"]["acc"]

    naive, r = acc({"name": "naive"}), acc({"name": "rer", "memory_size": 500})
    assert r >= naive + 0.25, (naive, r)
