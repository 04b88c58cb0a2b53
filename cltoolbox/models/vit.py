"""Vision Transformers from timm, with the token-level entry points that prompting methods need.

``vit`` builds either a named timm architecture (``arch: vit_base_patch16_224``, weights from the hub when
``pretrained: true`` and the machine is online) or a small ViT from explicit sizes (``embed_dim``, ``depth``,
``num_heads``, ``patch_size``; the offline default, random init). ``weights: path`` loads a local checkpoint:
a timm/``.safetensors`` state dict, one saved by ``save_backbone``, or a cltoolbox run's
``checkpoint/state.pt`` (so a ViT trained by one run can be the backbone of the next); the checkpoint's
classifier is dropped and position embeddings are resampled when the grid differs.

The backbone is timm's ``VisionTransformer``; this module adds no layers of its own. ``encode`` runs it with
optional prompt tokens inserted after the [CLS] token (prompt tuning, L2P) and optional key/value prefixes per
block (prefix tuning, DualPrompt and CODA-Prompt), reusing each block's own projections.

Frozen backbones (``frozen: true``) never train, stay in eval mode, and their [CLS] features are cached per
sample for the run (``SampleFeatureCache``): L2P-style queries and linear probes embed each image once.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.models.backbone import BackboneClassifier, as_images, to_backbone_input
from cltoolbox.models.pretrained import IMAGENET_MEAN, IMAGENET_STD
from cltoolbox.registry import register_model

Prefix = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (batch, length, embed_dim)


def _timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ConfigError("model: vit needs timm >= 1.0; pip install 'timm>=1.0'") from e
    return timm


def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix) -> torch.Tensor:
    """timm ``Attention`` with learned key/value prefixes (Li & Liang 2021) prepended per head."""
    b, n, c = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    pk, pv = (p.reshape(b, -1, heads, head_dim).transpose(1, 2) for p in prefix)
    k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _block(blk: nn.Module, x: torch.Tensor, prefix: Prefix | None) -> torch.Tensor:
    if prefix is None:
        return blk(x)
    x = x + blk.drop_path1(blk.ls1(prefix_attention(blk.attn, blk.norm1(x), prefix)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class ViTClassifier(BackboneClassifier):
    """timm ViT backbone ([CLS] pre-logits features) + a linear head over the stream's classes."""

    def __init__(self, backbone: nn.Module, input_shape: tuple[int, ...], n_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...], frozen: bool) -> None:
        super().__init__(backbone, int(backbone.embed_dim), n_classes, frozen)
        self.input_shape = tuple(input_shape)
        self.embed_dim = int(backbone.embed_dim)
        self.depth = len(backbone.blocks)
        self.img_size = tuple(backbone.patch_embed.img_size)
        self.in_chans = int(backbone.patch_embed.proj.in_channels)
        mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        if mean_t.shape[1] != self.in_chans:  # a grey backbone with RGB statistics: their channel average
            mean_t, std_t = mean_t.mean(1, keepdim=True), std_t.mean(1, keepdim=True)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    # -- inputs and tokens ---------------------------------------------------------------------------
    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Stream inputs -> the backbone's input: per-image min-max scaling (undoes any dataset normalisation,
        so datasets are interchangeable), channel match, resize, then mean/std."""
        return to_backbone_input(x, self.input_shape, self.img_size, self.in_chans, self.mean, self.std)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens ([CLS] first, position embeddings added), before the first block."""
        b = self.backbone
        return b.patch_drop(b._pos_embed(b.patch_embed(self.images(x))))

    def encode(self, x: torch.Tensor, prompts: torch.Tensor | None = None,
               prefixes: dict[int, Prefix] | None = None) -> torch.Tensor:
        """Final-norm token sequence. ``prompts`` (batch, length, dim) are inserted after [CLS] (prompt
        tuning); ``prefixes[i]`` are prepended to block ``i``'s keys and values (prefix tuning)."""
        h = self.tokens(x)
        if prompts is not None:
            h = torch.cat((h[:, :1], prompts.to(h.dtype), h[:, 1:]), dim=1)
        return self.run_blocks(h, prefixes)

    def run_blocks(self, h: torch.Tensor, prefixes: dict[int, Prefix] | None = None, start: int = 0,
                   stop: int | None = None) -> torch.Tensor:
        """Any token sequence (batch, tokens, dim) through blocks ``start``..``stop - 1`` (with optional key/value
        ``prefixes`` per block), the pre-norm when starting at block 0 and the final norm when running to the
        last block: for methods that build their own sequence (MULTI-LANE)."""
        b = self.backbone
        stop = self.depth if stop is None else stop
        if start == 0:
            h = b.norm_pre(h)
        prefixes = prefixes or {}
        for i in range(start, stop):
            h = _block(b.blocks[i], h, prefixes.get(i))
        return b.norm(h) if stop == self.depth else h

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """The backbone's own pre-logits pooling of an ``encode`` output ([CLS] for token pooling)."""
        return self.backbone.forward_head(h, pre_logits=True)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.images(x))


def load_weights(backbone: nn.Module, path: str) -> None:
    """Load a local checkpoint into ``backbone`` (classifier dropped, position embeddings resampled)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state.get("learner"), dict):  # a cltoolbox run's checkpoint/state.pt
        state = state["learner"]
    for key in ("state_dict", "model", "backbone"):
        if isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("backbone.").removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in
             backbone.state_dict()}
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != backbone.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        n_prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(pos, list(backbone.patch_embed.grid_size),
                                                    num_prefix_tokens=n_prefix)
    own = backbone.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    if wrong or missing:
        what = (f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model {tuple(own[wrong[0]].shape)}"
                if wrong else f"{len(missing)} tensors are missing, e.g. {missing[0]}")
        raise ConfigError(f"model.weights: {path} does not fit this ViT ({what}); set arch or "
                          "embed_dim/depth/num_heads/patch_size to the checkpoint's")
    backbone.load_state_dict({k: v for k, v in state.items() if k in own})


def save_backbone(model: ViTClassifier, path: str) -> None:
    """Save a ViT's backbone so that ``vit`` with ``weights: path`` (and the same sizes) loads it."""
    tmp = f"{path}.tmp"
    torch.save(model.backbone.state_dict(), tmp)
    os.replace(tmp, path)


@register_model("vit")
def vit(input_shape: tuple[int, ...], n_classes: int, arch: str | None = None, img_size: int | None = None,
        patch_size: int = 4, embed_dim: int = 64, depth: int = 6, num_heads: int = 4, mlp_ratio: float = 2.0,
        pretrained: bool = False, weights: str | None = None, frozen: bool = False,
        normalize: Literal["auto", "minmax", "imagenet"] = "auto", drop_path: float = 0.0) -> ViTClassifier:
    """Vision Transformer from timm: a named arch (hub or local weights) or a small one from its sizes."""
    timm = _timm()
    for field, value in (("patch_size", patch_size), ("embed_dim", embed_dim), ("depth", depth),
                         ("num_heads", num_heads)):
        if value < 1:
            raise ConfigError(f"model.{field}: must be >= 1, got {value}")
    if not mlp_ratio > 0:
        raise ConfigError(f"model.mlp_ratio: must be > 0, got {mlp_ratio}; e.g. `mlp_ratio: 2.0`")
    if not 0 <= drop_path < 1:
        raise ConfigError(f"model.drop_path: must be in [0, 1) (stochastic depth rate), got {drop_path}")
    if weights is not None and not os.path.isfile(weights):
        raise ConfigError(f"model.weights: no file at {weights}; give the path of a saved ViT state dict")
    if pretrained and weights is not None:
        raise ConfigError("model.pretrained: choose either pretrained: true (hub) or weights: path, not both")
    probe = as_images(torch.zeros(1, *input_shape), tuple(input_shape))
    side, channels = img_size or probe.shape[-1], probe.shape[1]
    if arch is None:
        if pretrained:
            raise ConfigError("model.pretrained: hub weights need a named arch, e.g. arch: vit_base_patch16_224")
        if side % patch_size:
            raise ConfigError(f"model.patch_size: {patch_size} does not divide the image side {side}; "
                              "pick a divisor or set img_size")
        if embed_dim % num_heads:
            raise ConfigError(f"model.num_heads: {num_heads} does not divide embed_dim {embed_dim}")
        from timm.models.vision_transformer import VisionTransformer

        backbone = VisionTransformer(img_size=side, patch_size=patch_size, in_chans=channels, num_classes=0,
                                     embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                     drop_path_rate=drop_path)
    else:
        kwargs = {"num_classes": 0, "drop_path_rate": drop_path}
        if img_size:
            kwargs["img_size"] = img_size
        on_meta = torch.empty(0).is_meta  # config validation builds models on the meta device: no download
        try:
            backbone = timm.create_model(arch, pretrained=pretrained and not on_meta, **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ConfigError(f"model.arch: timm has no '{arch}'; see timm.list_models('vit_*')") from None
            raise
        except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
            raise ConfigError(f"model.pretrained: could not fetch {arch}'s weights ({type(e).__name__}); "
                              "download them where you are online and pass weights: path") from None
    if weights is not None and not next(backbone.parameters()).is_meta:
        load_weights(backbone, weights)
    if normalize == "auto":
        normalize = "imagenet" if arch is not None and (pretrained or weights) else "minmax"
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    if normalize == "minmax":  # [0, 1] -> [-1, 1]
        mean, std = (0.5,), (0.5,)
    else:  # the weights' own statistics (timm's config), else ImageNet's
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    return ViTClassifier(backbone, input_shape, n_classes, mean, std, frozen)
