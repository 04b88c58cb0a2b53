"""RanPAC, APER and SLCA: their mechanisms on hand-made features, and one small learning run each (digits)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cltoolbox
from cltoolbox.data import load_dataset
from cltoolbox.errors import ConfigError
from cltoolbox.registry import MODELS, SCENARIOS, STRATEGIES
from cltoolbox.strategies.aper import APERPlugin
from cltoolbox.strategies.ranpac import RanPACPlugin, ridge_solve, select_lambda
from cltoolbox.strategies.slca import ClassGaussians, SLCAPlugin


def _feats(n: int = 240, d: int = 6, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    return torch.randn(k, d, generator=g)[y] * 3 + torch.randn(n, d, generator=g), y


def _digits():
    return SCENARIOS.get("class_incremental").factory(load_dataset("digits"), 0, n_experiences=5)


def _ranpac(m: int = 40, lambdas: list[float] | None = None, val: float = 0.2) -> RanPACPlugin:
    plugin = RanPACPlugin("none", m, lambdas or [1e-2, 1.0, 100.0], val)
    plugin.n_classes = 5  # class 4 is never seen
    return plugin


# -- RanPAC ---------------------------------------------------------------------------------------------
def test_ranpac_statistics_are_the_sums_over_all_seen_samples_in_any_chunking(monkeypatch) -> None:
    import cltoolbox.strategies.ranpac as ranpac_module

    x, y = _feats()
    a, b = _ranpac(), _ranpac()
    monkeypatch.setattr(ranpac_module, "_CHUNK", 7)  # projected 7 rows at a time inside each update
    a.update(SimpleNamespace(generator=torch.Generator().manual_seed(0)), x[y < 2], y[y < 2])  # experience 1
    a.update(SimpleNamespace(generator=torch.Generator().manual_seed(1)), x[y >= 2], y[y >= 2])  # experience 2
    b.update(SimpleNamespace(generator=torch.Generator().manual_seed(0)), x[:1], y[:1])  # same projection
    b.update(SimpleNamespace(generator=torch.Generator().manual_seed(2)), x[1:], y[1:])  # other chunks
    torch.testing.assert_close(a.projection, b.projection)
    h = F.relu(x @ a.projection).double()  # every seen sample, once
    onehot = F.one_hot(y, 5).double()
    for p in (a, b):  # float32 projections of different row blocks may round apart by ~1 ulp: rtol 1e-5
        torch.testing.assert_close(p.gram, h.T @ h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.prototypes, h.T @ onehot, rtol=1e-5, atol=1e-5)
        assert p.counts.tolist() == [60.0, 60.0, 60.0, 60.0, 0.0]


def test_ranpac_head_is_the_closed_form_ridge_solution() -> None:
    x, y = _feats()
    p = _ranpac()
    p.update(SimpleNamespace(generator=torch.Generator().manual_seed(0)), x, y)
    assert p.lam in p.lambdas
    h = F.relu(x @ p.projection).double()
    w = torch.linalg.solve(h.T @ h + p.lam * torch.eye(p.projection_dim, dtype=torch.float64),
                           h.T @ F.one_hot(y, 5).double())
    torch.testing.assert_close(p.head(), w)
    logits = p.logits(x)
    torch.testing.assert_close(logits[:, :4], (h @ w)[:, :4])
    assert (logits[:, 4] <= -1e8).all()  # never seen
    assert (logits.argmax(1) == y).double().mean() > 0.95


def test_ranpac_lambda_is_the_grid_point_with_least_held_out_mse() -> None:
    g = torch.Generator().manual_seed(3)
    h_fit, h_val = torch.randn(30, 12, generator=g).double(), torch.randn(10, 12, generator=g).double()
    y_fit, y_val = (F.one_hot(torch.randint(3, (n,), generator=g), 3).double() for n in (30, 10))
    gram, targets = h_fit.T @ h_fit, h_fit.T @ y_fit
    grid = [1e-3, 1e-1, 1.0, 10.0, 1e3]
    mse = [float(((h_val @ ridge_solve(gram, targets, lam) - y_val) ** 2).mean()) for lam in grid]
    assert select_lambda(gram, targets, h_val, y_val, grid) == grid[mse.index(min(mse))]


def test_ranpac_parameters_are_checked() -> None:
    factory = STRATEGIES.get("ranpac").factory
    for bad in ({"projection_dim": 0}, {"lambdas": []}, {"lambdas": [0.0]}, {"val_fraction": 1.0}):
        with pytest.raises(ConfigError):
            factory(**bad)


# -- APER -----------------------------------------------------------------------------------------------
def test_aper_features_are_the_concatenation_and_prototypes_their_class_means() -> None:
    from cltoolbox.loop import Learner, TrainConfig

    stream = _digits()
    torch.manual_seed(0)
    model = MODELS.get("mlp").factory(stream.input_shape, 10, hidden=[16])
    (plugin,) = STRATEGIES.get("aper").factory(adapter_scale=1.0)
    learner = Learner(model, [plugin], TrainConfig(epochs=2, batch_size=32, lr=0.1), seed=0)
    learner.begin(stream)
    x0 = stream.experiences[0].x_train
    with torch.no_grad():
        assert torch.equal(plugin.adapter(model.features(x0)), model.features(x0))  # zero-initialised up
    for exp in stream.experiences[:2]:
        learner.train_experience(exp)
    with torch.no_grad():
        f = model.features(x0)
        adapted = plugin.adapter(f)
        assert not torch.allclose(adapted, f)  # the adapter learned something on experience 1
        shift = float(((adapted - f).norm(dim=1) / f.norm(dim=1)).mean())
    assert plugin.report(learner, stream)["aper_feature_shift"] == pytest.approx(shift, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(plugin.concat_features(learner, x0), torch.cat((f, adapted), 1))
    xs = torch.cat([e.x_train for e in stream.experiences[:2]])
    ys = torch.cat([e.y_train for e in stream.experiences[:2]])
    with torch.no_grad():
        cat = torch.cat((model.features(xs), plugin.adapter(model.features(xs))), 1).double()
    for c in ys.unique().tolist():
        torch.testing.assert_close(plugin.stats.means()[c], cat[ys == c].mean(0))


def test_aper_body_keeps_the_pretrained_model_beside_the_adapted_one() -> None:
    from cltoolbox.loop import Learner, TrainConfig

    stream = _digits()
    torch.manual_seed(0)
    model = MODELS.get("mlp").factory(stream.input_shape, 10, hidden=[16])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = APERPlugin("body", 8, 0.1, 1.0)
    learner = Learner(model, [plugin], TrainConfig(epochs=2, batch_size=32, lr=0.1), seed=0)
    learner.begin(stream)
    learner.train_experience(stream.experiences[0])
    for k, v in plugin.pretrained.state_dict().items():
        assert torch.equal(v, before[k])  # the PTM is untouched
    assert not torch.equal(model.body[1].weight, before["body.1.weight"])  # the adapted model moved
    x = stream.experiences[1].x_test
    with torch.no_grad():
        expected = torch.cat((plugin.pretrained.features(x), model.features(x)), 1)
        torch.testing.assert_close(plugin.concat_features(learner, x), expected)
    items, nbytes = plugin.memory_usage()
    assert items == 2 and nbytes >= sum(v.numel() * 4 for v in before.values())


# -- SLCA -----------------------------------------------------------------------------------------------
def test_slca_sampled_features_follow_the_stored_class_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g)
    x = torch.randn(4000, 4, generator=g) @ a + torch.tensor([5.0, -2.0, 0.0, 1.0])
    y = torch.zeros(4000, dtype=torch.int64)
    x2 = torch.randn(4000, 4, generator=g) * 0.5 - 3
    stats = ClassGaussians()
    stats.add(torch.cat((x, x2)), torch.cat((y, y + 2)), 3)
    xd = x.double()
    torch.testing.assert_close(stats.means[0], xd.mean(0))
    torch.testing.assert_close(stats.covs[0].double(), torch.cov(xd.T), rtol=1e-5, atol=1e-5)
    assert stats.seen.tolist() == [True, False, True]
    s, sy = stats.sample(20000, stats.factors(0.0), torch.Generator().manual_seed(1))
    assert sy.tolist() == [0] * 20000 + [2] * 20000  # seen classes only
    for c in (0, 2):
        torch.testing.assert_close(s[sy == c].mean(0).double(), stats.means[c], atol=0.05, rtol=0)
        torch.testing.assert_close(torch.cov(s[sy == c].T.double()), stats.covs[c].double(), atol=0.1, rtol=0.05)


def test_slca_backbone_learns_at_the_slow_fraction_of_the_head_lr() -> None:
    from cltoolbox.loop import Learner, TrainConfig

    model = MODELS.get("mlp").factory((8,), 4, hidden=[16])
    plugin = SLCAPlugin(0.01, 5, 256, 0.01, 128, 0.1, 1e-4)
    for optimizer in ("sgd", "adam"):
        learner = Learner(model, [plugin], TrainConfig(lr=0.2, optimizer=optimizer, momentum=0.5), seed=0)
        opt = learner.make_optimizer()  # through the param_groups hook
        assert type(opt).__name__ == optimizer.upper() if optimizer == "sgd" else "Adam"
        head, body = opt.param_groups
        if optimizer == "sgd":
            assert head["momentum"] == body["momentum"] == 0.5  # train.* fills what the groups leave out
        assert head["lr"] == 0.2 and body["lr"] == pytest.approx(0.002)
        assert {id(p) for p in head["params"]} == {id(model.head.weight), id(model.head.bias)}
        assert {id(p) for p in body["params"]} == {id(p) for p in model.body.parameters()}


def test_slca_local_training_uses_the_slow_optimizer_and_aligns_every_seen_class() -> None:
    from toys import gaussian_pairs_stream

    from cltoolbox.loop import Learner, TrainConfig

    stream = gaussian_pairs_stream(n_exp=2)
    torch.manual_seed(0)
    model = MODELS.get("mlp").factory((8,), 4, hidden=[16])
    plugin = SLCAPlugin(0.01, 2, 64, 0.01, 32, 0.1, 1e-4)
    learner = Learner(model, [plugin], TrainConfig(epochs=1, batch_size=8, lr=0.1), seed=0)
    learner.begin(stream)
    learner.train_experience(stream.experiences[0])
    assert [g["lr"] for g in learner.optimizer.param_groups] == [0.1, pytest.approx(0.001)]
    assert "make_optimizer" not in vars(learner)  # the hook, not a patched method
    assert plugin.stats.seen.tolist() == [True, True, False, False]
    learner.train_experience(stream.experiences[1])
    assert plugin.stats.seen.all()
    old = stream.experiences[0]
    pred = learner.logits(old.x_test, torch.zeros(len(old.y_test), dtype=torch.int64)).argmax(1)
    assert (pred == old.y_test).double().mean() > 0.8  # old classes survive alignment


# -- learning ---------------------------------------------------------------------------------------------
def _run(strategy: dict, out) -> dict:
    config = {
        "name": "pretrained_more_test",
        "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": [64]},
        "strategy": strategy,
        "train": {"epochs": 5, "batch_size": 32, "lr": 0.05},
        "seeds": [0],
        "out": str(out),
    }
    return cltoolbox.run(config, out=str(out), overwrite=True, quiet=True)[0]


def test_learning_on_digits(tmp_path) -> None:
    """On random ReLU features of digits (5 x 2 classes, replay-free), each method learns far above naive
    fine-tuning, and RanPAC's decorrelated ridge head beats SimpleCIL's prototypes."""
    simple = _run({"name": "simplecil"}, tmp_path / "s")["class_il"]["acc"]
    ranpac = _run({"name": "ranpac", "projection_dim": 500}, tmp_path / "r")
    aper = _run({"name": "aper"}, tmp_path / "a")["class_il"]["acc"]
    slca = _run({"name": "slca"}, tmp_path / "c")["class_il"]["acc"]
    print(simple, ranpac["class_il"]["acc"], aper, slca)
    assert ranpac["class_il"]["acc"] > max(0.9, simple + 0.05), (ranpac["class_il"]["acc"], simple)
    assert ranpac["cost"]["memory_bytes"] >= 500 * 500 * 8  # the Gram matrix is counted
    assert aper > 0.7, aper
    assert slca > 0.8, slca


# -- resume and file-backed streams -----------------------------------------------------------------------
@pytest.mark.parametrize("adapt", ["adapter", "body"])
def test_aper_resumes_from_a_checkpoint(adapt: str) -> None:
    """A learner restored from a state dict (plugin state loaded before before_fit, as the runner does) predicts
    exactly as the one that trained, the pre-trained copy of ``body`` rebuilt from the checkpoint."""
    from cltoolbox.loop import Learner, TrainConfig

    stream = _digits()

    def make() -> Learner:
        torch.manual_seed(0)
        model = MODELS.get("mlp").factory(stream.input_shape, 10, hidden=[16])
        return Learner(model, STRATEGIES.get("aper").factory(adapt=adapt, adapter_scale=1.0),
                       TrainConfig(epochs=2, batch_size=32, lr=0.1), seed=0)

    a = make()
    a.begin(stream)
    for exp in stream.experiences[:2]:
        a.train_experience(exp)
    state = a.state_dict()
    torch.manual_seed(5)  # the restored learner must not depend on the global RNG either
    b = make()
    b.load_state_dict(state)
    b.begin(stream)
    b.train_experience(stream.experiences[2])
    a.train_experience(stream.experiences[2])
    x = torch.cat([e.x_test for e in stream.experiences])
    t = torch.zeros(len(x), dtype=torch.int64)
    assert torch.equal(a.logits(x, t), b.logits(x, t))


def test_file_backed_stream_embeds_each_image_once(tmp_path) -> None:
    """On PNG files through a frozen ViT, every method walks samples by stream key: each image is decoded and
    embedded once per run (training, statistics, alignment and evaluation hit the cache), nothing is copied."""
    import numpy as np
    from PIL import Image

    from cltoolbox.data.base import Dataset
    from cltoolbox.data.source import ImageFiles
    from cltoolbox.evaluate import History, evaluate_stream
    from cltoolbox.loop import Learner, TrainConfig

    rng = np.random.default_rng(0)

    def pngs(folder, labels):
        folder.mkdir()
        paths = []
        for i, c in enumerate(labels.tolist()):
            img = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
            img[2 * c : 2 * c + 2] += 180  # class c: a bright band at rows 2c, 2c+1
            Image.fromarray(img).save(folder / f"{i}.png")
            paths.append(str(folder / f"{i}.png"))
        return ImageFiles(paths, labels, folder.name, resize=8, mean=(0.5,) * 3, std=(0.25,) * 3)

    ytr, yte = torch.arange(40) % 4, torch.arange(16) % 4
    data = Dataset("files", pngs(tmp_path / "tr", ytr), pngs(tmp_path / "te", yte), 4)
    stream = SCENARIOS.get("class_incremental").factory(data, 0, n_experiences=2)
    assert stream.file_backed()
    for name, params in (("ranpac", {"projection_dim": 64}), ("aper", {}), ("slca", {"ca_samples": 32}),
                         ("ease", {"adapter_scale": 1.0})):
        torch.manual_seed(0)
        model = MODELS.get("vit").factory(stream.input_shape, 4, patch_size=4, embed_dim=16, depth=1,
                                          num_heads=2, frozen=True)
        learner = Learner(model, STRATEGIES.get(name).factory(**params),
                          TrainConfig(epochs=2, batch_size=8, lr=0.05, workers=0), seed=0)
        history = History(len(stream), stream.n_classes)
        learner.fit(stream, on_experience_end=lambda lrn, e, h=history: evaluate_stream(lrn, stream, e.index, h))
        assert model.cache.misses == len(model.cache) == 56, name  # 40 + 16 images, each embedded once
        assert history.accuracy[-1].mean() > 0.35, (name, history.accuracy)  # chance: 0.25 (class-IL)


def test_aper_vpt_trains_prompt_tokens_of_a_frozen_vit_and_resumes() -> None:
    """APER's VPT-shallow variant: only the prompt tokens (and the dropped head) train, the ViT stays as it was,
    phi* is the prompted [CLS] feature, and a restored learner predicts exactly as the one that trained."""
    from cltoolbox.loop import Learner, TrainConfig

    stream = _digits()

    def make() -> Learner:
        torch.manual_seed(0)
        model = MODELS.get("vit").factory(stream.input_shape, 10, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                                          frozen=True)
        return Learner(model, STRATEGIES.get("aper").factory(adapt="vpt", prompt_length=3),
                       TrainConfig(epochs=2, batch_size=32, lr=0.5, momentum=0.9), seed=0)

    a = make()
    backbone = {k: v.clone() for k, v in a.model.backbone.state_dict().items()}
    (plugin,) = a.plugins
    a.begin(stream)
    start = plugin.prompts.detach().clone()
    assert plugin.prompts.shape == (3, 16)
    a.train_experience(stream.experiences[0])
    assert not torch.equal(plugin.prompts, start)  # the prompts learned
    for k, v in a.model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    x = stream.experiences[1].x_test
    with torch.no_grad():
        prompted = a.model.pool(a.model.encode(x, prompts=plugin.prompts.expand(len(x), -1, -1)))
        torch.testing.assert_close(plugin.concat_features(a, x), torch.cat((a.model.features(x), prompted), 1))
    assert plugin.memory_usage()[1] >= 3 * 16 * 4
    b = make()
    b.load_state_dict(a.state_dict())
    b.begin(stream)
    for learner in (a, b):
        learner.train_experience(stream.experiences[1])
    xs = torch.cat([e.x_test for e in stream.experiences])
    t = torch.zeros(len(xs), dtype=torch.int64)
    assert torch.equal(a.logits(xs, t), b.logits(xs, t))
    with pytest.raises(ConfigError, match="adapt: vpt"):
        plugin.check(MODELS.get("mlp").factory(stream.input_shape, 10, hidden=[8]), stream)
