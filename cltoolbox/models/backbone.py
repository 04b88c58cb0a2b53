"""A backbone plus a linear head, with freezing and the per-sample feature cache shared by pre-trained models."""

from __future__ import annotations

import torch
from torch import nn

from cltoolbox.models.cache import SampleFeatureCache


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
