"""A backbone plus a linear head, with freezing and the per-sample feature cache shared by pre-trained models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.models.cache import SampleFeatureCache


def as_images(x: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Stream inputs -> (batch, channels, height, width); flat inputs must be square images."""
    if len(input_shape) == 3:
        return x.reshape(-1, *input_shape)
    if len(input_shape) == 2:
        return x.reshape(-1, 1, *input_shape)
    side = math.isqrt(int(input_shape[0]))
    if side * side != input_shape[0]:
        raise ConfigError(f"model: a pre-trained image backbone needs images; inputs of shape {tuple(input_shape)} "
                          "are not square images")
    return x.reshape(-1, 1, side, side)


def to_backbone_input(x: torch.Tensor, input_shape: tuple[int, ...], size: tuple[int, int], channels: int,
                      mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Stream inputs -> a pre-trained backbone's input: per-image min-max scaling (undoes whatever
    normalisation the dataset applied, so datasets are interchangeable), channels matched (grey repeated,
    colour averaged), bilinear resize to ``size``, then the backbone's ``mean``/``std`` (1, C, 1, 1)."""
    x = as_images(x, input_shape).float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-8)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return (x - mean) / std


class BackboneClassifier(nn.Module):
    """``backbone`` -> ``features`` (subclasses define ``_features``) -> ``head`` over the stream's classes.

    A frozen backbone gets no gradients, always runs in eval mode (normalisation statistics and dropout stay
    fixed) and its features are cached per sample (``SampleFeatureCache``) until it is unfrozen or its weights
    are loaded again; the head stays trainable.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, n_classes: int, frozen: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, n_classes)
        self.cache = SampleFeatureCache()
        self.frozen = False
        self.set_frozen(frozen)

    def set_frozen(self, frozen: bool) -> None:
        self.backbone.requires_grad_(not frozen)
        self.backbone.train(self.training and not frozen)
        if frozen != self.frozen:
            self.cache.clear()
        self.frozen = frozen

    def train(self, mode: bool = True) -> BackboneClassifier:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.cache.clear()  # new weights, new features
        super()._load_from_state_dict(*args, **kwargs)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (cached per sample while the backbone is frozen)."""
        if self.frozen:
            with torch.no_grad():
                return self.cache(x, self._features)
        return self._features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
