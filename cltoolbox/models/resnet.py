from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs with a reduced width (nf=20), as in GEM / A-GEM / ER papers.

    CIFAR-style stem (3x3 conv, stride 1, no max-pool); widths nf, 2nf, 4nf, 8nf; global average pool.
    """

    def __init__(self, in_channels: int, n_classes: int, nf: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        stages, cin = [], nf
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = nf * 2**i
            stages += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("resnet18_reduced")
def reduced_resnet18(input_shape: tuple[int, ...], n_classes: int, nf: int = 20) -> ReducedResNet18:
    """Reduced ResNet-18 (Lopez-Paz & Ranzato 2017), CIFAR-style stem; nf=64 gives the full width."""
    if len(input_shape) != 3:
        from cltoolbox.errors import ConfigError

        raise ConfigError(
            f"model.name: resnet18_reduced needs image inputs (C, H, W), the dataset gives {input_shape}; "
            "use model.name: mlp"
        )
    if nf < 1:
        from cltoolbox.errors import ConfigError

        raise ConfigError(f"model.nf: the base width must be >= 1, got {nf}; e.g. `nf: 20` (the default)")
    return ReducedResNet18(input_shape[0], n_classes, nf)
