"""Backbone zoo. Every model maps a batch of inputs to logits over all classes of the stream."""

from cltoolbox.models.mlp import mlp
from cltoolbox.models.resnet import reduced_resnet18

__all__ = ["mlp", "reduced_resnet18"]
