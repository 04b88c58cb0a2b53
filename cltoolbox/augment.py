"""Training-time image augmentation, batched on the training device (``train.augment_crop``, ``augment_hflip``).

The standard CIFAR recipe of the replay literature (Rebuffi et al. 2017; Buzzega et al. 2020 and Mammoth's
seq-cifar10/100: ``RandomCrop(32, padding=4)`` then ``RandomHorizontalFlip()``), applied per sample to whole
tensor batches instead of per image in DataLoader workers. The learner augments every training forward (the
batch, replayed memory samples, memory gradients); evaluation, stored memories and the data never are.
"""

from __future__ import annotations

import torch

from cltoolbox.data.source import Source
from cltoolbox.errors import ConfigError


class BatchAugment:
    """Random crop after zero-pixel padding, then a random horizontal flip, per sample of an (N, C, H, W) batch.

    ``fill`` is the padding value per channel: the data's normalised value of a black pixel (each channel's
    minimum over the training data), as torchvision pads the image before normalising it.
    """

    def __init__(self, crop_padding: int, hflip: bool, fill: torch.Tensor) -> None:
        self.pad = crop_padding
        self.hflip = hflip
        self.fill = fill

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.pad:
            p = self.pad
            padded = self.fill.to(x).view(1, c, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p : p + h, p : p + w] = x
            # draws on the learner's CPU generator: the same samples whatever the device
            oy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            rows = oy[:, None] + torch.arange(h, device=x.device)
            cols = ox[:, None] + torch.arange(w, device=x.device)
            sample = torch.arange(n, device=x.device)[:, None, None]
            x = padded[sample, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
        if self.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        return x


def check_augment(train: dict, input_shape: tuple[int, ...], field: str) -> None:
    """``train.augment_*`` need image inputs; crops need padding smaller than the image."""
    pad, hflip = train.get("augment_crop", 0), train.get("augment_hflip", False)
    if (pad or hflip) and len(input_shape) != 3:
        key = "augment_crop" if pad else "augment_hflip"
        raise ConfigError(f"{field}.{key}: needs image inputs (channels, height, width), the dataset's inputs "
                          f"are {tuple(input_shape)}; remove it")
    if pad and pad >= min(input_shape[1:]):
        raise ConfigError(f"{field}.augment_crop: padding {pad} is not smaller than the {input_shape[1]}x"
                          f"{input_shape[2]} images; use e.g. 4 for 32x32")


def make_augment(crop_padding: int, hflip: bool, sources: list[Source]) -> BatchAugment | None:
    """The learner's augmentation for a stream's training sources, or None when both are off."""
    if not crop_padding and not hflip:
        return None
    fill = torch.stack([s.black_level().cpu() for s in sources]).amin(0)
    return BatchAugment(crop_padding, hflip, fill)
