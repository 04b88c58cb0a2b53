"""DER / DER++, GDumb and iCaRL: their memories, herding, the criterion hook, and a learning check on
real Split-MNIST-5k (slow)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toys import gaussian_pairs_stream

import cltoolbox
from cltoolbox.errors import ConfigError
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.models.mlp import MLP
from cltoolbox.plugin import MASKED_LOGIT, Batch, Plugin
from cltoolbox.strategies.der import DERPlugin, LogitMemory, der, derpp
from cltoolbox.strategies.gdumb import GDumbPlugin, GreedyClassBalancedMemory, gdumb
from cltoolbox.strategies.icarl import ICaRLPlugin, herding, icarl
from cltoolbox.stream import Stream


def _stream(n_exp: int = 3, per_class: int = 40, dim: int = 8) -> Stream:
    """Two well-separated Gaussian classes per experience."""
    return gaussian_pairs_stream(n_exp, per_class, dim)


def _learner(plugins: list[Plugin], stream: Stream, **train) -> Learner:
    torch.manual_seed(0)
    model = MLP(stream.input_shape[0], [16], stream.n_classes, 0.0)
    return Learner(model, plugins, TrainConfig(**{"batch_size": 8, "lr": 0.1, "device": "cpu", **train}))


# -- the criterion hook ------------------------------------------------------------------------------------
class _Replace(Plugin):
    def __init__(self, value) -> None:
        self.value = value

    def criterion(self, learner, batch, logits):
        return None if self.value is None else self.value * logits.sum()


def test_criterion_hook_replaces_cross_entropy_and_none_keeps_it() -> None:
    stream = _stream(1)
    frozen = _learner([_Replace(0.0)], stream)  # a zero criterion: no gradient at all, so nothing moves
    before = [p.detach().clone() for p in frozen.model.parameters()]
    frozen.fit(stream)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.model.parameters(), strict=True))
    keep, plain = _learner([_Replace(None)], stream), _learner([], stream)  # None: plain CE, bit for bit
    keep.fit(stream)
    plain.fit(stream)
    assert all(torch.equal(a, b) for a, b in zip(keep.model.parameters(), plain.model.parameters(), strict=True))


# -- DER --------------------------------------------------------------------------------------------------
def test_logit_memory_keeps_keys_labels_and_logits_aligned() -> None:
    g = torch.Generator().manual_seed(0)
    mem = LogitMemory(20)
    mem.item_bytes = 24
    for step in range(10):
        key = torch.arange(7) + 7 * step  # stream keys
        y = torch.randint(5, (7,), generator=g)
        mem.add_with_logits(key, y, y + 100, torch.stack((key.double().sqrt(), y.double()), 1), g)
    assert mem.size == 20 and mem.seen == 70
    key, y, t, z = mem.sample_with_logits(64, g)
    assert key.shape == (64,) and key.dtype == torch.int64 and z.shape == (64, 2) and z.dtype == torch.float64
    assert torch.equal(z[:, 0], key.double().sqrt()) and torch.equal(z[:, 1].long(), y) and torch.equal(t, y + 100)
    # usage: each entry at its native sample size, with its label, task id and logits
    assert mem.usage() == (20, 20 * (24 + 8 + 8 + 2 * 8))
    restored = LogitMemory(20)
    restored.load_state_dict(mem.state_dict())
    assert torch.equal(restored.key, mem.key) and torch.equal(restored.logits, mem.logits) and restored.seen == 70
    assert restored.usage() == mem.usage()


def test_der_stores_pre_step_logits_and_adds_weighted_terms() -> None:
    stream = _stream(1)
    plugin = DERPlugin(memory_size=10, alpha=1.0, beta=0.0, mem_batch_size=None)
    learner = _learner([plugin], stream)
    exp = stream[0]
    learner.begin(stream)
    learner.experience = exp
    x, y, key = exp.x_train[:8], exp.y_train[:8], stream.keys(exp.train)[:8]
    batch = Batch(x, y, torch.zeros_like(y), key)
    logits = learner.forward(x, batch.t)
    assert plugin.loss(learner, batch, logits) == 0.0  # empty memory
    plugin.after_step(learner, batch)
    # the stored logits are those of the forward pass that saw the batch; the memory holds the batch's keys
    k, _, _, z = plugin.memory.sample_with_logits(8, torch.Generator().manual_seed(1))
    assert plugin.memory.size == 8 and all((logits.detach() - row).abs().sum(1).min() < 1e-6 for row in z)
    assert torch.equal(plugin.memory.key[:8].sort().values, key) and set(k.tolist()) <= set(key.tolist())
    extra = plugin.loss(learner, batch, logits)
    assert extra.requires_grad and float(extra.detach()) == pytest.approx(0.0, abs=1e-10)  # weights unchanged: MSE 0
    with pytest.raises(ConfigError, match="strategy.alpha"):
        der(alpha=-1.0)
    with pytest.raises(ConfigError, match="strategy.beta"):
        derpp(beta=-0.5)


# -- GDumb ------------------------------------------------------------------------------------------------
def test_gdumb_greedy_sampler_balances_classes() -> None:
    y = torch.cat((torch.zeros(100), torch.ones(100), torch.full((10,), 2))).long()
    key = torch.arange(210)  # stream keys: sample i has label y[i]
    mem = GreedyClassBalancedMemory(30)
    mem.add(key[:100], y[:100], y[:100], torch.Generator().manual_seed(0))  # one class: fills the memory
    assert torch.bincount(mem.y, minlength=3).tolist() == [30, 0, 0]
    mem.add(key[100:], y[100:], y[100:], torch.Generator().manual_seed(0))
    counts = torch.bincount(mem.tensors()[1], minlength=3).tolist()
    assert counts == [10, 10, 10]  # the rare class keeps all of its 10; the others are evicted down to 30 / 3
    assert torch.equal(y[mem.key], mem.y) and mem.seen == [0, 1, 2]  # keys stay with their labels
    assert mem.key.dtype == torch.int64 and torch.equal(mem.tensors()[0], mem.key)
    again = GreedyClassBalancedMemory(30)
    again.load_state_dict(GreedyClassBalancedMemory(30).state_dict())
    again.add(key[:100], y[:100], y[:100], torch.Generator().manual_seed(0))
    again.add(key[100:], y[100:], y[100:], torch.Generator().manual_seed(0))
    assert torch.equal(again.key, mem.key)  # deterministic for one generator state
    with pytest.raises(ConfigError, match="strategy.epochs"):
        gdumb(epochs=0)


def test_gdumb_retrains_from_scratch_on_the_memory_only() -> None:
    stream = _stream(2)
    finals = []
    for warm_start in (False, True):
        plugin = GDumbPlugin(memory_size=24, epochs=2)
        learner = _learner([plugin], stream)
        learner.begin(stream)
        if warm_start:  # other weights before the experience: re-initialisation must erase them
            with torch.no_grad():
                for p in learner.model.parameters():
                    p.add_(1.0)
        learner.train_experience(stream[0])
        finals.append([p.detach().clone() for p in learner.model.parameters()])
        assert plugin.memory.size == 24 and learner.step == 2 * 3  # 2 epochs x 24 memory samples / batch 8
        # the memory holds keys of the experience's samples; usage counts them at their native size
        assert set(plugin.memory.key.tolist()) <= set(stream.keys(stream[0].train).tolist())
        assert plugin.memory_usage() == (24, 24 * (8 * 4 + 2 * 8))
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


# -- iCaRL ------------------------------------------------------------------------------------------------
def test_herding_is_greedy_and_beats_random_subsets() -> None:
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(60, 5, generator=g), dim=1)
    order = herding(feats, 12)
    assert len(set(order.tolist())) == 12
    mu = feats.mean(0)
    for k in range(1, 4):  # step k picks the best next sample among the unused ones
        prefix = feats[order[: k - 1]].sum(0)
        unused = [i for i in range(60) if i not in order[: k - 1].tolist()]
        best = min(unused, key=lambda i: float((mu - (prefix + feats[i]) / k).norm()))
        assert order[k - 1] == best
    herd_err = float((feats[order].mean(0) - mu).norm())
    rand_err = [float((feats[torch.randperm(60, generator=g)[:12]].mean(0) - mu).norm()) for _ in range(50)]
    assert herd_err < 0.5 * sorted(rand_err)[len(rand_err) // 2]  # far closer to the mean than a typical draw
    assert herding(feats[:5], 12).shape == (5,)  # fewer samples than slots: all of them


def test_icarl_budget_reduction_and_nme() -> None:
    stream = _stream(3)
    plugin = ICaRLPlugin(memory_size=12, classifier="nme")
    learner = _learner([plugin], stream)
    history = []
    learner.fit(stream, on_experience_end=lambda lrn, e: history.append(
        {c: plugin.key[plugin.y == c].clone() for c in plugin.seen}))
    per_class = [6, 3, 2]  # 12 // seen classes
    for i, ex in enumerate(history):
        assert all(len(v) == per_class[i] for v in ex.values()) and len(ex) == 2 * (i + 1)
        if i:  # old classes keep a prefix of their herding order
            assert all(torch.equal(v, history[i - 1][c][: per_class[i]]) for c, v in ex.items() if c in history[i - 1])
    assert plugin.memory_usage()[0] == 12 and plugin.old_state is not None
    # exemplars are stream keys of their own class; bytes count them at their native size (8 float32 values)
    assert plugin.key.dtype == torch.int64 and "x" not in plugin.state_dict()
    label = {int(k): int(c) for e in stream for k, c in zip(stream.keys(e.train), e.y_train, strict=True)}
    assert [label[int(k)] for k in plugin.key] == plugin.y.tolist()
    old = sum(v.numel() * v.element_size() for v in plugin.old_state.values())
    assert plugin.memory_usage()[1] == 12 * (8 * 4 + 3 * 8) + plugin.means.numel() * 4 + old

    x = stream[0].x_test
    out = plugin.predict(learner, x, torch.zeros(len(x), dtype=torch.long))
    feats = F.normalize(learner.model.features(x), dim=1)
    nearest = torch.cdist(feats, plugin.means).argmin(1)
    assert torch.equal(out.argmax(1), nearest) and (out <= 0).all()
    plugin.seen = plugin.seen[:4]  # classes without exemplars get the MASKED_LOGIT logit
    assert (plugin.predict(learner, x, torch.zeros(len(x), dtype=torch.long))[:, 4:] == MASKED_LOGIT).all()
    with pytest.raises(ConfigError, match="strategy.classifier"):
        icarl(classifier="svm")


def test_icarl_criterion_distils_old_classes_with_sigmoid_targets() -> None:
    stream = _stream(2)
    plugin = ICaRLPlugin(memory_size=12, classifier="nme")
    learner = _learner([plugin], stream)
    learner.begin(stream)
    learner.train_experience(stream[0])
    plugin.before_experience(learner, stream[1])
    batch = Batch(stream[1].x_train[:8], stream[1].y_train[:8], torch.zeros(8, dtype=torch.long))
    logits = learner.model(batch.x)
    with torch.no_grad():
        old = torch.sigmoid(learner.model(batch.x))  # the model has not moved since the snapshot
    target = F.one_hot(batch.y, 4).float()
    target[:, :2] = old[:, :2]  # classes 0, 1 (experience 0) are distilled
    expected = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 8
    assert torch.allclose(plugin.criterion(learner, batch, logits), expected)


# -- learning on real data --------------------------------------------------------------------------------
@pytest.mark.slow
def test_replay_strategies_learn_split_mnist5k(tmp_path, one_thread) -> None:
    """Split-MNIST-5k class-IL (MLP 2x100, SGD lr 0.1, 1 epoch, batch 10, memory 500), seed 0: every method
    beats naive by >= 25 points, GDumb reaches 0.80, and iCaRL's NME beats its own logits."""
    config = {
        "name": "replay", "scenario": {"name": "class_incremental", "dataset": "mnist5k", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": [100, 100]},
        "strategy": [{"name": "naive"}, {"name": "der"}, {"name": "derpp"}, {"name": "gdumb"},
                     {"name": "icarl"}, {"name": "icarl", "classifier": "logits", "label": "icarl_logits"}],
        "train": {"epochs": 1, "batch_size": 10, "lr": 0.1}, "seeds": [0],
    }
    results = {r["labels"]["strategy"]: r for r in cltoolbox.run(config, out=str(tmp_path), quiet=True)}
    acc = {k: r["class_il"]["acc"] for k, r in results.items()}
    for name in ("der", "derpp", "gdumb", "icarl"):
        assert acc[name] >= acc["naive"] + 0.25, acc
        assert results[name]["cost"]["memory_items"] == 500
    assert acc["gdumb"] >= 0.80, acc
    assert acc["icarl"] > acc["icarl_logits"], acc
