"""The timm ViT backbone: prompt/prefix entry points, per-sample feature cache, local weights."""

from __future__ import annotations

import pytest
import torch

import cltoolbox
from cltoolbox.errors import ConfigError
from cltoolbox.models.cache import SampleFeatureCache
from cltoolbox.models.vit import save_backbone, vit

SMALL = {"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 4}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return vit((1, 8, 8), 10, **SMALL).eval()


def test_encode_without_prompts_is_the_timm_forward(model) -> None:
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(model.pool(model.encode(x)), model.backbone(model.images(x)), atol=1e-6)
    assert model(x).shape == (5, 10)


def test_prefix_equals_attending_to_extra_tokens(model) -> None:
    """Prefix tuning with the keys/values of extra tokens z is attention over [z; x], read at x's rows."""
    attn = model.backbone.blocks[0].attn
    x, z = torch.randn(3, 6, 32), torch.randn(3, 2, 32)
    _, k, v = attn.qkv(z).chunk(3, dim=-1)
    from cltoolbox.models.vit import prefix_attention

    with_prefix = prefix_attention(attn, x, (k, v))
    full = attn(torch.cat((z, x), dim=1))[:, 2:]  # timm's own attention; z's queries are dropped
    assert torch.allclose(with_prefix, full, atol=1e-5)
    empty = torch.zeros(3, 0, 32)
    assert torch.allclose(prefix_attention(attn, x, (empty, empty)), attn(x), atol=1e-5)


def test_prompts_and_prefixes_change_the_output_and_get_gradients(model) -> None:
    model.set_frozen(True)
    x = torch.randn(4, 1, 8, 8)
    prompts = torch.randn(4, 3, 32, requires_grad=True)
    prefix = (torch.randn(4, 2, 32, requires_grad=True), torch.randn(4, 2, 32, requires_grad=True))
    h = model.encode(x, prompts=prompts, prefixes={1: prefix})
    assert h.shape == (4, 1 + 3 + 4, 32)
    assert not torch.allclose(model.pool(h), model.pool(model.encode(x)))
    h.sum().backward()
    assert prompts.grad.abs().sum() > 0 and prefix[0].grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())  # frozen: nothing accumulates there


def test_frozen_features_are_cached_per_sample(model) -> None:
    model.set_frozen(True)
    x = torch.randn(20, 1, 8, 8)
    first = model.features(x[:12])
    assert (model.cache.hits, model.cache.misses) == (0, 12)
    mixed = torch.cat((x[10:], x[3:5], x[3:4]))  # 2 cached + 8 new + repeats within the batch
    out = model.features(mixed)
    assert model.cache.misses == 20 and len(model.cache) == 20
    assert torch.equal(out[:2], first[10:12]) and torch.equal(out[10], first[3]) and torch.equal(out[12], out[10])
    assert torch.allclose(out, model._features(mixed), atol=1e-6)
    model.load_state_dict(model.state_dict())  # new weights: the cache starts over
    assert len(model.cache) == 0
    model.set_frozen(False)
    model.features(x)
    assert len(model.cache) == 0  # a trainable backbone is never cached


def test_cache_entries_made_under_inference_mode_work_with_autograd() -> None:
    cache = SampleFeatureCache()
    x = torch.randn(6, 4)
    with torch.inference_mode():
        cache(x, lambda rows: rows * 2)
    key = torch.randn(4, requires_grad=True)
    (cache(x, lambda rows: rows * 0) @ key).sum().backward()  # hits only: the stored rows, not the lambda
    assert torch.allclose(key.grad, (x * 2).sum(0))


def test_cache_keys_are_exact_bytes() -> None:
    cache = SampleFeatureCache()
    x = torch.zeros(2, 3)
    x[1, 0] = -0.0  # same value, other bytes: a different sample for the cache
    cache(x, lambda rows: torch.arange(rows.shape[0], dtype=torch.float32)[:, None])
    assert len(cache) == 2


def test_weights_from_a_run_checkpoint(tmp_path) -> None:
    config = {"name": "pre", "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 1},
              "model": {"name": "vit", **SMALL}, "strategy": {"name": "naive"}, "train": {"epochs": 1},
              "seeds": [0], "out": str(tmp_path)}
    (summary,) = cltoolbox.run(config, quiet=True)
    ckpt = tmp_path / "pre" / "naive" / "class_incremental-digits" / "seed_0" / "checkpoint" / "state.pt"
    trained = torch.load(ckpt, weights_only=True)["learner"]["model"]
    loaded = vit((1, 8, 8), 4, weights=str(ckpt), **SMALL)
    for k, v in loaded.backbone.state_dict().items():
        assert torch.equal(v, trained[f"backbone.{k}"]), k
    # a bigger grid: position embeddings are resampled, everything else is reused
    big = vit((1, 8, 8), 4, weights=str(ckpt), img_size=16, **SMALL)
    assert big.backbone.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(big.backbone.blocks[0].attn.qkv.weight, trained["backbone.blocks.0.attn.qkv.weight"])
    save_backbone(loaded, str(tmp_path / "b.pt"))
    again = vit((1, 8, 8), 4, weights=str(tmp_path / "b.pt"), **SMALL)
    assert torch.equal(again.backbone.cls_token, loaded.backbone.cls_token)
    with pytest.raises(ConfigError, match=r"model\.weights: .* does not fit this ViT"):
        vit((1, 8, 8), 4, weights=str(tmp_path / "b.pt"), **{**SMALL, "embed_dim": 64})


@pytest.mark.parametrize(("params", "message"), [
    ({"weights": "/no/such.pt"}, r"model\.weights: no file at /no/such\.pt"),
    ({"patch_size": 3}, r"model\.patch_size: 3 does not divide the image side 8"),
    ({"num_heads": 5}, r"model\.num_heads: 5 does not divide embed_dim 64"),
    ({"pretrained": True}, r"model\.pretrained: hub weights need a named arch"),
    ({"arch": "vit_nonexistent_model"}, r"model\.arch: timm has no 'vit_nonexistent_model'"),
])
def test_bad_vit_parameters(params, message) -> None:
    with pytest.raises(ConfigError, match=message):
        vit((1, 8, 8), 10, **params)


def test_named_timm_arch_and_flat_inputs() -> None:
    m = vit((784,), 10, arch="vit_tiny_patch16_224", img_size=32)
    assert m.embed_dim == 192 and m.img_size == (32, 32) and m.in_chans == 3
    assert m(torch.randn(2, 784)).shape == (2, 10)  # 28x28 grey -> 32x32 RGB
    with pytest.raises(ConfigError, match="not square images"):
        vit((40,), 10)


def test_new_weights_or_a_copy_never_serve_stale_cached_features() -> None:
    import copy

    from cltoolbox.strategies.gdumb import reinitialise

    torch.manual_seed(0)
    model = vit((1, 8, 8), 10, patch_size=4, embed_dim=16, depth=1, num_heads=2, frozen=True)
    x = torch.randn(5, 1, 8, 8)
    before = model.features(x)
    assert len(model.cache) == 5
    assert len(copy.deepcopy(model).cache) == 0  # a copy (an ensemble member) starts with an empty cache
    reinitialise(model, seed=1, device=torch.device("cpu"))  # Model Zoo's fresh member
    assert len(model.cache) == 0
    after = model.features(x)
    assert not torch.allclose(before, after)
    assert torch.equal(after, model._features(x))


def test_grey_inputs_use_the_average_of_rgb_statistics() -> None:
    model = vit((1, 8, 8), 10, patch_size=4, embed_dim=16, depth=1, num_heads=2, normalize="imagenet")
    assert model.in_chans == 1
    assert model.mean.flatten().tolist() == pytest.approx([(0.485 + 0.456 + 0.406) / 3])
    assert model.std.flatten().tolist() == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
