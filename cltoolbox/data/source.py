"""Data sources: where samples live, and how a batch of them is fetched by index.

A source knows every label without decoding anything (``labels``) and turns a batch of indices into a
model-ready float32 batch (``fetch``). Two kinds cover every dataset:

- :class:`TensorSource`: samples held in memory in their native dtype (uint8 images take a quarter of
  float32's memory), made float and normalised per batch on the device they live on. A float32 tensor with
  no normalisation is returned exactly as stored, so small float sets (MNIST-5k, digits) give the same
  numbers as before the source layer existed.
- :class:`ImageFiles`: a list of image paths, decoded (Pillow, JPEGs at reduced DCT scale when the target
  is smaller), resized and centre-cropped to uint8 by ``DataLoader`` workers with pinned memory and
  prefetching; normalisation runs batched on the training device.

What decides the batches is always the caller's index order (the learner's seeded generator): workers only
decode, deterministically, so results do not depend on the number of workers. Random augmentation runs
batched on the device afterwards (``cltoolbox.augment``), drawn from the learner's generator.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from cltoolbox.errors import DataMissingError


class Source:
    """The contract every data source honours.

    ``labels``: int64 (N,) class ids, known without decoding. ``sample_shape``: the shape of one fetched
    sample (e.g. (3, 224, 224)). ``native_bytes``: bytes one sample occupies at its stored size (what a
    memory that copied it would need). ``key``: a stable name for caches (features keyed by (key, index)).
    """

    key: str
    labels: torch.Tensor
    sample_shape: tuple[int, ...]
    native_bytes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def fetch(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Float32 samples ``index`` (int64, any device), on ``device`` (default: the source's)."""
        raise NotImplementedError

    def batches(self, index_batches: Sequence[torch.Tensor], device: torch.device,
                workers: int = 0) -> Iterator[torch.Tensor]:
        """``fetch`` of each index batch in turn; file-backed sources decode them ahead in worker processes."""
        for idx in index_batches:
            yield self.fetch(idx, device)

    def to(self, device: torch.device | str) -> Source:
        """The source with its storage on ``device`` (file-backed sources stay on disk)."""
        return self

    def black_level(self) -> torch.Tensor:
        """Per channel, the model-ready value of a black pixel (what padding fills in)."""
        raise NotImplementedError

    def file_backed(self) -> bool:
        return False


def _normaliser(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int):
    if mean is None:
        return None
    shape = (1, channels) + (1,) * 2
    return torch.tensor(mean, dtype=torch.float32).view(shape), torch.tensor(std, dtype=torch.float32).view(shape)


class TensorSource(Source):
    """Samples held as one tensor ``x`` (N, ...) in its native dtype, with labels ``y``.

    uint8 samples become float32 in [0, 1] per fetched batch, then ``(x - mean) / std`` per channel when
    ``mean``/``std`` are given, on the device the samples live on. Float samples are returned as stored.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, key: str, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"source {key!r}: {x.shape[0]} samples but {y.shape[0]} labels")
        self.x = x
        self.labels = y.to(torch.int64)
        self.key = key
        self.sample_shape = tuple(x.shape[1:])
        self.native_bytes = x[:1].numel() * x.element_size()
        self.mean, self.std = (None, None) if mean is None else (tuple(mean), tuple(std))
        self._norm = _normaliser(mean, std, x.shape[1] if x.dim() > 1 else 1)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def fetch(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        index = index.to(self.x.device)
        if device is not None and device.type == "cuda" and self.x.is_pinned():
            # host data too large for the GPU (cltoolbox.precision.place_stream): gather into pinned memory, so
            # that the copy to the device is asynchronous
            x = torch.empty((index.numel(), *self.sample_shape), dtype=self.x.dtype, pin_memory=True)
            torch.index_select(self.x, 0, index, out=x)
        else:
            x = self.x.index_select(0, index)
        if device is not None and x.device != device:
            x = x.to(device, non_blocking=True)
        return self.prepare(x)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Stored samples -> model input (float, normalised)."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
            if self._norm is not None:
                mean, std = self._norm
                x = x.sub_(mean.to(x.device)).div_(std.to(x.device))
        return x

    def black_level(self) -> torch.Tensor:
        if self.x.dtype == torch.uint8:
            return self.prepare(torch.zeros((1, self.x.shape[1], 1, 1), dtype=torch.uint8)).flatten()
        return self.x.amin(dim=(0, 2, 3))  # float data: its darkest value per channel

    def to(self, device: torch.device | str) -> TensorSource:
        if self.x.device == torch.device(device):
            return self
        return TensorSource(self.x.to(device), self.labels.to(device), self.key, self.mean, self.std)


class _Decode(torch.utils.data.Dataset):
    """Map-style dataset of one source's files: index -> uint8 (C, H, W) at the source's size."""

    def __init__(self, source: ImageFiles) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.source.decode(int(i))


class ImageFiles(Source):
    """Images on disk (``paths``, one label each), decoded to RGB (or grey, ``channels=1``), resized so the
    shorter side is ``resize`` pixels, then centre-cropped to ``crop`` x ``crop`` (``crop=None``: resize
    to exactly ``resize`` x ``resize``). Normalised by ``mean``/``std`` per channel on the training device.
    """

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, key: str, resize: int, crop: int | None = None,
                 channels: int = 3, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if len(paths) != int(labels.shape[0]):
            raise ValueError(f"source {key!r}: {len(paths)} files but {labels.shape[0]} labels")
        self.paths = list(paths)
        self.labels = labels.to(torch.int64)
        self.key = key
        self.resize, self.crop, self.channels = resize, crop, channels
        side = crop if crop is not None else resize
        self.sample_shape = (channels, side, side)
        self.native_bytes = channels * side * side
        self._stats = TensorSource(torch.zeros((0, channels, 1, 1), dtype=torch.uint8), torch.zeros(0), key,
                                   mean, std)

    def file_backed(self) -> bool:
        return True

    def black_level(self) -> torch.Tensor:
        return self._stats.prepare(torch.zeros((1, self.channels, 1, 1), dtype=torch.uint8)).flatten()

    def decode(self, i: int) -> torch.Tensor:
        """One image as uint8 (C, H, W) at the source's size; a bad file is a one-line DataMissingError."""
        from PIL import Image

        path = self.paths[i]
        mode = "RGB" if self.channels == 3 else "L"
        try:
            with Image.open(path) as img:
                # JPEGs decode at the smallest DCT scale that still covers the target size (never below it)
                img.draft(mode, (self.resize, self.resize))
                img = img.convert(mode)
                w, h = img.size
                if self.crop is None:
                    size = (self.resize, self.resize)
                else:  # shorter side to `resize`, then the centre `crop` x `crop`
                    scale = self.resize / min(w, h)
                    size = (max(self.crop, round(w * scale)), max(self.crop, round(h * scale)))
                if img.size != size:
                    img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
                if self.crop is not None:
                    left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
                    img = img.crop((left, top, left + self.crop, top + self.crop))
                arr = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataMissingError(f"image {path!r} is missing or unreadable ({type(err).__name__}); "
                                   "restore the file or remove it from the dataset") from err
        x = torch.from_numpy(arr.copy())
        return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()

    def fetch(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        x = torch.stack([self.decode(i) for i in index.tolist()]) if index.numel() else \
            torch.zeros((0, *self.sample_shape), dtype=torch.uint8)
        return self._stats.prepare(x.to(device or "cpu"))

    def batches(self, index_batches: Sequence[torch.Tensor], device: torch.device,
                workers: int = 0) -> Iterator[torch.Tensor]:
        if workers == 0:
            yield from super().batches(index_batches, device)
            return
        loader = torch.utils.data.DataLoader(
            _Decode(self), batch_sampler=[b.tolist() for b in index_batches], num_workers=workers,
            pin_memory=device.type == "cuda", prefetch_factor=4, persistent_workers=False,
        )
        try:
            for x in loader:
                yield self._stats.prepare(x.to(device, non_blocking=True))
        except DataMissingError as err:  # a worker re-raises it with its whole traceback as the message
            raise DataMissingError(_worker_message(str(err))) from None


def _worker_message(text: str) -> str:
    """The original one-line message of an error re-raised from a DataLoader worker (its traceback's last line,
    without the ``module.ClassName: `` prefix)."""
    last = next((line for line in reversed(text.splitlines()) if line.strip()), text)
    head, sep, rest = last.partition(": ")
    return rest if sep and "Error" in head else last


def check_files(paths: Sequence[str], dataset: str, expected: str) -> None:
    """One-line error naming the expected layout when a file listed by an index is absent."""
    for p in paths:
        if not os.path.isfile(p):
            raise DataMissingError(f"dataset {dataset!r}: file {p!r} not found (expected {expected}); "
                                   "set scenario.root to the folder that holds the dataset")
