"""The data-source contract: uint8 and file-backed sources, samples by index, stream keys, workers, feature cache."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cltoolbox.data.base import Dataset
from cltoolbox.data.source import ImageFiles, TensorSource
from cltoolbox.errors import DataMissingError
from cltoolbox.evaluate import History, evaluate_stream
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.models.cache import SampleFeatureCache, sample_keys
from cltoolbox.registry import MODELS, SCENARIOS
from cltoolbox.stream import INDEX_MASK, VIEW_SHIFT, Experience, Samples, Stream

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def uint8_images(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 6


def old_float_path(x: torch.Tensor) -> torch.Tensor:
    """What the torchvision loaders did before sources existed: the whole set to float, then normalised."""
    x = x.to(torch.float32).div_(255.0)
    return x.sub_(torch.tensor(MEAN).view(1, 3, 1, 1)).div_(torch.tensor(STD).view(1, 3, 1, 1))


def test_uint8_source_fetches_exactly_the_old_normalised_floats():
    x, y = uint8_images()
    src = TensorSource(x, y, "toy/train", MEAN, STD)
    idx = torch.tensor([5, 0, 59, 5])
    assert src.x.dtype == torch.uint8 and src.native_bytes == 3 * 8 * 8
    assert torch.equal(src.fetch(idx), old_float_path(x)[idx])
    assert torch.equal(src.black_level(), old_float_path(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).flatten())


def test_float_source_returns_samples_as_stored():
    x = torch.randn(10, 4)
    src = TensorSource(x, torch.zeros(10, dtype=torch.long), "f")
    assert torch.equal(src.fetch(torch.tensor([3, 1])), x[[3, 1]])
    assert src.native_bytes == 16


def test_samples_subset_relabel_and_transform():
    x, y = uint8_images()
    src = TensorSource(x, y, "toy/train", MEAN, STD)
    s = Samples(src, torch.tensor([10, 20, 30, 40]), transform=lambda b: -b)
    assert torch.equal(s.y, y[[10, 20, 30, 40]])
    sub = s.subset(torch.tensor([3, 0]))
    assert torch.equal(sub.index, torch.tensor([40, 10])) and sub.transform is s.transform
    assert torch.equal(sub.fetch(), -old_float_path(x)[[40, 10]])
    assert torch.equal(s.relabel(torch.zeros(4, dtype=torch.long)).y, torch.zeros(4, dtype=torch.long))


def two_view_stream() -> tuple[Stream, torch.Tensor]:
    x, y = uint8_images()
    src = TensorSource(x, y, "toy/train", MEAN, STD)
    flip = lambda b: b.flip(-1)  # noqa: E731
    e0 = Experience(0, 0, (0, 1, 2), Samples(src, torch.arange(0, 30)), Samples(src, torch.arange(30, 40)))
    e1 = Experience(1, 1, (3, 4, 5), Samples(src, torch.arange(0, 30), transform=flip),
                    Samples(src, torch.arange(40, 60), transform=flip))
    return Stream("toy", [e0, e1], 6, (3, 8, 8), list(range(6)), "domain_incremental"), x


def test_stream_keys_are_unique_per_view_and_fetch_mixed_keys_in_order():
    stream, x = two_view_stream()
    assert len(stream.views) == 2  # same source: one view without and one with the transform
    k0, k1 = stream.keys(stream[0].train), stream.keys(stream[1].train)
    assert torch.equal(k0 & INDEX_MASK, k1 & INDEX_MASK) and not set(k0.tolist()) & set(k1.tolist())
    assert set((k1 >> VIEW_SHIFT).tolist()) == {1}
    mixed = torch.stack([k1[3], k0[3], k0[7], k1[0]])
    expected = torch.stack([stream[1].train.fetch()[3], stream[0].train.fetch()[3], stream[0].train.fetch()[7],
                            stream[1].train.fetch()[0]])
    assert torch.equal(stream.fetch(mixed), expected)
    moved = stream.to("cpu")
    assert torch.equal(moved.keys(moved[1].train), k1) and torch.equal(moved.fetch(mixed), expected)


def write_pngs(folder, n: int, size: int = 12) -> list[str]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_image_files_decode_and_workers_give_the_same_batches(tmp_path):
    paths = write_pngs(tmp_path, 24)
    src = ImageFiles(paths, torch.arange(24) % 4, "imgs", resize=8, channels=3, mean=MEAN, std=STD)
    assert src.sample_shape == (3, 8, 8) and src.native_bytes == 192 and src.file_backed()
    batches = [torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9, 2]), torch.tensor([23])]
    direct = [src.fetch(b) for b in batches]
    for workers in (0, 2):
        got = list(src.batches(batches, torch.device("cpu"), workers))
        assert all(torch.equal(a, b) for a, b in zip(got, direct, strict=True))
    assert direct[0].dtype == torch.float32 and direct[0].shape == (3, 3, 8, 8)


def test_a_missing_image_is_a_one_line_error(tmp_path):
    paths = write_pngs(tmp_path, 2)
    (tmp_path / "1.png").unlink()
    src = ImageFiles(paths, torch.zeros(2, dtype=torch.long), "imgs", resize=8)
    with pytest.raises(DataMissingError, match="1.png") as err:
        src.fetch(torch.tensor([1]))
    assert "\n" not in str(err.value)


def fit_and_evaluate(data: Dataset, workers: int | None = None) -> torch.Tensor:
    torch.manual_seed(0)
    stream = SCENARIOS.get("class_incremental").factory(data, 0, n_experiences=3)
    model = MODELS.get("mlp").factory(stream.input_shape, stream.n_classes, hidden=[16])
    learner = Learner(model, [], TrainConfig(epochs=2, batch_size=8, lr=0.05, workers=workers), seed=0)
    history = History(len(stream), stream.n_classes)
    learner.begin(stream)
    learner.fit(stream, on_experience_end=lambda lrn, e: evaluate_stream(lrn, stream, e.index, history))
    return history.accuracy


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_uint8_and_float_in_memory_paths_train_identically():
    x, y = uint8_images(120)
    xt, yt = uint8_images(60, seed=1)
    as_uint8 = Dataset.from_tensors("toy", x, y, xt, yt, 6, MEAN, STD)
    as_float = Dataset.from_tensors("toy", old_float_path(x), y, old_float_path(xt), yt, 6)
    assert same(fit_and_evaluate(as_uint8), fit_and_evaluate(as_float))


def test_file_backed_training_does_not_depend_on_the_worker_count(tmp_path):
    labels = torch.arange(36) % 6
    paths = write_pngs(tmp_path / "train", 36)
    test_paths = write_pngs(tmp_path / "test", 12)
    make = lambda ps, ys, k: ImageFiles(ps, ys, k, resize=8, mean=MEAN, std=STD)  # noqa: E731
    data = Dataset("files", make(paths, labels, "f/train"), make(test_paths, torch.arange(12) % 6, "f/test"), 6)
    assert same(fit_and_evaluate(data, workers=0), fit_and_evaluate(data, workers=2))


def test_feature_cache_keys_stream_samples_by_key_not_content():
    stream, _ = two_view_stream()
    cache = SampleFeatureCache()
    calls = []

    def compute(x):
        calls.append(x.shape[0])
        return x.flatten(1)[:, :4].clone()

    keys = stream.keys(stream[0].train)[:5]
    x = stream.fetch(keys)
    with sample_keys(keys, stream):
        first = cache(x, compute)
        again = cache(x, compute)
    assert calls == [5] and torch.equal(first, again) and cache.hits == 5
    with sample_keys(stream.keys(stream[1].train)[:5], stream):  # same indices, other view: other samples
        cache(stream.fetch(stream.keys(stream[1].train)[:5]), compute)
    assert calls == [5, 5]


def test_dataset_cache_removes_what_a_killed_writer_left(tmp_path, monkeypatch):
    from cltoolbox.data import sources

    monkeypatch.setenv("CLTOOLBOX_CACHE", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f"toy-v1.tmp{dead.pid}", tmp_path / f"toy-v1.tmp{os.getppid()}"
    stale.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    x, y = uint8_images(12)
    data = sources._cached("toy", lambda: Dataset.from_tensors("toy", x, y, x, y, 6, MEAN, STD))
    assert not stale.exists() and live.exists()  # a live writer's file is its own
    assert (tmp_path / "toy-v1.pt").exists() and torch.equal(data.train.x, x)


def test_an_unreadable_image_in_a_loader_worker_is_a_one_line_error(tmp_path):
    paths = write_pngs(tmp_path, 4)
    Path(paths[2]).write_bytes(b"not a png")
    src = ImageFiles(paths, torch.zeros(4, dtype=torch.long), "imgs", resize=8)
    with pytest.raises(DataMissingError, match="2.png") as err:
        list(src.batches([torch.tensor([0, 1]), torch.tensor([2, 3])], torch.device("cpu"), workers=1))
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert str(err.value).startswith("image ")
