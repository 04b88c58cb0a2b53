"""File-backed benchmarks: image trees and index files on disk, read as :class:`ImageFiles` sources.

Loading a dataset lists its files and labels (folder names, index files); no image is opened. Images are
decoded to uint8 RGB by ``DataLoader`` workers during training (``train.workers``), resized and centre-cropped
to the size below, and normalised with the ImageNet mean/std on the training device. None of these sets is
downloaded: put the files under ``scenario.root`` (default ``~/.cache/cltoolbox/data``) in the layout named in
each loader's docstring; the top folder (e.g. ``tiny-imagenet-200``) may be ``root`` itself or a folder in it.

- ``image_folder``: ``train/<class>/*`` and ``test/<class>/*``, or one ``<class>/*`` tree; shorter side 224, crop 224
- ``tiny_imagenet``: ``tiny-imagenet-200/`` (wnids.txt, train/, val/); the stored 64x64
- ``imagenet_r``: ``imagenet-r/<wnid>/*.jpg``; resized to 224x224
- ``cub200``: ``CUB_200_2011/`` (images.txt, image_class_labels.txt, train_test_split.txt, images/); 256, crop 224
- ``core50``: ``core50_128x128/s<1-11>/o<1-50>/*.png``; the stored 128x128
- ``imagenet_subset``: ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``, ``imagenet100.txt``; 256, crop 224

The ``load_*`` functions take the size (and a few other choices) as keyword arguments; the registered names
use the defaults above. A different size is a two-line plugin (``imports: [my_data.py]`` in the config)::

    @register_dataset("cub200_96")
    def cub200_96(root=None, download=False):
        return load_cub200(root, resize=96, crop=96)

Training uses the same deterministic resize/crop as testing (the papers' test transform); random
augmentation (``train.augment_*``) runs batched on the device, drawn from the run's seeded generator.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cltoolbox.data.base import Dataset
from cltoolbox.data.source import ImageFiles, check_files
from cltoolbox.errors import DataMissingError
from cltoolbox.registry import register_dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what torchvision.io.decode_image reads on every version we support

CORE50_SESSIONS = tuple(range(1, 12))
CORE50_TEST_SESSIONS = (3, 7, 10)
CORE50_OBJECTS = 50
CORE50_OBJECTS_PER_CATEGORY = 5  # o1-o5 plug adapters, o6-o10 mobile phones, ..., o46-o50 remote controls


# ---------------------------------------------------------------------------------------------------------
# helpers


def data_root(root: str | None) -> Path:
    """The absolute data folder: ``root``, or the default one shared by every dataset when None."""
    from cltoolbox.data.torchvision_sets import DEFAULT_ROOT  # one default data folder for every dataset

    return Path(os.path.abspath(os.path.expanduser(root if root is not None else DEFAULT_ROOT)))


def _missing(name: str, path: Path, layout: str) -> DataMissingError:
    return DataMissingError(
        f"dataset {name!r}: {str(path)!r} not found (expected {layout}); set scenario.root to the folder that "
        "holds the dataset (cltoolbox does not download it)"
    )


def _locate(root: Path, folder: str, marker: str, name: str, layout: str) -> Path:
    """``root/folder`` if it holds ``marker``, else ``root`` if it does (root may be the dataset folder)."""
    for base in (root / folder, root):
        if (base / marker).exists():
            return base
    raise _missing(name, root / folder / marker, layout)


def _images(folder: Path) -> list[str]:
    """The image files directly in ``folder``, sorted by name (the order never depends on the file system)."""
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


def _subfolders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _class_tree(folder: Path, classes: Sequence[str], name: str, layout: str,
                inner: str = "") -> tuple[list[str], list[int]]:
    """Paths and labels of ``folder/<class>/<inner>/*`` for ``classes`` (label = position in ``classes``)."""
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        where = folder / cls / inner if inner else folder / cls
        if not where.is_dir():
            raise _missing(name, where, layout)
        found = _images(where)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise DataMissingError(f"dataset {name!r}: no .jpg/.jpeg/.png images under {str(folder)!r} (expected "
                               f"{layout}); set scenario.root to the folder that holds the dataset")
    return paths, labels


def _read_lines(path: Path, name: str, layout: str) -> list[list[str]]:
    """Whitespace-split non-empty lines of an index file."""
    if not path.is_file():
        raise _missing(name, path, layout)
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def _files(name: str, paths: Sequence[str], labels: Sequence[int], part: str, resize: int,
           crop: int | None) -> ImageFiles:
    return ImageFiles(paths, torch.tensor(labels, dtype=torch.int64), f"{name}/{part}", resize, crop, 3,
                      IMAGENET_MEAN, IMAGENET_STD)


def _dataset(name: str, train: tuple[Sequence[str], Sequence[int]], test: tuple[Sequence[str], Sequence[int]],
             n_classes: int, resize: int, crop: int | None) -> Dataset:
    return Dataset(name, _files(name, *train, "train", resize, crop), _files(name, *test, "test", resize, crop),
                   n_classes)


def _split(paths: list[str], labels: list[int], test_fraction: float,
           seed: int) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """A seeded stratified train/test split of one tree (every class keeps ``test_fraction`` for testing)."""
    import numpy as np

    from cltoolbox.data.sources import stratified_split

    tr, te = stratified_split(np.asarray(labels), test_fraction, seed)
    return ([paths[i] for i in tr], [labels[i] for i in tr]), ([paths[i] for i in te], [labels[i] for i in te])


# ---------------------------------------------------------------------------------------------------------
# loaders


def load_image_folder(root: str | None = None, download: bool = False, *, name: str = "image_folder",
                      resize: int = 224, crop: int | None = 224, test_fraction: float = 0.2,
                      split_seed: int = 0) -> Dataset:
    """Any class-folder image tree: ``train/`` + ``test/`` trees, or one tree split 80/20; 224x224 centre crops.

    Layout: ``root/train/<class>/*.{jpg,jpeg,png}`` and ``root/test/<class>/*`` (or ``root/val/<class>/*``)
    when the data comes split; otherwise a single tree ``root/<class>/*``, split into train/test by a
    stratified split with seed ``split_seed`` (0), ``test_fraction`` (20%) of every class for testing, the
    same split for every run seed. Class ids follow the sorted folder names; test classes must also be
    training classes. Size: shorter side resized to
    ``resize`` (224), centre crop ``crop`` (224; None resizes to ``resize`` x ``resize``).
    """
    base = data_root(root)
    layout = "root/train/<class>/*.jpg and root/test/<class>/*.jpg, or root/<class>/*.jpg"
    if not base.is_dir():
        raise _missing(name, base, layout)
    test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    if (base / "train").is_dir() and test_dir is not None:
        classes = _subfolders(base / "train")
        unknown = sorted(set(_subfolders(test_dir)) - set(classes))
        if unknown:
            raise DataMissingError(f"dataset {name!r}: test class folder {str(test_dir / unknown[0])!r} has no "
                                   f"training folder {str(base / 'train' / unknown[0])!r}; add it or remove the "
                                   "test folder")
        train = _class_tree(base / "train", classes, name, layout)
        test_classes = [c for c in classes if (test_dir / c).is_dir()]
        paths, labels = _class_tree(test_dir, test_classes, name, layout)
        label_of = {i: classes.index(c) for i, c in enumerate(test_classes)}
        test = paths, [label_of[y] for y in labels]
    else:
        classes = [c for c in _subfolders(base) if c not in ("train", "test", "val")]
        if not classes:
            raise _missing(name, base / "<class>", layout)
        train, test = _split(*_class_tree(base, classes, name, layout), test_fraction, split_seed)
    return _dataset(name, train, test, len(classes), resize, crop)


def load_tiny_imagenet(root: str | None = None, download: bool = False, *, resize: int = 64,
                       crop: int | None = None) -> Dataset:
    """Tiny ImageNet (Stanford CS231n): 200 classes, 100,000 train / 10,000 test (its val set), 3x64x64.

    Layout (``tiny-imagenet-200.zip`` unpacked): ``tiny-imagenet-200/wnids.txt`` (one WordNet id per line),
    ``train/<wnid>/images/<wnid>_<k>.JPEG`` (500 per class), ``val/images/val_<k>.JPEG`` labelled by
    ``val/val_annotations.txt`` (tab-separated: file, wnid, box). The unlabelled ``test/`` folder is unused;
    the val set is the test set, as in Seq-TinyImageNet (Mammoth, Buzzega et al. 2020). Class ids follow the
    sorted wnids. Size: the stored 64x64, no resize (Mammoth's and the replay papers' resolution).
    """
    name = "tiny_imagenet"
    layout = "tiny-imagenet-200/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
    base = _locate(data_root(root), "tiny-imagenet-200", "wnids.txt", name, layout)
    wnids = sorted(row[0] for row in _read_lines(base / "wnids.txt", name, layout))
    train = _class_tree(base / "train", wnids, name, layout, inner="images")
    label_of = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for row in _read_lines(base / "val" / "val_annotations.txt", name, layout):
        if len(row) < 2 or row[1] not in label_of:
            raise DataMissingError(f"dataset {name!r}: {str(base / 'val' / 'val_annotations.txt')!r} line "
                                   f"{' '.join(row)!r} does not name a file and a wnid of wnids.txt; restore the "
                                   "original file")
        paths.append(str(base / "val" / "images" / row[0]))
        labels.append(label_of[row[1]])
    check_files(paths, name, layout)
    return _dataset(name, train, (paths, labels), len(wnids), resize, crop)


def load_imagenet_r(root: str | None = None, download: bool = False, *, resize: int = 224, crop: int | None = None,
                    test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """ImageNet-R (Hendrycks et al. 2021): 30,000 renditions of 200 ImageNet classes, 80/20 split, 224x224.

    Layout (``imagenet-r.tar`` unpacked): ``imagenet-r/<wnid>/*.jpg``, 200 class folders, class ids in sorted
    wnid order. The prompting papers split it 80/20 (24,000 / 6,000): DualPrompt's code at random from the
    framework's global generator, CODA-Prompt with a list shipped in its repository; neither can be redrawn
    here, so the split is stratified with seed ``split_seed`` (0), 20% of every class for testing, the same
    for every run seed. A copy already split the way the DualPrompt code saves it,
    ``imagenet-r/train/<wnid>/*`` and ``imagenet-r/test/<wnid>/*``, is used as it is. Size: resized to
    224x224 (CODA-Prompt's test transform; DualPrompt's is shorter side 256, centre crop 224:
    ``load_imagenet_r(resize=256, crop=224)``).
    """
    name = "imagenet_r"
    layout = "imagenet-r/<wnid>/*.jpg (200 class folders)"
    top = data_root(root)
    base = top / "imagenet-r" if (top / "imagenet-r").is_dir() else top
    if (base / "train").is_dir() and (base / "test").is_dir():
        return load_image_folder(str(base), name=name, resize=resize, crop=crop)
    classes = _subfolders(base) if base.is_dir() else []
    if not classes:
        raise _missing(name, top / "imagenet-r", layout)
    train, test = _split(*_class_tree(base, classes, name, layout), test_fraction, split_seed)
    return _dataset(name, train, test, len(classes), resize, crop)


def load_cub200(root: str | None = None, download: bool = False, *, resize: int = 256,
                crop: int | None = 224) -> Dataset:
    """CUB-200-2011 birds (Wah et al. 2011): 200 classes, 5,994 train / 5,794 test (official split), 224x224.

    Layout (``CUB_200_2011.tgz`` unpacked): ``CUB_200_2011/images.txt`` (``<id> <class dir>/<file>.jpg``),
    ``image_class_labels.txt`` (``<id> <class 1-200>``), ``train_test_split.txt`` (``<id> <1 train / 0 test>``)
    and ``images/<class dir>/*.jpg``. Class ids are the file's classes minus one. Size: shorter side 256,
    centre crop 224 (the test transform of the pre-trained-model CIL code, e.g. SimpleCIL's PILOT toolbox).
    """
    name = "cub200"
    layout = "CUB_200_2011/images.txt, image_class_labels.txt, train_test_split.txt and images/<class>/*.jpg"
    base = _locate(data_root(root), "CUB_200_2011", "images.txt", name, layout)
    try:
        path_of = {row[0]: row[1] for row in _read_lines(base / "images.txt", name, layout)}
        label_of = {row[0]: int(row[1]) - 1 for row in _read_lines(base / "image_class_labels.txt", name, layout)}
        is_train = {row[0]: row[1] == "1" for row in _read_lines(base / "train_test_split.txt", name, layout)}
        parts: dict[bool, tuple[list[str], list[int]]] = {True: ([], []), False: ([], [])}
        for image_id in sorted(path_of, key=int):
            paths, labels = parts[is_train[image_id]]
            paths.append(str(base / "images" / path_of[image_id]))
            labels.append(label_of[image_id])
    except (IndexError, KeyError, ValueError) as err:
        raise DataMissingError(f"dataset {name!r}: the index files under {str(base)!r} do not match "
                               f"({type(err).__name__}: {err}); restore the original images.txt, "
                               "image_class_labels.txt and train_test_split.txt") from None
    check_files(parts[True][0] + parts[False][0], name, layout)
    n_classes = max(label_of.values()) + 1 if label_of else 0
    return _dataset(name, parts[True], parts[False], n_classes, resize, crop)


def load_core50(root: str | None = None, download: bool = False, *, resize: int = 128,
                crop: int | None = None) -> Dataset:
    """CORe50 (Lomonaco & Maltoni 2017): 50 objects of 10 categories filmed in 11 sessions, 128x128 frames.

    Layout (``core50_128x128.zip`` unpacked): ``core50_128x128/s<session>/o<object>/C_<ss>_<oo>_<fff>.png``,
    sessions s1-s11, objects o1-o50 (every folder must be present). Labels are objects, 0-49 (object o_k is
    k - 1; its category is (k - 1) // 5). Train: the 8 training sessions; test: sessions 3, 7 and 10, the
    benchmark's fixed test set (~45,000 frames). Each source carries ``sessions``, the int64 session number
    of every sample, which the ``core50_ni`` / ``core50_nc`` scenarios split on. Size: the stored 128x128.
    """
    name = "core50"
    layout = "core50_128x128/s<1-11>/o<1-50>/*.png"
    base = _locate(data_root(root), "core50_128x128", "s1", name, layout)
    parts: dict[bool, tuple[list[str], list[int], list[int]]] = {True: ([], [], []), False: ([], [], [])}
    for s in CORE50_SESSIONS:
        paths, labels, sessions = parts[s not in CORE50_TEST_SESSIONS]
        for o in range(1, CORE50_OBJECTS + 1):
            folder = base / f"s{s}" / f"o{o}"
            if not folder.is_dir():
                raise _missing(name, folder, layout)
            found = _images(folder)
            paths += found
            labels += [o - 1] * len(found)
            sessions += [s] * len(found)
    data = _dataset(name, parts[True][:2], parts[False][:2], CORE50_OBJECTS, resize, crop)
    for source, part in ((data.train, parts[True]), (data.test, parts[False])):
        source.sessions = torch.tensor(part[2], dtype=torch.int64)
    return data


def load_imagenet_subset(root: str | None = None, download: bool = False, *, class_list: str | None = None,
                         resize: int = 256, crop: int | None = 224, max_classes: int = 100) -> Dataset:
    """ImageNet-100: the classes listed in root/imagenet100.txt, from an ImageNet train/val tree; 224x224.

    Layout: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (the val images sorted into class
    folders, as torchvision's ImageFolder and most CIL code expect), and the class list, one wnid per line,
    at ``class_list`` (default ``root/imagenet100.txt``; e.g. the list of CMC, Tian et al. 2019, the usual
    ImageNet-100 of contrastive and CIL papers). Class ids follow the list's order. Without the file, every
    class folder under ``root/train`` is used (a copy holding only the subset) as long as there are at most
    ``max_classes`` (100) of them, so that a full ImageNet tree is never taken for the subset by accident.
    Size: shorter side 256, centre crop 224 (the standard ImageNet test transform).
    """
    name = "imagenet_subset"
    base = data_root(root)
    layout = "root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG and a class list root/imagenet100.txt"
    if not (base / "train").is_dir():
        raise _missing(name, base / "train", layout)
    listed = Path(class_list).expanduser() if class_list is not None else base / "imagenet100.txt"
    if listed.is_file():
        classes = [row[0] for row in _read_lines(listed, name, layout)]
    elif class_list is not None:
        raise _missing(name, listed, layout)
    else:
        classes = _subfolders(base / "train")
        if len(classes) > max_classes:
            raise _missing(name, listed, f"a class list; root/train holds {len(classes)} class folders, more "
                                         f"than the subset's {max_classes}")
    train = _class_tree(base / "train", classes, name, layout)
    test = _class_tree(base / "val", classes, name, layout)
    return _dataset(name, train, test, len(classes), resize, crop)


# ---------------------------------------------------------------------------------------------------------
# registration: the config passes root and download; the loaders' other options keep their defaults


def _register(name: str, loader: Callable[..., Dataset]) -> None:
    def factory(root: str | None = None, download: bool = False) -> Dataset:
        return loader(root, download)

    factory.__doc__ = loader.__doc__
    factory.__name__ = factory.__qualname__ = name
    register_dataset(name)(factory)


for _name, _loader in {
    "image_folder": load_image_folder,
    "tiny_imagenet": load_tiny_imagenet,
    "imagenet_r": load_imagenet_r,
    "cub200": load_cub200,
    "core50": load_core50,
    "imagenet_subset": load_imagenet_subset,
}.items():
    _register(_name, _loader)
