"""Backbone zoo. Every model maps a batch of inputs to logits over all classes of the stream."""

from cltoolbox.models.lite0_tail import efficientnet_lite0_tail
from cltoolbox.models.mlp import mlp
from cltoolbox.models.pretrained import efficientnet_lite0
from cltoolbox.models.resnet import reduced_resnet18
from cltoolbox.models.vit import vit

__all__ = ["efficientnet_lite0", "efficientnet_lite0_tail", "mlp", "reduced_resnet18", "vit"]
