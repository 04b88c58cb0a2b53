"""EASE: the prototype complement and reweighting formulas by hand, subspaces per experience, learning, resume,
and the two pre-trained backbones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cltoolbox.data import load_dataset
from cltoolbox.errors import ConfigError
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.registry import MODELS, SCENARIOS, STRATEGIES
from cltoolbox.strategies.ease import complement, reweighted_logits

TRAIN = TrainConfig(epochs=3, batch_size=32, lr=0.1, momentum=0.9)


def _digits(n_exp: int = 5):
    return SCENARIOS.get("class_incremental").factory(load_dataset("digits"), 0, n_experiences=n_exp)


def _learner(stream, adapter_scale: float = 1.0, seed: int = 0, model_seed: int = 0) -> Learner:
    torch.manual_seed(model_seed)
    model = MODELS.get("mlp").factory(stream.input_shape, stream.n_classes, hidden=[32])
    plugins = STRATEGIES.get("ease").factory(bottleneck=16, adapter_scale=adapter_scale)
    return Learner(model, plugins, TRAIN, seed=seed)


def test_complement_is_the_softmax_similarity_weighted_sum_of_newer_prototypes() -> None:
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    own = torch.tensor([0, 1, 1, 2])  # class 0 in subspace 0, classes 1 and 2 in 1, class 3 in 2
    real = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out = complement(protos, real, own)

    def cos(a, b):
        return float(F.cosine_similarity(a, b, dim=0))

    # class 0 in subspace 1: candidates are classes 1, 2, 3 (real in subspaces 0 and 1), similarity in subspace 0
    w = torch.softmax(torch.tensor([cos(protos[0, 0], protos[n, 0]) for n in (1, 2, 3)], dtype=torch.float64), 0)
    torch.testing.assert_close(out[0, 1], w[0] * protos[1, 1] + w[1] * protos[2, 1] + w[2] * protos[3, 1])
    # class 0 in subspace 2: only class 3 has a real prototype there -> its prototype
    torch.testing.assert_close(out[0, 2], protos[3, 2])
    # class 1 in subspace 2: similarity measured in class 1's own subspace (1), candidate class 3 only
    torch.testing.assert_close(out[1, 2], protos[3, 2])
    assert torch.equal(out[real], protos[real])  # real prototypes are never touched


def test_reweighting_weights_the_own_subspace_one_and_the_others_alpha_over_t_minus_one() -> None:
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    protos = torch.randn(3, 3, 4, generator=g, dtype=torch.float64)
    own = torch.tensor([0, 2, 1])
    logits = reweighted_logits(feats, protos, own, alpha=0.3)
    for c in range(3):
        expected = sum((1.0 if j == own[c] else 0.3 / 2)
                       * F.cosine_similarity(feats[j], protos[c, j].expand(6, -1), dim=1) for j in range(3))
        torch.testing.assert_close(logits[:, c], expected)


def test_one_frozen_adapter_per_experience_and_prototypes_are_class_means_in_every_subspace() -> None:
    stream = _digits(5)
    learner = _learner(stream)
    (plugin,) = learner.plugins
    learner.begin(stream)
    learner.train_experience(stream.experiences[0])
    first = {k: v.clone() for k, v in plugin.adapters[0].state_dict().items()}
    assert not torch.equal(first["up.weight"], torch.zeros_like(first["up.weight"]))  # it trained
    learner.train_experience(stream.experiences[1])
    assert len(plugin.adapters) == 2 and plugin.protos.shape[1] == 2
    for k, v in plugin.adapters[0].state_dict().items():
        assert torch.equal(v, first[k])  # frozen once its experience is over
    exp = stream.experiences[1]
    with torch.no_grad():
        f = learner.model.features(exp.x_train)
        for j in range(2):
            sub = plugin.adapters[j](f).double()
            for c in exp.classes:
                torch.testing.assert_close(plugin.protos[c, j], sub[exp.y_train == c].mean(0))
        x0 = stream.experiences[0].x_train
        f0 = learner.model.features(x0)
        shift0 = float(((plugin.adapters[0](f0) - f0).norm(dim=1) / f0.norm(dim=1)).mean())
    shifts = plugin.report(learner, stream)["ease_feature_shift"]
    assert len(shifts) == 2 and shifts[0] == pytest.approx(shift0, rel=1e-5) and shift0 > 0.01
    old = stream.experiences[0].classes
    assert plugin.own[list(old)].tolist() == [0] * len(old) and not plugin.real[list(old), 1].any()
    items, nbytes = plugin.memory_usage()
    adapter_bytes = sum(p.numel() * 4 for a in plugin.adapters for p in a.parameters())
    assert items == len(old) + len(exp.classes) and nbytes >= adapter_bytes + plugin.protos.numel() * 8
    assert plugin.cost()["ease_adapter_params"] == adapter_bytes / 4
    assert plugin.cost()["ease_subspaces"] == 2


def test_learns_on_digits_far_above_fine_tuning(tmp_path) -> None:
    import cltoolbox

    def run(strategy: dict) -> float:
        config = {"name": "ease_test", "scenario": {"name": "class_incremental", "dataset": "digits",
                                                     "n_experiences": 5},
                  "model": {"name": "mlp", "hidden": [64]}, "strategy": strategy,
                  "train": {"epochs": 5, "batch_size": 32, "lr": 0.1, "momentum": 0.9}, "seeds": [0],
                  "out": str(tmp_path)}
        return cltoolbox.run(config, out=str(tmp_path), overwrite=True, quiet=True)[0]["class_il"]["acc"]

    ease, naive = run({"name": "ease", "adapter_scale": 1.0}), run({"name": "naive"})
    assert ease > max(0.7, naive + 0.4), (ease, naive)


def test_resumes_from_a_checkpoint_to_the_same_logits() -> None:
    stream = _digits(5)
    a = _learner(stream)
    a.begin(stream)
    a.train_experience(stream.experiences[0])
    state = a.state_dict()
    torch.manual_seed(7)  # the restored learner must not depend on the global RNG
    b = _learner(stream)
    b.load_state_dict(state)  # plugin state before before_fit, as the runner does
    b.begin(stream)
    for learner in (a, b):
        learner.train_experience(stream.experiences[1])
    x = torch.cat([e.x_test for e in stream.experiences])
    t = torch.zeros(len(x), dtype=torch.int64)
    assert torch.equal(a.logits(x, t), b.logits(x, t))


@pytest.mark.parametrize("name", ["vit", "efficientnet_lite0"])
def test_runs_on_the_pretrained_backbones_with_the_backbone_frozen_and_cached(name: str) -> None:
    if name == "efficientnet_lite0":
        pytest.importorskip("timm")
        kwargs = {"pretrained": False, "frozen": True, "resize": 32}
    else:
        kwargs = {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "frozen": True}
    stream = _digits(5)
    torch.manual_seed(0)
    model = MODELS.get(name).factory(stream.input_shape, stream.n_classes, **kwargs)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    (plugin,) = STRATEGIES.get("ease").factory(adapter_scale=1.0)
    learner = Learner(model, [plugin], TrainConfig(epochs=1, batch_size=64, lr=0.1), seed=0)
    learner.begin(stream)
    for exp in stream.experiences[:2]:
        learner.train_experience(exp)
    assert len(plugin.adapters) == 2 and plugin.adapters[0].down.in_features == model.head.in_features
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    n_train = sum(len(e.y_train) for e in stream.experiences[:2])
    assert model.cache.misses == len(model.cache) == n_train  # every image embedded once (training + prototypes)
    x = stream.experiences[0].x_test
    logits = learner.logits(x, torch.zeros(len(x), dtype=torch.int64))
    assert logits.shape == (len(x), 10) and torch.isfinite(logits).all()


def test_parameters_are_checked() -> None:
    factory = STRATEGIES.get("ease").factory
    for bad in ({"bottleneck": 0}, {"adapter_scale": 0.0}, {"alpha": -1.0}, {"scale": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            factory(**bad)
