"""The file-backed benchmarks (cltoolbox.data.catalogue) and CORe50's scenarios, on tiny files written in each
dataset's real layout with PIL; nothing is downloaded. One short run goes through the whole path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cltoolbox
from cltoolbox.data.catalogue import (
    CORE50_TEST_SESSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_core50,
    load_image_folder,
    load_imagenet_subset,
)
from cltoolbox.data.source import ImageFiles
from cltoolbox.errors import ConfigError, DataMissingError
from cltoolbox.registry import DATASETS, SCENARIOS

RNG = np.random.default_rng(0)


def _image(path: Path, size: tuple[int, int] = (10, 8), colour: tuple[int, int, int] | None = None) -> None:
    """A small RGB image at ``path`` (width, height ``size``); the suffix picks the format (JPEG or PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    pixels = np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)) if colour is not None else \
        RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, "PNG" if path.suffix == ".png" else "JPEG")


def _load(name: str, root: Path):
    return DATASETS.get(name).factory(root=str(root))


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


def _check_batch(source: ImageFiles, side: int) -> torch.Tensor:
    x = source.fetch(torch.tensor([0, len(source) - 1]))
    assert x.shape == (2, 3, side, side) and x.dtype == torch.float32
    assert source.sample_shape == (3, side, side) and source.native_bytes == 3 * side * side
    return x


# ---------------------------------------------------------------------------------------------------------
# image_folder


def test_image_folder_train_test_trees(tmp_path):
    for part, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "ant", "bee"):
            for k in range(n):
                _image(tmp_path / part / cls / f"{k}.png", colour=(255, 0, 0))
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    data = _load("image_folder", tmp_path)
    assert data.n_classes == 3 and len(data.train) == 9 and len(data.test) == 6
    assert data.y_train.tolist() == [0] * 3 + [1] * 3 + [2] * 3  # ant, bee, cat: sorted folder names
    assert data.y_test.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.train.file_backed() and data.train.key == "image_folder/train"
    x = _check_batch(data.test, 224)
    red = torch.tensor([(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                        -IMAGENET_MEAN[2] / IMAGENET_STD[2]])
    torch.testing.assert_close(x[:, :, 100, 100], red.expand(2, 3), atol=1e-5, rtol=0)


def test_image_folder_single_tree_is_a_seeded_stratified_split(tmp_path):
    for c, n in (("a", 10), ("b", 5)):
        for k in range(n):
            _image(tmp_path / c / f"{k}.jpg")
    data = load_image_folder(str(tmp_path), resize=12, crop=None)
    assert data.n_classes == 2 and len(data.train) == 12 and len(data.test) == 3
    assert data.y_test.tolist() == [0, 0, 1]  # 20% of each class
    assert set(data.train.paths).isdisjoint(data.test.paths)
    assert load_image_folder(str(tmp_path), resize=12).test.paths == data.test.paths  # same split every time
    _check_batch(data.train, 12)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataMissingError) as err:
        _load("image_folder", tmp_path / "absent")
    _one_line(err, "image_folder", str(tmp_path / "absent"), "scenario.root")
    _image(tmp_path / "train" / "a" / "0.jpg")
    _image(tmp_path / "test" / "z" / "0.jpg")
    with pytest.raises(DataMissingError) as err:
        _load("image_folder", tmp_path)
    _one_line(err, str(tmp_path / "test" / "z"))


def test_unreadable_image_is_a_one_line_error_when_fetched(tmp_path):
    for cls in ("a", "b"):
        _image(tmp_path / "train" / cls / "0.jpg")
        _image(tmp_path / "test" / cls / "0.jpg")
    (tmp_path / "test" / "b" / "0.jpg").write_bytes(b"not a jpeg")
    data = _load("image_folder", tmp_path)
    with pytest.raises(DataMissingError) as err:
        data.test.fetch(torch.tensor([1]))
    _one_line(err, "0.jpg")


# ---------------------------------------------------------------------------------------------------------
# tiny_imagenet, imagenet_r, cub200, imagenet_subset


def _tiny_imagenet(root: Path) -> list[str]:
    base = root / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        for k in range(3):
            _image(base / "train" / w / "images" / f"{w}_{k}.JPEG", size=(64, 64))
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    rows = []
    for k, w in enumerate(["n03", "n01", "n02", "n01"]):
        _image(base / "val" / "images" / f"val_{k}.JPEG", size=(64, 64))
        rows.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    _image(base / "test" / "images" / "test_0.JPEG", size=(64, 64))  # unlabelled, unused
    return wnids


def test_tiny_imagenet_layout(tmp_path):
    _tiny_imagenet(tmp_path)
    for root in (tmp_path, tmp_path / "tiny-imagenet-200"):  # the parent or the dataset folder itself
        data = _load("tiny_imagenet", root)
        assert data.n_classes == 3 and len(data.train) == 9 and len(data.test) == 4
        assert data.y_train.tolist() == [0] * 3 + [1] * 3 + [2] * 3  # sorted wnids: n01, n02, n03
        assert data.y_test.tolist() == [2, 0, 1, 0]
        assert data.train.paths[0].endswith("train/n01/images/n01_0.JPEG")
    x = _check_batch(data.train, 64)  # stored 64x64, not resized
    raw = torch.from_numpy(np.array(Image.open(data.train.paths[0]).convert("RGB"))).permute(2, 0, 1).float()
    expect = (raw / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x[0], expect, atol=0.05, rtol=0)  # decoders may differ by a unit of JPEG rounding


def test_tiny_imagenet_missing_val_image(tmp_path):
    _tiny_imagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(DataMissingError) as err:
        _load("tiny_imagenet", tmp_path)
    _one_line(err, "val_2.JPEG", "tiny_imagenet")


def test_imagenet_r_split_and_presplit_copy(tmp_path):
    for w, n in (("n01443537", 10), ("n01484850", 5), ("n01494475", 5)):
        for k in range(n):
            _image(tmp_path / "imagenet-r" / w / f"art_{k}.jpg", size=(12, 9))
    data = _load("imagenet_r", tmp_path)
    assert data.n_classes == 3 and len(data.train) == 16 and len(data.test) == 4
    assert data.y_test.tolist() == [0, 0, 1, 2]
    assert set(data.train.paths).isdisjoint(data.test.paths)
    _check_batch(data.test, 224)

    presplit = tmp_path / "presplit" / "imagenet-r"
    for part, n in (("train", 2), ("test", 1)):
        for w in ("n01443537", "n01484850"):
            for k in range(n):
                _image(presplit / part / w / f"{k}.jpg")
    data = _load("imagenet_r", tmp_path / "presplit")
    assert data.name == "imagenet_r" and (len(data.train), len(data.test)) == (4, 2)
    assert data.y_test.tolist() == [0, 1]


def _cub(root: Path) -> None:
    base = root / "CUB_200_2011"
    images, labels, split = [], [], []
    image_id = 0
    for c, cls in enumerate(("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"), 1):
        for k in range(3):
            image_id += 1
            rel = f"{cls}/{cls[4:]}_{k}.jpg"
            _image(base / "images" / rel, size=(11, 7))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {1 if k < 2 else 0}")
    for fname, rows in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split)):
        (base / fname).write_text("\n".join(rows) + "\n")


def test_cub200_official_split(tmp_path):
    _cub(tmp_path)
    data = _load("cub200", tmp_path)
    assert data.n_classes == 3 and len(data.train) == 6 and len(data.test) == 3
    assert data.y_train.tolist() == [0, 0, 1, 1, 2, 2] and data.y_test.tolist() == [0, 1, 2]
    assert data.test.paths[2].endswith("images/003.Sooty_Albatross/Sooty_Albatross_2.jpg")
    _check_batch(data.train, 224)
    (tmp_path / "CUB_200_2011" / "images" / "002.Laysan_Albatross" / "Laysan_Albatross_0.jpg").unlink()
    with pytest.raises(DataMissingError) as err:
        _load("cub200", tmp_path)
    _one_line(err, "Laysan_Albatross_0.jpg", "cub200")


def test_imagenet_subset_class_list(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
    for part, n in (("train", 2), ("val", 1)):
        for w in wnids:
            for k in range(n):
                _image(tmp_path / part / w / f"{w}_{k}.JPEG")
    data = _load("imagenet_subset", tmp_path)  # no list: the tree holds the subset
    assert data.n_classes == 4 and (len(data.train), len(data.test)) == (8, 4)
    (tmp_path / "imagenet100.txt").write_text("n01484850\nn01440764\n")
    data = _load("imagenet_subset", tmp_path)
    assert data.n_classes == 2 and data.y_test.tolist() == [0, 1]  # the list's order
    assert data.test.paths[0].endswith("val/n01484850/n01484850_0.JPEG")
    _check_batch(data.test, 224)

    (tmp_path / "imagenet100.txt").unlink()
    with pytest.raises(DataMissingError) as err:
        load_imagenet_subset(str(tmp_path), max_classes=3)  # a tree larger than the subset needs the list
    _one_line(err, str(tmp_path / "imagenet100.txt"), "4 class folders")
    (tmp_path / "mine.txt").write_text("n01491361\nn09999999\n")
    with pytest.raises(DataMissingError) as err:
        load_imagenet_subset(str(tmp_path), class_list=str(tmp_path / "mine.txt"))
    _one_line(err, str(tmp_path / "train" / "n09999999"))


@pytest.mark.parametrize(("name", "expected"), [
    ("tiny_imagenet", "tiny-imagenet-200/wnids.txt"),
    ("imagenet_r", "imagenet-r"),
    ("cub200", "CUB_200_2011/images.txt"),
    ("core50", "core50_128x128/s1"),
    ("imagenet_subset", "train"),
    ("image_folder", ""),
])
def test_missing_dataset_is_a_one_line_error_naming_the_path(tmp_path, name, expected):
    with pytest.raises(DataMissingError) as err:
        _load(name, tmp_path)
    _one_line(err, repr(name), str(tmp_path / expected), "scenario.root")


# ---------------------------------------------------------------------------------------------------------
# CORe50 and its scenarios


@pytest.fixture(scope="module")
def core50_root(tmp_path_factory) -> Path:
    """Every session/object folder of core50_128x128 with one 4x4 PNG frame each (two in s1/o1), coloured by
    the object's category so that categories can be learnt."""
    base = tmp_path_factory.mktemp("core50") / "core50_128x128"
    palette = RNG.integers(0, 256, (10, 3))
    for s in range(1, 12):
        for o in range(1, 51):
            for k in range(2 if (s, o) == (1, 1) else 1):
                _image(base / f"s{s}" / f"o{o}" / f"C_{s:02d}_{o:02d}_{k:03d}.png", size=(4, 4),
                       colour=tuple(int(v) for v in palette[(o - 1) // 5]))
    return base.parent


def test_core50_layout_and_sessions(core50_root):
    data = _load("core50", core50_root)
    assert data.n_classes == 50 and len(data.train) == 8 * 50 + 1 and len(data.test) == 3 * 50
    assert sorted(set(data.train.sessions.tolist())) == [1, 2, 4, 5, 6, 8, 9, 11]
    assert sorted(set(data.test.sessions.tolist())) == list(CORE50_TEST_SESSIONS)
    assert data.train.sessions.shape == data.y_train.shape
    assert data.y_train[:3].tolist() == [0, 0, 1] and data.y_train.bincount().tolist() == [9] + [8] * 49
    assert all(f"/s{s}/o{y + 1}/" in p for p, s, y in zip(data.train.paths, data.train.sessions.tolist(),
                                                             data.y_train.tolist(), strict=True))
    _check_batch(data.test, 128)


def test_core50_missing_object_folder(tmp_path):
    for s in range(1, 12):
        for o in range(1, 51):
            (tmp_path / "core50_128x128" / f"s{s}" / f"o{o}").mkdir(parents=True)
    (tmp_path / "core50_128x128" / "s4" / "o17").rmdir()
    with pytest.raises(DataMissingError) as err:
        _load("core50", tmp_path)
    _one_line(err, str(tmp_path / "core50_128x128" / "s4" / "o17"))


def test_core50_ni_one_session_per_experience(core50_root):
    data = load_core50(str(core50_root), resize=4)
    ni = SCENARIOS.get("core50_ni").factory
    stream = ni(data, 0)
    assert [int(data.train.sessions[e.train.index].unique()) for e in stream] == [1, 2, 4, 5, 6, 8, 9, 11]
    assert stream.n_classes == 50 and all(e.classes == tuple(range(50)) for e in stream)
    assert len(stream.eval_experiences) == 1 and stream.schedule == [0] * 8 and stream.first_seen() == [1]
    assert len(stream.eval_experiences[0].test) == 150 and len(stream[0].train) == 51
    assert stream.info["sessions"] == [1, 2, 4, 5, 6, 8, 9, 11]

    seeded = ni(data, 3, session_order="seeded")
    assert sorted(seeded.info["sessions"]) == stream.info["sessions"] != seeded.info["sessions"]
    assert ni(data, 3, session_order="seeded").info["sessions"] == seeded.info["sessions"]
    assert ni(data, 0, session_order=[11, 1, 2, 4, 5, 6, 8, 9]).info["sessions"][0] == 11

    cats = ni(data, 0, object_level=False)
    assert cats.n_classes == 10 and cats[0].train.y.max() == 9
    assert cats.eval_experiences[0].test.y.bincount().tolist() == [15] * 10  # 5 objects x 3 sessions each

    with pytest.raises(ConfigError, match="session_order"):
        ni(data, 0, session_order=[1, 2, 3])
    with pytest.raises(ConfigError, match="core50"):
        ni(load_image_folder(str(core50_root / "core50_128x128" / "s1")), 0)


def test_core50_nc_object_splits(core50_root):
    data = load_core50(str(core50_root), resize=4)
    stream = SCENARIOS.get("core50_nc").factory(data, 0)
    assert [len(e.classes) for e in stream] == [10] + [5] * 8 and stream.scenario == "class_incremental"
    seen = [c for e in stream for c in e.classes]
    assert sorted(seen) == list(range(50)) and seen != list(range(50))  # seeded object order
    for e in stream:
        assert set(e.train.y.tolist()) == set(e.classes) == set(e.test.y.tolist())
        assert set(data.test.sessions[e.test.index].tolist()) == set(CORE50_TEST_SESSIONS)
        assert len(data.train.sessions[e.train.index].unique()) == 8


@pytest.mark.parametrize("name", ["core50_ni", "core50_nc"])
def test_core50_scenarios_keep_the_scenario_contract(core50_root, name):
    # what tests/test_conformance.py checks of every other scenario (on digits), on a CORe50 layout
    data = load_core50(str(core50_root), resize=4)
    s1, s2 = (SCENARIOS.get(name).factory(data, 5) for _ in range(2))
    assert [e.index for e in s1] == list(range(len(s1))) and s1.scenario in ("class_incremental",
                                                                             "domain_incremental")
    for e1, e2 in zip([*s1, *s1.eval_experiences], [*s2, *s2.eval_experiences], strict=True):
        assert e1.classes == e2.classes and e1.task_id == e2.task_id == 0
        for a, b in ((e1.train, e2.train), (e1.test, e2.test)):
            assert torch.equal(a.index, b.index) and torch.equal(a.y, b.y) and len(a) > 0
            assert set(a.y.tolist()) <= set(e1.classes) and a.source.file_backed()
    assert s1.n_classes == data.n_classes and sorted(s1.class_order) == list(range(s1.n_classes))


def test_core50_ni_runs_end_to_end_same_results_with_workers(core50_root, tmp_path, one_thread):
    # the registered core50 decodes to 128 px; a two-line plugin registers it at 8 px, as users would
    plugin = tmp_path / "core50_8px.py"
    plugin.write_text("from cltoolbox.data.catalogue import load_core50\nfrom cltoolbox.registry import "
                      "register_dataset\n\n\n@register_dataset('core50_8px')\ndef core50_8px(root: str | None = None, "
                      "download: bool = False):\n    return load_core50(root, resize=8)\n")
    runs = {}
    for workers in (0, 2):
        config = {
            "name": f"core50_w{workers}", "imports": [str(plugin)],
            "scenario": {"name": "core50_ni", "dataset": "core50_8px", "root": str(core50_root),
                         "object_level": False},
            "model": {"name": "mlp", "hidden": [32]}, "strategy": {"name": "naive"},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "workers": workers, "device": "cpu"},
            "seeds": [0], "out": str(tmp_path / "runs"),
        }
        (summary,) = cltoolbox.run(config, quiet=True)
        runs[workers] = Path(summary["run_dir"])
    csv = (runs[0] / "accuracy.csv").read_bytes()
    assert csv == (runs[2] / "accuracy.csv").read_bytes()
    # rows -1..7 x one test task x (class-IL, task-IL): the whole test set after every session
    assert len(csv.decode().splitlines()) == 1 + 9 * 2
    assert summary["class_il"]["acc"] > 0.5  # categories are colours: learnt, so labels match the files
