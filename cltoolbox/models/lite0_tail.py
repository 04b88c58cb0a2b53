"""EfficientNet-Lite0 with a trainable tail: the last MBConv block(s) and the 1x1 conv head are fine-tuned, the
rest stays frozen at its ImageNet weights.

Why: model merging (strategies/merging.py) needs an encoder part to fine-tune and merge, as the papers
fine-tune CLIP encoders; the whole encoder is out of reach on a CPU. The last ``tail_blocks`` MBConv blocks of
EfficientNet-Lite0 (1 to 4: ``blocks[6][0]``, then ``blocks[5][3..1]``; all take a 192-channel map at 1/32 of
the input size) plus ``conv_head`` (320 -> 1280, 1x1) and its BatchNorm are trainable; everything before them
(stem and earlier blocks) is frozen and its output map is cached per sample (``SampleFeatureCache``), so every
image goes through the frozen part once. Every BatchNorm runs in eval mode (ImageNet running statistics,
never updated; a few hundred digits a task would make them drift); its affine weight and bias are trainable.
``features(x)`` is the pooled 1280-d vector, ``head`` a linear layer over the stream's classes.

``efficientnet_lite0_tail`` takes images (any normalisation, like ``efficientnet_lite0``); ``TailClassifier``
with ``front=None`` takes the cached 192-channel maps directly (experiments/merging_check.py does that).
"""

from __future__ import annotations

import torch
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.models.cache import SampleFeatureCache
from cltoolbox.models.pretrained import FEATURE_DIM, efficientnet_lite0_imagenet, to_imagenet_input
from cltoolbox.registry import register_model

MAX_TAIL_BLOCKS = 4  # the blocks after blocks[5][0] all take 192 x (size/32)^2 maps


def split_lite0(net: nn.Module, tail_blocks: int) -> tuple[nn.Module, nn.Module]:
    """(frozen front: stem and blocks before the tail, trainable tail: last ``tail_blocks`` blocks, conv head,
    its BatchNorm and the global pool) of a timm ``efficientnet_lite0``."""
    if not 1 <= tail_blocks <= MAX_TAIL_BLOCKS:
        raise ConfigError(f"model.tail_blocks: {tail_blocks} is out of range; use 1 to {MAX_TAIL_BLOCKS}")
    blocks = [b for stage in net.blocks for b in stage]
    front = nn.Sequential(net.conv_stem, net.bn1, *blocks[:-tail_blocks])
    tail = nn.Sequential(*blocks[-tail_blocks:], net.conv_head, net.bn2, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return front, tail


class TailClassifier(nn.Module):
    """frozen ``front`` (cached per sample; None: inputs are already its output maps) -> trainable ``tail``
    (BatchNorm in eval mode) -> 1280-d ``features`` -> linear ``head``."""

    def __init__(self, front: nn.Module | None, tail: nn.Module, n_classes: int,
                 input_shape: tuple[int, ...], resize: int) -> None:
        super().__init__()
        self.front = front
        self.tail = tail
        self.head = nn.Linear(FEATURE_DIM, n_classes)
        self.input_shape, self.resize = tuple(input_shape), resize
        self.cache = SampleFeatureCache()
        if front is not None:
            front.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> TailClassifier:
        super().train(mode)
        for m in self.modules():  # running statistics stay ImageNet's, in training too
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        if self.front is not None:
            self.front.eval()
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen front's 192-channel maps of ``x`` (cached per sample)."""
        if self.front is None:
            return x
        with torch.no_grad():
            return self.cache(x, lambda b: self.front(to_imagenet_input(b, self.input_shape, self.resize)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.maps(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("efficientnet_lite0_tail")
def efficientnet_lite0_tail(input_shape: tuple[int, ...], n_classes: int, pretrained: bool = True,
                            tail_blocks: int = 1, resize: int = 96) -> TailClassifier:
    """EfficientNet-Lite0 (ImageNet weights, offline), frozen but for its last ``tail_blocks`` MBConv blocks and
    1x1 conv head (BatchNorm statistics fixed); linear head over the stream's classes."""
    if resize < 32:
        raise ConfigError(f"model.resize: {resize} is too small for EfficientNet's 32x downsampling; use >= 32")
    front, tail = split_lite0(efficientnet_lite0_imagenet(pretrained), tail_blocks)
    return TailClassifier(front, tail, n_classes, input_shape, resize)
