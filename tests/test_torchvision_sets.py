"""load_torchvision on tiny files written in each dataset's real on-disk format (no downloads)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch

from cltoolbox.data.torchvision_sets import TORCHVISION_DATASETS, load_torchvision
from cltoolbox.errors import ConfigError, DataMissingError

N_TRAIN, N_TEST = 20, 8


def _write_idx(path: Path, arr: np.ndarray) -> None:
    # IDX format: magic 0x00 0x00 <type 0x08 = uint8> <ndim>, then big-endian int32 dims, then raw bytes.
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def _make_mnist_family(root: Path, class_name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    raw = root / class_name / "raw"  # uncompressed files: torchvision reads raw/, not the .gz archives
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, N_TRAIN),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, N_TEST),
    }
    arrays["train-images-idx3-ubyte"][0, 3, 5] = 255  # a known pixel to check normalisation/orientation
    arrays["train-images-idx3-ubyte"][0, 5, 3] = 0
    for fname, arr in arrays.items():
        _write_idx(raw / fname, arr)
    return arrays


def _cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    # One row per image: 3072 uint8 = 1024 R, 1024 G, 1024 B, each plane row-major 32x32.
    return rng.integers(0, 256, (n, 3072)).astype(np.uint8)


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _make_cifar10(root: Path, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    base = root / "cifar-10-batches-py"
    all_rows, all_labels = [], []
    for i in range(1, 6):
        rows, labels = _cifar_rows(rng, 4), rng.integers(0, 10, 4).tolist()
        _pickle(
            base / f"data_batch_{i}",
            {
                "batch_label": f"batch {i}",
                "labels": labels,
                "data": rows,
                "filenames": [f"img{j}.png" for j in range(4)],
            },
        )
        all_rows.append(rows)
        all_labels += labels
    test_rows = _cifar_rows(rng, N_TEST)
    _pickle(
        base / "test_batch",
        {
            "batch_label": "test",
            "labels": rng.integers(0, 10, N_TEST).tolist(),
            "data": test_rows,
            "filenames": ["t.png"] * N_TEST,
        },
    )
    _pickle(base / "batches.meta", {"label_names": [str(c) for c in range(10)], "num_vis": 3072})
    return np.concatenate(all_rows), all_labels


def test_registry_names():
    assert set(TORCHVISION_DATASETS) == {"mnist", "fashion_mnist", "kmnist", "cifar10", "cifar100", "svhn"}
    assert all(isinstance(v, str) and "\n" not in v for v in TORCHVISION_DATASETS.values())


@pytest.mark.parametrize(
    ("name", "class_name", "mean", "std"),
    [
        ("mnist", "MNIST", 0.1307, 0.3081),
        ("fashion_mnist", "FashionMNIST", 0.2860, 0.3530),
        ("kmnist", "KMNIST", 0.1918, 0.3483),
    ],
)
def test_mnist_family_reads_idx_files(tmp_path, name, class_name, mean, std):
    arrays = _make_mnist_family(tmp_path, class_name, np.random.default_rng(0))
    data = load_torchvision(name, str(tmp_path))
    assert data.name == name and data.n_classes == 10
    assert data.x_train.shape == (N_TRAIN, 1, 28, 28) and data.x_test.shape == (N_TEST, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    # held as uint8 (a quarter of float32's memory), normalised per fetched batch
    assert data.input_shape == (1, 28, 28) and data.train.native_bytes == data.test.native_bytes == 28 * 28
    assert data.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert data.x_train[0, 0, 3, 5].item() == pytest.approx((1.0 - mean) / std, abs=1e-5)
    assert data.x_train[0, 0, 5, 3].item() == pytest.approx(-mean / std, abs=1e-5)
    expected = (torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float() / 255 - mean) / std
    torch.testing.assert_close(data.x_test[:, 0], expected)


def test_cifar10_reads_python_batches(tmp_path):
    rng = np.random.default_rng(1)
    rows, labels = _make_cifar10(tmp_path, rng)
    rows[0, :] = 0
    rows[0, 0 * 1024 + 2 * 32 + 7] = 255  # R plane, row 2, col 7
    rows[0, 2 * 1024 + 9 * 32 + 1] = 255  # B plane, row 9, col 1
    _pickle(
        tmp_path / "cifar-10-batches-py" / "data_batch_1",
        {"batch_label": "batch 1", "labels": labels[:4], "data": rows[:4], "filenames": ["a"] * 4},
    )

    data = load_torchvision("cifar10", str(tmp_path))
    assert data.n_classes == 10
    assert data.x_train.shape == (N_TRAIN, 3, 32, 32) and data.x_test.shape == (N_TEST, 3, 32, 32)
    assert data.x_train.dtype == torch.float32 and data.y_test.dtype == torch.int64
    assert data.train.native_bytes == 3 * 32 * 32  # uint8 storage
    assert data.y_train.tolist() == labels  # batches concatenated in order 1..5
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    img = data.x_train[0]
    assert img[0, 2, 7].item() == pytest.approx((1 - mean[0]) / std[0], abs=1e-5)
    assert img[2, 9, 1].item() == pytest.approx((1 - mean[2]) / std[2], abs=1e-5)
    assert img[1, 2, 7].item() == pytest.approx(-mean[1] / std[1], abs=1e-5)
    expected = (
        torch.from_numpy(rows).float().view(-1, 3, 32, 32) / 255 - torch.tensor(mean).view(1, 3, 1, 1)
    ) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(data.x_train, expected)
    rows = torch.tensor([3, 0, 17])  # a batch fetched by index: the same values as those rows of the whole set
    assert torch.equal(data.train.fetch(rows), data.x_train[rows])


def test_cifar100_reads_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    base = tmp_path / "cifar-100-python"
    fine, coarse = rng.integers(0, 100, N_TRAIN).tolist(), rng.integers(0, 20, N_TRAIN).tolist()
    rows = _cifar_rows(rng, N_TRAIN)
    rows[0, 1024 + 0] = 255  # G plane, pixel (0, 0)
    _pickle(
        base / "train",
        {
            "filenames": ["a"] * N_TRAIN,
            "batch_label": "train",
            "fine_labels": fine,
            "coarse_labels": coarse,
            "data": rows,
        },
    )
    _pickle(
        base / "test",
        {
            "filenames": ["b"] * N_TEST,
            "batch_label": "test",
            "fine_labels": [99] * N_TEST,
            "coarse_labels": [0] * N_TEST,
            "data": _cifar_rows(rng, N_TEST),
        },
    )
    _pickle(
        base / "meta",
        {"fine_label_names": [str(i) for i in range(100)], "coarse_label_names": [str(i) for i in range(20)]},
    )

    data = load_torchvision("cifar100", str(tmp_path))
    assert data.n_classes == 100
    assert data.x_train.shape == (N_TRAIN, 3, 32, 32)
    assert data.y_train.tolist() == fine and data.y_test.tolist() == [99] * N_TEST
    assert data.x_train[0, 1, 0, 0].item() == pytest.approx((1 - 0.4865) / 0.2564, abs=1e-5)


def test_svhn_reads_mat_and_maps_label_10_to_0(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (32, 32, 3, N_TRAIN)).astype(np.uint8)  # H, W, C, N as in the .mat release
    x[1, 2, 0, 0] = 255  # image 0, R channel, row 1, col 2
    x[1, 2, 2, 0] = 0
    y = np.arange(N_TRAIN).reshape(-1, 1) % 10 + 1  # 1..10; 10 means digit 0
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y.astype(np.uint8)})
    scipy.io.savemat(
        tmp_path / "test_32x32.mat", {"X": x[..., :N_TEST], "y": np.full((N_TEST, 1), 10, np.uint8)}
    )

    data = load_torchvision("svhn", str(tmp_path))
    assert data.n_classes == 10
    assert data.x_train.shape == (N_TRAIN, 3, 32, 32) and data.x_test.shape == (N_TEST, 3, 32, 32)
    assert data.y_train.dtype == torch.int64
    assert data.y_train.tolist() == (y.ravel() % 10).tolist()
    assert data.y_test.tolist() == [0] * N_TEST
    assert data.x_train[0, 0, 1, 2].item() == pytest.approx((1 - 0.4377) / 0.1980, abs=1e-5)
    assert data.x_train[0, 2, 1, 2].item() == pytest.approx(-0.4728 / 0.1970, abs=1e-5)


@pytest.mark.parametrize(
    ("name", "expected_part"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("kmnist", "KMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_missing_files_raise_one_line_error(tmp_path, name, expected_part):
    root = tmp_path / "nowhere"
    with pytest.raises(DataMissingError) as info:
        load_torchvision(name, str(root))
    msg = str(info.value)
    assert "\n" not in msg
    assert repr(name) in msg and str(root) in msg and expected_part in msg
    assert "download: true" in msg and "scenario.root" in msg


def test_partial_files_name_the_missing_one(tmp_path):
    _make_mnist_family(tmp_path, "MNIST", np.random.default_rng(4))
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataMissingError, match="t10k-labels-idx1-ubyte"):
        load_torchvision("mnist", str(tmp_path))


def test_default_root_is_under_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataMissingError) as info:
        load_torchvision("svhn", None)
    assert str(tmp_path / ".cache" / "cltoolbox" / "data") in str(info.value)


def test_corrupt_cifar_file_is_a_one_line_error(tmp_path):
    _make_cifar10(tmp_path, np.random.default_rng(5))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataMissingError) as info:
        load_torchvision("cifar10", str(tmp_path))
    assert "data_batch_3" in str(info.value) and "\n" not in str(info.value)


def test_failed_download_is_a_one_line_error(tmp_path, monkeypatch):
    # No network in tests: make torchvision's fetch fail the way an offline machine would.
    import torchvision.datasets.svhn as tv_svhn

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_svhn, "download_url", offline)
    with pytest.raises(DataMissingError) as info:
        load_torchvision("svhn", str(tmp_path), download=True)
    msg = str(info.value)
    assert "\n" not in msg and "download" in msg and str(tmp_path) in msg and "URLError" in msg


def test_unknown_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cifar10"):
        load_torchvision("imagenet", str(tmp_path))


def test_own_readers_match_torchvision_parsing(tmp_path, monkeypatch):
    # Our CIFAR/SVHN readers exist only to skip torchvision's md5 check (generated files can never
    # match it); with that check disabled, torchvision's own parse of the same files must agree.
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.svhn as tv_svhn
    from torchvision.datasets import CIFAR10, SVHN

    rng = np.random.default_rng(6)
    _make_cifar10(tmp_path, rng)
    x = rng.integers(0, 256, (32, 32, 3, N_TRAIN)).astype(np.uint8)
    y = (np.arange(N_TRAIN) % 10 + 1).reshape(-1, 1).astype(np.uint8)
    for fname in ("train_32x32.mat", "test_32x32.mat"):
        scipy.io.savemat(tmp_path / fname, {"X": x, "y": y})
    with pytest.raises(RuntimeError):  # the reason the own readers exist
        CIFAR10(str(tmp_path), train=True)

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_svhn, "check_integrity", lambda *a, **k: True)
    ours = load_torchvision("cifar10", str(tmp_path))
    for train, x_ours, y_ours in ((True, ours.x_train, ours.y_train), (False, ours.x_test, ours.y_test)):
        ref = CIFAR10(str(tmp_path), train=train)
        assert y_ours.tolist() == list(ref.targets)
        raw = torch.from_numpy(ref.data).permute(0, 3, 1, 2).float() / 255
        mean, std = torch.tensor((0.4914, 0.4822, 0.4465)), torch.tensor((0.2470, 0.2435, 0.2616))
        torch.testing.assert_close(x_ours, (raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    ours = load_torchvision("svhn", str(tmp_path))
    ref = SVHN(str(tmp_path), split="train")
    assert ours.y_train.tolist() == ref.labels.tolist()
    mean, std = torch.tensor((0.4377, 0.4438, 0.4728)), torch.tensor((0.1980, 0.2010, 0.1970))
    raw = torch.from_numpy(ref.data).float() / 255
    torch.testing.assert_close(ours.x_train, (raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))


def _py2_cifar_batch(rows: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch byte for byte as Python 2's cPickle wrote the official files: protocol 2, strings as
    Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), the array rebuilt by ``numpy.core.multiarray._reconstruct``
    with its pixels as one raw string, the dtype by ``numpy.dtype`` with its version-3 state."""

    def text(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def num(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + num(0) + b"\x85" + text(b"b") + b"\x87R"
             + b"(" + num(1) + num(rows.shape[0]) + num(rows.shape[1]) + b"\x86"
             + b"cnumpy\ndtype\n" + text(b"u1") + num(0) + num(1) + b"\x87R"
             + b"(" + num(3) + text(b"|") + b"NNN" + num(-1) + num(-1) + num(0) + b"tb"
             + b"\x89" + text(rows.tobytes()) + b"tb")
    return (b"\x80\x02}(" + text(b"data") + array + text(b"labels") + b"](" + b"".join(num(v) for v in labels)
            + b"e" + text(b"batch_label") + text(b"training batch 1 of 5") + b"u.")


def test_cifar_reader_loads_the_official_python2_format(tmp_path):
    rng = np.random.default_rng(7)
    _make_cifar10(tmp_path, rng)
    rows, labels = _cifar_rows(rng, 4), [3, 1, 4, 1]
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(_py2_cifar_batch(rows, labels))
    data = load_torchvision("cifar10", str(tmp_path))
    assert data.y_train[:4].tolist() == labels
    x = data.train.x[:4]  # stored uint8, CHW
    assert torch.equal(x, torch.from_numpy(rows).view(4, 3, 32, 32))


class _Payload:
    """Unpickling this runs ``touch <marker>``: the classic code-execution pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_cifar_reader_refuses_a_pickle_that_runs_code(tmp_path):
    _make_cifar10(tmp_path, np.random.default_rng(8))
    crafted = {"batch_label": "batch 2", "labels": [0], "data": _Payload(tmp_path / "pwned"), "filenames": ["x"]}
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps({"data": _Payload(probe)}, protocol=2))  # the payload is live for plain pickle
    assert probe.exists()
    _pickle(tmp_path / "cifar-10-batches-py" / "data_batch_2", crafted)
    with pytest.raises(DataMissingError) as info:
        load_torchvision("cifar10", str(tmp_path))
    msg = str(info.value)
    assert "\n" not in msg and "data_batch_2" in msg and "system' is not allowed" in msg
    assert not (tmp_path / "pwned").exists()
