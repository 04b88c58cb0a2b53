"""Standard image benchmarks (MNIST family, CIFAR, SVHN) held in memory as uint8 (``Dataset`` over ``TensorSource``).

Files use torchvision's on-disk layout under ``root``; ``root=None`` means ``DEFAULT_ROOT``
(``~/.cache/cltoolbox/data``). Nothing is downloaded unless ``download=True``.

Images come from the dataset's stored uint8 arrays (``.data``), never per-sample ``__getitem__``,
which would build a PIL image per sample and is orders of magnitude slower.

MD5 policy: torchvision's CIFAR and SVHN classes refuse to load unless each file matches the md5
of the official release, so with ``download=False`` those two are read by the small readers
below (same pickle / .mat format, presence check only). That keeps local copies usable without
hashing ~200 MB on every load, and lets tests use tiny files in the real format. With
``download=True`` torchvision's classes are used as-is: they fetch, verify md5 and parse.
The MNIST family has no md5 check on the raw files, so torchvision reads those directly.

Safety: a pickle can run code while it loads, and files under ``root`` are not trusted, so the CIFAR
batches are read by :class:`CifarUnpickler`, which builds only what the format holds (dicts, lists, strings,
numbers and numpy uint8 arrays) and refuses any other global. (With ``download=True`` torchvision unpickles
only files whose md5 matches the official release.) MNIST's legacy ``processed/*.pt`` files are read by
torchvision with ``torch.load(weights_only=True)``, SVHN's .mat files by scipy, which runs no code.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
from typing import Any

import numpy as np
import torch

from cltoolbox.data.base import Dataset
from cltoolbox.errors import ConfigError, DataMissingError

DEFAULT_ROOT = "~/.cache/cltoolbox/data"

TORCHVISION_DATASETS: dict[str, str] = {
    "mnist": "MNIST 60k/10k 28x28 grey digits, 10 classes, torchvision, local root",
    "fashion_mnist": "Fashion-MNIST 60k/10k 28x28 grey clothing, 10 classes, torchvision, local root",
    "kmnist": "Kuzushiji-MNIST 60k/10k 28x28 grey cursive Japanese, 10 classes, torchvision, local root",
    "cifar10": "CIFAR-10 50k/10k 32x32 RGB, 10 classes, torchvision, local root",
    "cifar100": "CIFAR-100 50k/10k 32x32 RGB, 100 fine classes, torchvision, local root",
    "svhn": "SVHN 73k/26k 32x32 RGB house-number digits (no 'extra'), 10 classes, torchvision, local root",
}

# Standard per-channel mean/std of each training set (on [0, 1] pixels).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "kmnist": ((0.1918,), (0.3483,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

_MNIST_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# name -> (torchvision class, folder under root, train files, test files, label key)
_CIFAR = {
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
    ),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train"], ["test"], "fine_labels"),
}
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def load_torchvision(name: str, root: str | None, download: bool = False) -> Dataset:
    """Load a whole torchvision benchmark as normalised float32 NCHW tensors and int64 labels.

    ``root`` is the folder holding torchvision's layout (e.g. ``<root>/MNIST/raw``,
    ``<root>/cifar-10-batches-py``, ``<root>/train_32x32.mat``); ``None`` means ``DEFAULT_ROOT``.
    Raises ``DataMissingError`` (one line, naming root and fix) when files are absent or a
    download fails, and ``ConfigError`` for an unknown name.
    """
    if name not in TORCHVISION_DATASETS:
        raise ConfigError(
            f"unknown torchvision dataset {name!r}; choose one of {', '.join(TORCHVISION_DATASETS)}"
        )
    root = os.path.abspath(os.path.expanduser(root if root is not None else DEFAULT_ROOT))

    if name in _MNIST_CLASS:
        (x_tr, y_tr), (x_te, y_te) = _load_mnist_family(name, root, download)
        x_tr, x_te = x_tr.unsqueeze(1), x_te.unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
        n_classes = 10
    elif name in _CIFAR:
        (x_tr, y_tr), (x_te, y_te) = _load_cifar(name, root, download)  # already NCHW
        n_classes = 10 if name == "cifar10" else 100
    else:
        (x_tr, y_tr), (x_te, y_te) = _load_svhn(root, download)  # already NCHW
        n_classes = 10

    mean, std = _STATS[name]
    # stored as uint8 (a quarter of float32's memory); scaled and normalised per fetched batch on the device
    return Dataset.from_tensors(name, x_tr, y_tr.to(torch.int64), x_te, y_te.to(torch.int64), n_classes, mean, std)


def _missing(name: str, root: str, example: str) -> DataMissingError:
    return DataMissingError(
        f"dataset {name!r}: files not found under root {root!r} (expected torchvision's layout, e.g. {example}); "
        "set scenario.root to the folder that holds them, or set scenario.download: true to fetch them"
    )


def _unreadable(name: str, root: str, path: str, err: BaseException) -> DataMissingError:
    return DataMissingError(
        f"dataset {name!r}: file {path!r} under root {root!r} is unreadable ({_first_line(err)}); "
        "replace it with the original file, or delete it and set scenario.download: true to fetch it again"
    )


def _download_failed(name: str, root: str, err: BaseException) -> DataMissingError:
    return DataMissingError(
        f"dataset {name!r}: download into root {root!r} failed ({_first_line(err)}); "
        "check network access, or place the files there yourself and set scenario.download: false"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _via_torchvision(
    name: str, root: str, download: bool, missing_example: str, cls: Any, **kwargs: Any
) -> Any:
    """Build a torchvision dataset, turning its not-found / network errors into one-line errors."""
    try:
        return cls(root, download=download, **kwargs)
    except (RuntimeError, OSError) as err:  # "Dataset not found" is a RuntimeError, URLError an OSError
        if download:
            raise _download_failed(name, root, err) from err
        raise _missing(name, root, missing_example) from err


def _load_mnist_family(name: str, root: str, download: bool):
    from torchvision import datasets  # slow import: only when a torchvision set is used

    raw = os.path.join(root, _MNIST_CLASS[name], "raw")
    # Name the first absent raw file in the message (torchvision's own error does not say which).
    absent = [os.path.join(raw, f) for f in _MNIST_FILES if not os.path.isfile(os.path.join(raw, f))]
    example = absent[0] if absent else raw
    cls = getattr(datasets, _MNIST_CLASS[name])
    out = []
    for train in (True, False):
        ds = _via_torchvision(name, root, download, example, cls, train=train)
        out.append((ds.data, torch.as_tensor(ds.targets)))
    return out


def _load_cifar(name: str, root: str, download: bool):
    cls_name, folder, train_files, test_files, label_key = _CIFAR[name]
    base = os.path.join(root, folder)
    if download:
        from torchvision import datasets

        cls = getattr(datasets, cls_name)
        out = []
        for train in (True, False):
            ds = _via_torchvision(name, root, True, base, cls, train=train)
            out.append((torch.from_numpy(np.ascontiguousarray(ds.data)), torch.as_tensor(ds.targets)))
        return out

    for fname in train_files + test_files:
        if not os.path.isfile(os.path.join(base, fname)):
            raise _missing(name, root, os.path.join(base, fname))
    return [_read_cifar_batches(name, root, base, files, label_key) for files in (train_files, test_files)]


def _read_cifar_batches(name: str, root: str, base: str, files: list[str], label_key: str):
    """Read CIFAR python pickles exactly as torchvision does: dict with 'data' (N, 3072) uint8 rows
    in CHW order and a label list; returns them as one (N, 3, 32, 32) tensor, read in place (torchvision's
    ``.data`` is HWC; its ToTensor turns each image back to CHW, so the values per pixel are the same)."""
    data, labels = [], []
    for fname in files:
        path = os.path.join(base, fname)
        try:
            with open(path, "rb") as f:
                entry = CifarUnpickler(f).load()
            rows = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            file_labels = [int(c) for c in entry[label_key]]
            if len(file_labels) != rows.shape[0]:
                raise ValueError(f"{rows.shape[0]} images but {len(file_labels)} labels")
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
            raise _unreadable(name, root, path, err) from err
        data.append(rows)
        labels.extend(file_labels)
    x = data[0] if len(data) == 1 else np.concatenate(data)  # CIFAR-100 has one training file: no second copy
    return torch.from_numpy(x), torch.as_tensor(labels, dtype=torch.int64)


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """What a protocol-2 pickle written by Python 3 calls to rebuild ``bytes`` (``_codecs.encode(s, 'latin1')``)."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r} are not allowed in a CIFAR batch file")
    return text.encode("latin1")


@functools.cache
def _cifar_globals() -> dict[tuple[str, str], Any]:
    """The globals a CIFAR batch may name: numpy's array and dtype rebuilders (numpy 1 and numpy 2 module
    names; ``_reconstruct`` for protocols 0-4, ``_frombuffer`` for 5) and the bytes rebuilder."""
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer

    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                       ("_codecs", "encode"): _latin1_bytes}
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        out[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    return out


class CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR python batch without running code: the only globals it resolves are those of
    :func:`_cifar_globals`; any other, e.g. ``os.system`` in a crafted ``__reduce__``, is an
    ``UnpicklingError`` before anything is called. Python 2 strings are decoded as latin-1, as torchvision
    does for the official files (their pixel arrays are Python 2 strings)."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        found = _cifar_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch file")
        return found


def _load_svhn(root: str, download: bool):
    if download:
        from torchvision import datasets

        out = []
        for split, fname in _SVHN_FILES.items():
            ds = _via_torchvision("svhn", root, True, os.path.join(root, fname), datasets.SVHN, split=split)
            out.append((torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels)))
        return out

    import scipy.io

    for fname in _SVHN_FILES.values():
        if not os.path.isfile(os.path.join(root, fname)):
            raise _missing("svhn", root, os.path.join(root, fname))
    out = []
    for fname in _SVHN_FILES.values():
        path = os.path.join(root, fname)
        try:
            mat = scipy.io.loadmat(path)
            x = np.asarray(mat["X"], dtype=np.uint8)  # (32, 32, 3, N) = H, W, C, N
            y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _unreadable("svhn", root, path, err) from err
        if x.ndim != 4 or x.shape[3] != y.shape[0]:
            raise _unreadable(
                "svhn", root, path, ValueError(f"X shape {x.shape} does not match y length {len(y)}")
            )
        y[y == 10] = 0  # SVHN stores digit 0 as label 10 (torchvision remaps the same way)
        out.append((torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), torch.from_numpy(y)))
    return out
