"""``TrainConfig``: the ``train:`` section of a config, read by the loop (its fields are the section's keys,
checked by cltoolbox.config through cltoolbox.params)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainConfig:
    """Training hyperparameters (the ``train:`` section of a config)."""

    epochs: int = 1
    batch_size: int = 10
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    scheduler: Literal["none", "cosine", "multistep"] = "none"
    milestones: list[int] = field(default_factory=list)  # epochs, for scheduler: multistep
    gamma: float = 0.1
    eval_batch_size: int = 1024
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    augment_crop: int = 0  # random crop after padding by this many pixels (0 = off); CIFAR recipe: 4
    augment_hflip: bool = False  # random horizontal flip
    workers: int | None = None  # DataLoader processes decoding file-backed data (None: up to 4 if file-backed)
    precision: Literal[32, "bf16", "16-mixed"] = 32  # autocast of the training forward (cltoolbox.precision)
    channels_last: bool = False  # NHWC weights and inputs for convolutional models
    compile: bool = False  # torch.compile the training forward
    deterministic: bool = False  # deterministic cuDNN/cuBLAS kernels and torch.use_deterministic_algorithms
    time_to_target: dict | None = None  # {target: 0.9, every: 50}: cost to reach it per experience (time_to_target.py)
