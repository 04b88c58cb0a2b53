"""Device, precision and speed settings of training (``train.device``, ``precision``, ``channels_last``,
``compile``, ``deterministic``).

- ``precision: 32`` trains in float32. ``bf16`` runs the training forward and losses under
  ``torch.autocast(dtype=bfloat16)`` (CPU and CUDA); bfloat16 keeps float32's exponent range, so no loss
  scaling is needed. ``16-mixed`` autocasts to float16 and scales the loss with a ``torch.amp.GradScaler``
  (Micikevicius et al. 2018, "Mixed Precision Training"); CUDA only. Parameters, optimizer state, memories
  and everything a strategy computes outside the training forward (Fisher, GEM's QP, closed-form heads,
  prototypes) stay float32 or float64: autocast is entered around the forward and loss hooks only, and
  ``full_precision()`` turns it off for any part of a hook that must not be rounded.
- Data: a stream's in-memory sources (uint8 images stay uint8) move to the GPU when they take at most half its
  free memory (``place_stream``); otherwise they stay in pinned host memory and each batch is gathered there
  and copied with ``non_blocking=True``.
- ``channels_last`` stores convolutional models' weights and inputs NHWC (faster convolutions on tensor
  cores); ``compile`` wraps the training forward in ``torch.compile``; ``deterministic`` turns on
  ``torch.use_deterministic_algorithms`` with cuDNN's and cuBLAS's deterministic settings.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cltoolbox.errors import ConfigError

PRECISIONS = (32, "bf16", "16-mixed")
_CUDA_RE = re.compile(r"^cuda(:\d+)?$")


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; a one-line error when it is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not isinstance(name, str) or not _CUDA_RE.match(name):
        raise ConfigError(f"{field}: {name!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:0)")
    if not torch.cuda.is_available():
        raise ConfigError(f"{field}: {name!r} requested but no CUDA device is available; use 'auto' or 'cpu'")
    index = int(name.split(":")[1]) if ":" in name else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{field}: {name!r} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device(name)


def check_settings(train: dict[str, Any], field: str = "train") -> None:
    """The precision/compile settings this machine can run (called at config validation, before training)."""
    device = resolve_device(train["device"], f"{field}.device")
    if train["precision"] == "16-mixed" and device.type != "cuda":
        raise ConfigError(f"{field}.precision: '16-mixed' (float16 with loss scaling) needs a CUDA device; "
                          "on CPU use bf16 or 32")
    if train["compile"] and device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc")
                                                          or shutil.which("g++")):
        raise ConfigError(f"{field}.compile: torch.compile on CPU needs a C/C++ compiler (cc, gcc) on PATH; "
                          "install one or set compile: false")


DEVICE_DATA_SHARE = 0.5  # in-memory data go to the GPU when they take at most this share of its free memory


def host_bytes(stream) -> int:
    """Bytes of the stream's in-memory sources that are not on a GPU yet (each source counted once)."""
    sources = {id(s.source): s.source for e in [*stream.experiences, *(stream.test_experiences or [])]
               for s in (e.train, e.test)}
    return sum(s.x.numel() * s.x.element_size() for s in sources.values()
               if isinstance(getattr(s, "x", None), torch.Tensor) and s.x.device.type == "cpu")


def data_fits(n_bytes: int, free_bytes: int) -> bool:
    return n_bytes <= DEVICE_DATA_SHARE * free_bytes


def place_stream(stream, device: torch.device, free_bytes: int | None = None):
    """``stream`` ready for training on ``device``: its data on the GPU when they fit (``data_fits``), else in
    pinned host memory with indices and labels on the GPU (batches then copy asynchronously)."""
    if device.type != "cuda":
        return stream.to(device)
    need = host_bytes(stream)
    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    if data_fits(need, free):
        return stream.to(device)
    for e in [*stream.experiences, *(stream.test_experiences or [])]:
        for part in (e.train, e.test):
            x = getattr(part.source, "x", None)
            if isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.is_pinned():
                part.source.x = x.pin_memory()  # same values, page-locked: shared with the dataset, harmless
    return stream.to(device, move_sources=False)


def autocast_dtype(precision: Any) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


class Precision:
    """The training step's precision: ``autocast()`` around forward and losses, ``backward``/``step`` with a
    GradScaler for float16 (its state goes into checkpoints so a resumed run scales as the original did)."""

    def __init__(self, precision: Any, device: torch.device) -> None:
        self.precision = precision
        self.device_type = device.type
        self.dtype = autocast_dtype(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    # backward / unscale / step: the loop's step with a scaler (16-mixed); without one it calls
    # loss.backward() and its own optimizer step directly

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """True gradients before after_backward hooks (GEM, SI, clipping) look at them."""
        self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        """The scaler's optimizer step: skipped when a gradient overflowed."""
        self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


@contextlib.contextmanager
def full_precision(device_type: str | None = None) -> Iterator[None]:
    """Autocast off inside (float32/float64 maths of a strategy: QP, closed forms, statistics)."""
    types = [device_type] if device_type else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with contextlib.ExitStack() as stack:
        for t in types:
            stack.enter_context(torch.autocast(t, enabled=False))
        yield


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.Conv3d)) for m in model.modules())


def apply_channels_last(model: nn.Module) -> nn.Module:
    if not has_conv(model):
        raise ConfigError("train.channels_last: the model has no convolutions (channels_last only changes conv "
                          "models' memory layout); set channels_last: false")
    return model.to(memory_format=torch.channels_last)


def set_deterministic(on: bool) -> None:
    """cuDNN/cuBLAS deterministic kernels and ``torch.use_deterministic_algorithms`` (an op without a
    deterministic version then raises instead of silently varying). cuBLAS reads CUBLAS_WORKSPACE_CONFIG
    when it starts, so it is set before the first CUDA matmul."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=False)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False if on else torch.backends.cudnn.benchmark
