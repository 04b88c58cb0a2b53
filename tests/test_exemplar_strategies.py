"""ER-ACE, WA, BiC and LUCIR: one test per mechanism (each fails if the mechanism is removed) and a small
learning test each. Resume and determinism are covered for every registered strategy by test_conformance.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from toys import gaussian_pairs_stream

import cltoolbox.strategies.bias_correction as bc
from cltoolbox.errors import ConfigError
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.models.mlp import mlp
from cltoolbox.plugin import Batch
from cltoolbox.registry import STRATEGIES
from cltoolbox.strategies.er_ace import ERACEPlugin
from cltoolbox.strategies.lucir import LUCIRPlugin, margin_ranking
from cltoolbox.strategies.memory import ClassBalancedMemory
from cltoolbox.strategies.podnet import lsc_scores, nca_loss, pod_flat, pod_spatial


def _fit(name: str, stream=None, epochs: int = 3, **params) -> tuple[Learner, object]:
    stream = stream or gaussian_pairs_stream(n_exp=3, per_class=60)
    torch.manual_seed(0)
    plugins = STRATEGIES.get(name).factory(**params)
    learner = Learner(mlp(stream.input_shape, stream.n_classes, hidden=[32]), plugins,
                      TrainConfig(epochs=epochs, batch_size=10, lr=0.05, device="cpu"), seed=0)
    learner.fit(stream)
    return learner, stream


def _class_il_acc(learner: Learner, stream) -> list[float]:
    out = []
    for e in stream:
        pred = learner.logits(e.x_test, torch.zeros(e.n_test, dtype=torch.long)).argmax(1)
        out.append(float((pred == e.y_test).float().mean()))
    return out


# -- ER-ACE ----------------------------------------------------------------------------------------------------
def test_er_ace_incoming_loss_leaves_absent_classes_alone() -> None:
    plugin = ERACEPlugin(memory_size=10, mem_batch_size=None)
    plugin.seen = torch.tensor([True, True, False, False, False, False])  # classes 0, 1 met before
    y_in, y_mem = torch.tensor([2, 3, 2]), torch.tensor([0, 1])
    plugin._current = Batch(torch.zeros(3, 1), y_in, torch.zeros(3, dtype=torch.long))
    batch = plugin._current.cat(torch.zeros(2, 1), y_mem, torch.zeros(2, dtype=torch.long))
    logits = torch.randn(5, 6, requires_grad=True)
    loss = plugin.criterion(SimpleNamespace(global_batch=batch, dist=None), batch, logits)
    # the paper's sum of two means: over the incoming rows (their own classes) and the replayed rows (seen ones)
    expect = F.cross_entropy(logits[:3, 2:4], y_in - 2) + F.cross_entropy(logits[3:, :4], y_mem)
    assert float(loss.detach()) == pytest.approx(float(expect.detach()), rel=1e-6)
    loss.backward()
    g = logits.grad
    assert torch.all(g[:3, [0, 1, 4, 5]] == 0)  # incoming rows: nothing for classes absent from the batch
    assert torch.all(g[:3, [2, 3]] != 0)
    assert torch.all(g[3:, 4:] == 0) and torch.all(g[3:, :4] != 0)  # replay rows: every seen class, no unseen
    assert plugin.seen.tolist() == [True, True, True, True, False, False]
    plain = torch.randn(3, 6, requires_grad=True)  # plain CE would push the absent classes down
    F.cross_entropy(plain, y_in).backward()
    assert torch.all(plain.grad[:, [0, 1]] > 0)


def test_er_ace_shards_sum_to_the_one_process_loss() -> None:
    """Under DDP each rank holds contiguous rows of the global batch, here with a shard that straddles the incoming
    and replayed rows; the ranks' criteria, weighted by the loop's share and averaged as DDP averages gradients,
    give the one-process loss and gradient."""
    from cltoolbox.distributed import Dist

    y_in, y_mem = torch.tensor([2, 3, 2]), torch.tensor([0, 1])
    whole = Batch(torch.zeros(3, 1), y_in, torch.zeros(3, dtype=torch.long)).cat(
        torch.zeros(2, 1), y_mem, torch.zeros(2, dtype=torch.long))
    logits = torch.randn(5, 6, requires_grad=True)

    def criterion(rows: slice, dist) -> torch.Tensor:
        plugin = ERACEPlugin(memory_size=10, mem_batch_size=None)
        plugin.seen = torch.tensor([True, True, False, False, False, False])
        plugin._current = Batch(torch.zeros(3, 1), y_in, torch.zeros(3, dtype=torch.long))
        shard = Batch(whole.x[rows], whole.y[rows], whole.t[rows])
        return plugin.criterion(SimpleNamespace(global_batch=whole, dist=dist), shard, logits[rows])

    one = criterion(slice(0, 5), None)
    (g_one,) = torch.autograd.grad(one, logits)
    world, total = 3, 0.0
    for r in range(world):
        lo, hi = Dist(r, world, r).shard_rows(5)
        total = total + criterion(slice(lo, hi), Dist(r, world, r)) * ((hi - lo) * world / 5) / world
    (g_ddp,) = torch.autograd.grad(total, logits)
    assert float(total.detach()) == pytest.approx(float(one.detach()), rel=1e-6)
    assert torch.allclose(g_ddp, g_one, atol=1e-7)


def test_er_ace_beats_naive_and_validates() -> None:
    ace, stream = _fit("er_ace", memory_size=60)
    naive, _ = _fit("naive")
    assert sum(_class_il_acc(ace, stream)) / 3 > sum(_class_il_acc(naive, stream)) / 3 + 0.25
    assert ace.plugins[0].memory_usage()[0] == 60
    with pytest.raises(ConfigError, match="mem_batch_size"):
        STRATEGIES.get("er_ace").factory(mem_batch_size=0)


# -- WA ----------------------------------------------------------------------------------------------------------
def test_weight_aligning_equalises_mean_norms() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 6)
    with torch.no_grad():
        head.weight[4:] *= 7.0  # new classes with much larger weights
    before = head.weight.detach().clone()
    old, new = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5])
    gamma = bc.align_weights(head, old, new)
    norms = head.weight.detach().norm(dim=1)
    assert gamma < 0.2
    assert torch.isclose(norms[old].mean(), norms[new].mean())
    assert torch.equal(head.weight.detach()[old], before[old])  # old classes untouched


def test_wa_clips_weights_and_learns() -> None:
    wa, stream = _fit("wa", memory_size=60)
    head = wa.model.head
    assert (head.weight >= 0).all() and (head.bias == 0).all()
    assert len(wa.plugins[0].gammas) == 2  # aligned after experiences 2 and 3
    naive, _ = _fit("naive")
    assert sum(_class_il_acc(wa, stream)) / 3 > sum(_class_il_acc(naive, stream)) / 3 + 0.25


def test_wa_softmax_leaves_future_classes_alone() -> None:
    """mask_unseen (default): the rows of classes not met yet get no gradient; without it CE pushes them down."""
    from toys import gaussian_pairs_stream

    stream = gaussian_pairs_stream(n_exp=3, per_class=60)
    for mask in (True, False):
        torch.manual_seed(0)
        plugins = STRATEGIES.get("wa").factory(memory_size=60, mask_unseen=mask)
        learner = Learner(mlp(stream.input_shape, stream.n_classes, hidden=[32]), plugins,
                          TrainConfig(epochs=1, batch_size=10, lr=0.05, device="cpu"), seed=0)
        learner.begin(stream)
        future = learner.model.head.weight.detach()[2:].clone()  # clipped at before_fit
        learner.train_experience(stream.experiences[0])
        assert torch.equal(learner.model.head.weight.detach()[2:], future) == mask


# -- BiC ---------------------------------------------------------------------------------------------------------
def test_bias_layer_corrects_only_new_classes() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(50)
    logits = 3 * F.one_hot(y, 4).float() + torch.randn(200, 4, generator=g)
    biased = logits.clone()
    biased[:, 2:] = 2.0 * biased[:, 2:] + 3.0  # the new classes 2, 3 win too often
    allowed = torch.ones_like(biased, dtype=torch.bool)
    alpha, beta = bc.fit_bias_layer(biased, y, torch.tensor([2, 3]), allowed, steps=100)
    plugin = bc.BiCPlugin(100, 0.1, 2.0, 100)
    plugin.scale, plugin.shift = torch.ones(4), torch.zeros(4)
    plugin.scale[2:], plugin.shift[2:] = alpha, beta
    fixed = plugin.correct(biased)
    assert torch.equal(fixed[:, :2], biased[:, :2])  # old classes' logits pass unchanged
    acc = lambda z: float((z.argmax(1) == y).float().mean())  # noqa: E731
    assert acc(fixed) > acc(biased) + 0.2 and acc(fixed) >= acc(logits) - 0.05
    assert beta < 0  # the new classes' offset is taken back


def test_bic_validation_split_is_stable_and_held_out(monkeypatch) -> None:
    plugin = bc.BiCPlugin(100, 0.1, 2.0, 50)
    mem = plugin.memory
    g = torch.Generator().manual_seed(0)
    mem.update(torch.arange(200), torch.arange(2).repeat(100), torch.zeros(200, dtype=torch.long), g)
    val = set(mem.key[: mem.size][plugin.memory_split()].tolist())
    assert len(val) == 10  # 50 exemplars a class, 1 in 10 for validation
    mem.update(torch.arange(200, 300), torch.arange(2, 4).repeat(50), torch.zeros(100, dtype=torch.long), g)
    keys, split = mem.key[: mem.size].tolist(), plugin.memory_split().tolist()
    kept = {k for k, v in zip(keys, split, strict=True) if v}
    # 25 a class now (2 for validation); the old classes' remaining validation samples stay validation
    assert len(kept) == 4 * 2 and {k for k in kept if k < 200} <= val

    fitted: list[torch.Tensor] = []
    trained: list[torch.Tensor] = []
    real_fit, real_train = bc.validation_logits, Learner.train_data
    monkeypatch.setattr(bc, "validation_logits", lambda lrn, key, correct: fitted.append(key) or
                        real_fit(lrn, key, correct))
    monkeypatch.setattr(Learner, "train_data", lambda self, key, y, t, epochs=None: trained.append(key) or
                        real_train(self, key, y, t, epochs))
    learner, stream = _fit("bic", memory_size=60)
    assert len(fitted) == 2 and len(trained) == 3  # stage 2 after experiences 2 and 3 only
    for val_keys, train_keys in zip(fitted, trained[1:], strict=True):
        assert not set(val_keys.tolist()) & set(train_keys.tolist())  # fitted on held-out samples only
        counts = torch.bincount(_labels(stream, val_keys))
        assert counts[counts > 0].min() == counts.max()  # balanced: as many per class, old and new
    a = _class_il_acc(learner, stream)
    naive, _ = _fit("naive")
    assert sum(a) / 3 > sum(_class_il_acc(naive, stream)) / 3 + 0.25


def _labels(stream, keys: torch.Tensor) -> torch.Tensor:
    all_keys = torch.cat([stream.keys(e.train) for e in stream])
    all_y = torch.cat([e.y_train for e in stream])
    pos = {k: i for i, k in enumerate(all_keys.tolist())}
    return all_y[torch.tensor([pos[k] for k in keys.tolist()])]


# -- LUCIR -------------------------------------------------------------------------------------------------------
def test_lucir_classifier_is_cosine_normalised() -> None:
    torch.manual_seed(0)
    model = mlp((8,), 6, hidden=[16])
    plugin = LUCIRPlugin(50, 5.0, 0.5, 2, True, True)
    learner = Learner(model, [plugin], TrainConfig(device="cpu"))
    plugin.sigma = torch.tensor(4.0, requires_grad=True)
    x = torch.randn(20, 8)
    out = plugin.predict(learner, x, torch.zeros(20, dtype=torch.long)).detach()
    assert out.abs().max() <= 4.0 + 1e-5
    with torch.no_grad():
        model.head.weight[3] *= 10  # a class's weight norm and the head's bias do not matter
        model.head.bias += 5
    again = plugin.predict(learner, x, torch.zeros(20, dtype=torch.long)).detach()
    assert torch.allclose(out, again, atol=1e-6)
    assert torch.allclose(out / 4.0, F.normalize(model.features(x), dim=1) @ F.normalize(model.head.weight, dim=1).T,
                          atol=1e-6)


def test_lucir_margin_loss_is_zero_when_satisfied() -> None:
    old, new = torch.tensor([0, 1]), torch.tensor([2, 3, 4])
    cos = torch.tensor([[0.9, 0.1, 0.3, 0.2, 0.35],    # old sample, margin 0.5 met: 0.9 - 0.35 >= 0.5
                        [0.0, 0.8, 0.1, 0.2, 0.25],    # old sample, met
                        [0.0, 0.0, 0.1, 0.9, 0.0]])    # a new-class sample: not ranked
    y = torch.tensor([0, 1, 3])
    assert margin_ranking(cos, y, old, new, k=2, margin=0.5) == 0
    cos[0, 4] = 0.6  # a hard negative within the margin: 0.5 - 0.9 + 0.6 = 0.2, over 4 pairs
    assert torch.isclose(margin_ranking(cos, y, old, new, k=2, margin=0.5), torch.tensor(0.2 / 4))
    assert margin_ranking(cos, torch.tensor([2, 3, 4]), old, new, k=2, margin=0.5) == 0  # no exemplar in batch


def test_lucir_learns_and_keeps_old_embeddings() -> None:
    stream = gaussian_pairs_stream(n_exp=3, per_class=60)
    seen_rows: list[torch.Tensor] = []

    class Spy(LUCIRPlugin):
        def after_experience(self, learner, exp):
            seen_rows.append(learner.model.head.weight.detach().clone())
            super().after_experience(learner, exp)

    torch.manual_seed(0)
    plugin = Spy(60, 5.0, 0.5, 2, True, True)
    learner = Learner(mlp(stream.input_shape, stream.n_classes, hidden=[32]), [plugin],
                      TrainConfig(epochs=3, batch_size=10, lr=0.05, device="cpu"), seed=0)
    learner.fit(stream)
    assert torch.equal(seen_rows[1][:2], seen_rows[0][:2]) and torch.equal(seen_rows[2][:4], seen_rows[1][:4])
    assert float(plugin.sigma.detach()) > 1.0  # the scale is learnt
    naive, _ = _fit("naive", stream)
    assert sum(_class_il_acc(learner, stream)) / 3 > sum(_class_il_acc(naive, stream)) / 3 + 0.25


def test_factories_reject_bad_values() -> None:
    for name, bad in (("wa", {"temperature": 0}), ("bic", {"val_fraction": 1.0}), ("bic", {"bias_steps": 0}),
                      ("lucir", {"margin": 3.0}), ("lucir", {"k": -1}), ("lucir", {"memory_size": 0})):
        with pytest.raises(ConfigError, match=f"strategy.{next(iter(bad))}"):
            STRATEGIES.get(name).factory(**bad)


def test_herding_memory_keeps_and_truncates_the_herding_order() -> None:
    from cltoolbox.strategies.exemplar import HerdingMemory
    from cltoolbox.strategies.icarl import herding

    feats = F.normalize(torch.randn(100, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    mem = HerdingMemory(20)
    y = torch.arange(2).repeat_interleave(25)
    mem.update_herding(torch.arange(50), y, torch.zeros(50, dtype=torch.long), lambda k: feats[k])
    first = {c: torch.arange(50)[y == c][herding(feats[:50][y == c], 10)] for c in (0, 1)}
    for c in (0, 1):  # each class's first 10 in herding order (plain random selection would not match)
        assert mem.key[: mem.size][mem.y[: mem.size] == c].tolist() == first[c].tolist()
    mem.update_herding(torch.arange(50, 100), y + 2, torch.zeros(50, dtype=torch.long), lambda k: feats[k])
    for c in (0, 1):  # 5 a class now: the head of the old order
        assert mem.key[: mem.size][mem.y[: mem.size] == c].tolist() == first[c][:5].tolist()
    assert torch.bincount(mem.y[: mem.size]).tolist() == [5, 5, 5, 5]


def test_memory_is_class_balanced_keys() -> None:
    learner, _ = _fit("wa", memory_size=60, epochs=1)
    mem: ClassBalancedMemory = learner.plugins[0].memory
    assert mem.key.dtype == torch.int64 and torch.bincount(mem.y[: mem.size]).tolist() == [10] * 6
    items, nbytes = learner.plugins[0].memory_usage()
    assert items == 60 and nbytes > 60 * 8 * 4  # exemplars at native size plus the teacher's weights


# -- file-backed streams ---------------------------------------------------------------------------------------
def _file_stream(tmp_path):
    import numpy as np
    from PIL import Image

    from cltoolbox.data.base import Dataset
    from cltoolbox.data.source import ImageFiles

    def pngs(folder, labels):
        folder.mkdir(parents=True)
        rng, paths = np.random.default_rng(0), []
        for i, c in enumerate(labels.tolist()):  # each class a colour plus noise: learnable
            img = np.clip(rng.normal(40 * c, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
            paths.append(str(folder / f"{i}.png"))
        return paths

    y, yt = torch.arange(60) % 6, torch.arange(24) % 6
    make = lambda ps, ys, k: ImageFiles(ps, ys, k, resize=8, mean=(0.5,) * 3, std=(0.25,) * 3)  # noqa: E731
    data = Dataset("files", make(pngs(tmp_path / "train", y), y, "f/train"),
                   make(pngs(tmp_path / "test", yt), yt, "f/test"), 6)
    from cltoolbox.registry import SCENARIOS

    return SCENARIOS.get("class_incremental").factory(data, 0, n_experiences=3)


@pytest.mark.parametrize("name", ["er_ace", "wa", "bic", "lucir", "podnet"])
def test_runs_on_file_backed_streams_with_keys_only(name: str, tmp_path) -> None:
    stream = _file_stream(tmp_path)
    assert stream.file_backed()
    torch.manual_seed(0)
    if name == "podnet":  # its spatial distillation on a CNN's stage outputs
        from cltoolbox.models.resnet import reduced_resnet18

        model = reduced_resnet18(stream.input_shape, 6, nf=4)
    else:
        model = mlp(stream.input_shape, 6, hidden=[16])
    learner = Learner(model, STRATEGIES.get(name).factory(memory_size=30),
                      TrainConfig(epochs=2, batch_size=8, lr=0.05, device="cpu", workers=0), seed=0)
    learner.fit(stream)
    mem = learner.plugins[0].memory
    assert mem.size == 30 and mem.key.dtype == torch.int64  # keys, fetched from the files when replayed
    assert learner.fetch(mem.key[: mem.size]).shape == (30, 3, 8, 8)
    if name == "bic":  # experience 2's old classes had 10 exemplars each, one for validation: stage 2 ran
        assert len(learner.plugins[0].params) >= 1
    assert all(0 <= a <= 1 for a in _class_il_acc(learner, stream))


def test_lucir_balanced_finetuning_moves_only_the_classifier() -> None:
    learner, stream = _fit("lucir", memory_size=60, epochs=1)
    plugin = learner.plugins[0]
    plugin.balanced_epochs = 2
    body = {k: v.clone() for k, v in learner.model.body.state_dict().items()}
    head, sigma = learner.model.head.weight.detach().clone(), float(plugin.sigma.detach())
    plugin._balanced_finetune(learner)
    assert all(torch.equal(v, learner.model.body.state_dict()[k]) for k, v in body.items())
    assert not torch.equal(head, learner.model.head.weight.detach()) and float(plugin.sigma.detach()) != sigma
    assert learner.model.head.weight.grad is None
    cbf, _ = _fit("lucir", stream, memory_size=60, balanced_epochs=2)
    naive, _ = _fit("naive", stream)
    assert sum(_class_il_acc(cbf, stream)) / 3 > sum(_class_il_acc(naive, stream)) / 3 + 0.25


# -- PODNet ------------------------------------------------------------------------------------------------------
def test_podnet_lsc_and_nca_margin() -> None:
    g = torch.Generator().manual_seed(0)
    proxies = torch.randn(3 * 2, 4, generator=g)  # 3 classes x 2 proxies
    emb = proxies[2:3] * 5  # on class 1's first proxy
    scores = lsc_scores(emb, proxies, 2)
    assert scores.shape == (1, 3) and (scores <= 0).all() and (scores >= -4).all()
    s = 2 * F.cosine_similarity(emb, proxies[2:4]) - 2  # class 1's proxies: 0 (the one emb sits on) and s[1] < 0
    assert torch.isclose(scores[0, 1], (s.softmax(0) * s).sum()) and scores.argmax() == 1
    y = torch.tensor([0, 1])
    clear = torch.tensor([[0.0, -4.0, -4.0], [-4.0, 0.0, -4.0]])  # each true class ahead by far more than the margin
    assert nca_loss(clear, y, torch.tensor(10.0), margin=0.6) == 0
    close = torch.tensor([[0.0, -0.3, -4.0], [-4.0, 0.0, -0.3]])  # ahead by 0.3 < 0.6: hinge active
    assert nca_loss(close, y, torch.tensor(10.0), margin=0.6) > 0


def test_pod_spatial_pools_width_and_height() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 4, 4, generator=g)
    assert pod_spatial([a], [a.clone()]) == 0 and pod_spatial([a], [3 * a]) < 1e-6  # normalised
    swapped = a[:, :, :, [1, 0, 2, 3]]  # columns swapped: width sums unchanged, height sums change
    assert pod_spatial([a], [swapped]) > 0
    pooled = lambda t: torch.cat((t.sum(3).flatten(1), t.sum(2).flatten(1)), 1)  # noqa: E731
    assert torch.isclose(pod_spatial([a], [swapped]),
                         (F.normalize(pooled(a), dim=1) - F.normalize(pooled(swapped), dim=1)).norm(dim=1).mean())
    v = torch.rand(2, 5, generator=g)
    assert pod_flat(v, 2 * v) < 1e-6 and pod_flat(v, v.flip(1)) > 0


def test_podnet_learns_and_keeps_old_proxies() -> None:
    from cltoolbox.strategies.podnet import PODNetPlugin

    stream = gaussian_pairs_stream(n_exp=3, per_class=60)
    snapshots: list[torch.Tensor] = []

    class Spy(PODNetPlugin):
        def after_experience(self, learner, exp):
            super().after_experience(learner, exp)
            snapshots.append(self.proxies.detach().clone())

    torch.manual_seed(0)  # without the class-balanced finetuning, which retrains every proxy on purpose
    learner = Learner(mlp(stream.input_shape, stream.n_classes, hidden=[32]), [Spy(60, 3, 0.6, 3.0, 1.0,
                                                                                   balanced_epochs=0)],
                      TrainConfig(epochs=3, batch_size=10, lr=0.05, device="cpu"), seed=0)
    learner.fit(stream)
    assert torch.equal(snapshots[1][:6], snapshots[0][:6]) and torch.equal(snapshots[2][:12], snapshots[1][:12])
    assert not torch.equal(snapshots[1][6:12], snapshots[0][6:12])  # new classes' proxies: imprinted, trained
    podnet, _ = _fit("podnet", stream, memory_size=60, proxies=3)
    naive, _ = _fit("naive", stream)
    assert sum(_class_il_acc(podnet, stream)) / 3 > sum(_class_il_acc(naive, stream)) / 3 + 0.25
