"""Per-sample cache of a frozen extractor's features.

A frozen backbone maps the same sample to the same feature vector for the whole run, so every sample is
embedded once: training batches (any order, any mix with replayed samples) and evaluation batches look their
rows up by content. Rows are keyed by two independent 64-bit fingerprints of their exact bytes (integer
arithmetic, so a sample always gets the same key; a false hit needs both to collide, ~2^-128). Lookups are
vectorised (``searchsorted``), so a batch costs a few tensor ops, never a Python loop over samples. Keys
and features live on the CPU: a lookup copies the batch there and the features back (on a GPU, one host
round trip per batch, small next to a frozen ViT's forward pass).

When the loop knows which stream samples a batch holds (``sample_keys``: training batches of the stream,
evaluation passes, replayed memory samples), rows are keyed by (stream, sample key) instead, so a file-backed
image is never hashed: it is embedded once per run, and its later batches cost a lookup.

Call ``clear`` whenever the extractor's weights change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

_MIX = 2**31 - 1
_bypass = [False]
_keys: list = [None]  # the stream keys of the batch being forwarded, and its stream's token


class sample_keys:  # noqa: N801 (a context manager used like a function; a class is ~5x cheaper than contextlib's)
    """Within the block, the cache keys rows of batches of ``len(keys)`` rows by (``stream``, key)."""

    __slots__ = ("before", "value")

    def __init__(self, keys: torch.Tensor | None, stream: object | None) -> None:
        self.value = None if keys is None or stream is None else (keys, _stream_token(stream))

    def __enter__(self) -> None:
        self.before, _keys[0] = _keys[0], self.value

    def __exit__(self, *exc: object) -> None:
        _keys[0] = self.before


def _stream_token(stream: object) -> int:
    token = getattr(stream, "_cache_token", None)
    if token is None:
        token = int(torch.randint(1, 2**62, (1,), generator=torch.Generator().manual_seed(id(stream))))
        stream._cache_token = token
    return token


@contextlib.contextmanager
def uncached() -> Iterator[None]:
    """Features computed without the cache: for inputs seen once (augmented training batches), which would only
    fill it."""
    before, _bypass[0] = _bypass[0], True
    try:
        yield
    finally:
        _bypass[0] = before


def _weights(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, _MIX, (n,), generator=g, dtype=torch.int64) * 2 + 1  # odd: no bit is lost


def _as_ints(x: torch.Tensor) -> torch.Tensor:
    """The exact bit pattern of each row as int64 values (one per 4 bytes, zero-padded)."""
    flat = x.detach().reshape(x.shape[0], -1).contiguous()
    raw = flat.view(torch.uint8)
    pad = (-raw.shape[1]) % 4
    if pad:
        raw = torch.nn.functional.pad(raw, (0, pad))
    return raw.view(torch.int32).to(torch.int64)


class SampleFeatureCache:
    """Features of a fixed extractor, one row per distinct input sample (at most ``max_items`` rows)."""

    def __init__(self, max_items: int = 500_000, _autocast: bool = False) -> None:
        self.max_items = max_items
        self._w: tuple[torch.Tensor, torch.Tensor] | None = None
        # features computed under autocast (train.precision bf16 / 16-mixed) are kept apart: a strategy's
        # float32/float64 statistics (prototypes, LDA, ridge heads) must never read rounded ones
        self._low: SampleFeatureCache | None = None if _autocast else SampleFeatureCache(max_items, _autocast=True)
        self.clear()

    def clear(self) -> None:
        if getattr(self, "_low", None) is not None:
            self._low.clear()
        self._keys = torch.empty(0, dtype=torch.int64)  # sorted
        self._checks = torch.empty(0, dtype=torch.int64)  # aligned with _keys
        self._slots = torch.empty(0, dtype=torch.int64)  # aligned with _keys: row in _feats
        self._feats: torch.Tensor | None = None
        self.hits = self.misses = 0

    def __deepcopy__(self, memo: dict) -> SampleFeatureCache:
        return SampleFeatureCache(self.max_items)  # a copied model (an ensemble member) recomputes its own

    def __len__(self) -> int:
        return int(self._keys.numel())

    def _fingerprints(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ints = _as_ints(x.cpu())
        if self._w is None or self._w[0].numel() != ints.shape[1]:
            self._w = (_weights(ints.shape[1], 1), _weights(ints.shape[1], 2))
        # int64 products and sums wrap modulo 2^64: exact, order-independent integer hashes
        return (ints * self._w[0]).sum(1), (ints * self._w[1]).sum(1)

    def __call__(self, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Features of ``x``: cached rows are looked up, the others computed with ``compute`` and stored."""
        if x.shape[0] == 0 or _bypass[0]:
            return compute(x)
        if self._low is not None and torch.is_autocast_enabled(x.device.type):
            return self._low(x, compute)
        given = _keys[0]
        if given is not None and given[0].shape[0] == x.shape[0]:  # stream samples: (stream, key)
            keys = given[0].detach().cpu()
            checks = keys ^ given[1]
        else:
            keys, checks = self._fingerprints(x)
        pos = torch.searchsorted(self._keys, keys).clamp_max(max(len(self) - 1, 0))
        hit = torch.zeros_like(keys, dtype=torch.bool)
        if len(self):
            hit = (self._keys[pos] == keys) & (self._checks[pos] == checks)
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += x.shape[0] - n_hit
        if n_hit == x.shape[0]:
            return self._feats[self._slots[pos]].to(x.device)
        miss = (~hit).nonzero().squeeze(1)
        new = compute(x[miss.to(x.device)]).detach()
        out = torch.empty((x.shape[0], *new.shape[1:]), dtype=new.dtype, device=new.device)
        out[miss.to(new.device)] = new
        if n_hit:
            h = hit.nonzero().squeeze(1)
            out[h.to(new.device)] = self._feats[self._slots[pos[h]]].to(new.device)
        with torch.inference_mode(False):  # a normal tensor, usable by autograd later (queries, probes)
            stored = new.cpu().clone()
        self._insert(keys[miss], checks[miss], stored)
        return out

    def _insert(self, keys: torch.Tensor, checks: torch.Tensor, feats: torch.Tensor) -> None:
        keys, first = _unique_first(keys)  # a batch may hold the same sample twice (replay)
        checks, feats = checks[first], feats[first]
        if len(self) + keys.numel() > self.max_items:
            self.clear()  # simplest bounded policy: start over (a frozen run rarely exceeds the bound)
        start = 0 if self._feats is None else self._feats.shape[0]
        self._feats = feats if self._feats is None else torch.cat((self._feats, feats))
        slots = torch.arange(start, start + keys.numel())
        all_keys = torch.cat((self._keys, keys))
        order = torch.argsort(all_keys, stable=True)
        self._keys = all_keys[order]
        self._checks = torch.cat((self._checks, checks))[order]
        self._slots = torch.cat((self._slots, slots))[order]


def _unique_first(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct keys and, for each, the index of its first occurrence."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((uniq.numel(),), keys.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(keys.numel()), reduce="amin")
    return uniq, first
