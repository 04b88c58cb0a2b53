"""Multi-label datasets: every sample carries a multi-hot label row over the dataset's classes.

A multi-label :class:`~cltoolbox.data.base.Dataset` is an ordinary one whose sources hold ``labels`` of shape
(N, n_classes), int64 0/1 (known without decoding, as the source contract asks). Scenario ``multi_label``
(``scenarios/multi_label.py``) splits such a dataset into experiences.

- ``mnist5k_grid`` / ``digits_grid``: real digits placed in a 2x2 grid of cells (MNIST-5k: 28 px cells,
  56x56 images; sklearn digits: 8 px cells, 16x16), 2 to 4 cells filled, the others blank (black); the label
  row marks every digit class present. Train grids use the base set's train digits, test grids its test digits,
  as many grids as base samples; drawn from a fixed seed (0), so every run seed sees the same images, as with
  the embedded sets' fixed split. ``digit_grids`` builds other sizes and seeds.
- ``voc_multilabel``: PASCAL VOC (``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/*.txt``) at a
  local root, the 20 VOC classes; objects marked ``difficult`` are left out of the labels.
- ``coco_multilabel``: MS-COCO (``annotations/instances_{train,val}<year>.json``, ``{train,val}<year>/``) at a
  local root, its 80 categories in category-id order; images without any annotation are left out.
Both file-backed sets are read with ``xml.etree`` / ``json`` only, never downloaded, and resized to 224x224
(the whole image: a centre crop could cut objects away).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from cltoolbox.data.base import Dataset
from cltoolbox.data.source import ImageFiles, Source, TensorSource, check_files
from cltoolbox.errors import ConfigError, DataMissingError
from cltoolbox.registry import register_dataset

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_multi_label(labels: torch.Tensor) -> bool:
    return labels.dim() == 2


def _grid_source(base: Source, n: int, grid: int, min_digits: int, max_digits: int, gen: torch.Generator,
                 key: str) -> TensorSource:
    """``n`` grids of ``grid`` x ``grid`` cells from the samples of ``base`` (single-channel float images)."""
    x = base.fetch(torch.arange(len(base)))
    if x.dim() != 4:
        raise ConfigError(f"digit grids need image samples (N, C, H, W); {key} has shape {tuple(x.shape)}")
    lo, hi = float(x.min()), float(x.max())
    # stored as uint8 in [lo, hi]; the source's mean/std turn it back into the base set's own normalisation
    u8 = ((x - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8)
    N, C, H, W = u8.shape
    cells = grid * grid
    k = torch.randint(min_digits, max_digits + 1, (n,), generator=gen)
    slot_rank = torch.rand(n, cells, generator=gen).argsort(1).argsort(1)  # a random order of the cells
    filled = slot_rank < k[:, None]  # (n, cells): the first k cells of that order hold a digit
    pick = torch.randint(N, (n, cells), generator=gen)
    out = torch.zeros(n, C, grid * H, grid * W, dtype=torch.uint8)
    n_classes = int(base.labels.max()) + 1
    labels = torch.zeros(n, n_classes, dtype=torch.int64)
    rows = torch.arange(n)
    for c in range(cells):
        r, col = divmod(c, grid)
        sel = rows[filled[:, c]]
        out[sel, :, r * H : (r + 1) * H, col * W : (col + 1) * W] = u8[pick[sel, c]]
        labels[sel, base.labels[pick[sel, c]]] = 1
    scale = hi - lo
    return TensorSource(out, labels, key, mean=[-lo / scale] * C, std=[1 / scale] * C)


def digit_grids(base: Dataset, grid: int = 2, min_digits: int = 2, max_digits: int = 4, n_train: int | None = None,
                n_test: int | None = None, seed: int = 0, name: str | None = None) -> Dataset:
    """A multi-label dataset of ``grid`` x ``grid`` grids holding ``min_digits``..``max_digits`` samples of a
    single-label image dataset ``base`` (blank cells are black); deterministic for a given ``seed``."""
    if not 1 <= min_digits <= max_digits <= grid * grid:
        raise ConfigError(f"digit grids: need 1 <= min_digits <= max_digits <= {grid * grid} cells, got "
                          f"{min_digits}..{max_digits}")
    gen = torch.Generator().manual_seed(seed)
    name = name or f"{base.name}_grid"
    train = _grid_source(base.train, n_train or len(base.train), grid, min_digits, max_digits, gen, f"{name}/train")
    test = _grid_source(base.test, n_test or len(base.test), grid, min_digits, max_digits, gen, f"{name}/test")
    return Dataset(name, train, test, base.n_classes)


@register_dataset("mnist5k_grid")
def mnist5k_grid(root: str | None = None, download: bool = False) -> Dataset:
    """Multi-label: 2x2 grids of 2-4 MNIST-5k digits (1x56x56, multi-hot over 10 digits, 4,000/1,000); offline."""
    from cltoolbox.data.sources import mnist5k

    return digit_grids(mnist5k(), name="mnist5k_grid")


@register_dataset("digits_grid")
def digits_grid(root: str | None = None, download: bool = False) -> Dataset:
    """Multi-label: 2x2 grids of 2-4 sklearn 8x8 digits (1x16x16, multi-hot over 10 digits); offline."""
    from cltoolbox.data.sources import digits

    return digit_grids(digits(), name="digits_grid")


# -- file-backed: PASCAL VOC and MS-COCO ------------------------------------------------------------------
def _root(root: str | None) -> Path:
    from cltoolbox.data.catalogue import data_root as catalogue_root

    return catalogue_root(root)


def _multi_hot(label_sets: list[set[int]], n_classes: int) -> torch.Tensor:
    y = torch.zeros(len(label_sets), n_classes, dtype=torch.int64)
    for i, s in enumerate(label_sets):
        y[i, sorted(s)] = 1
    return y


def _voc_split(base: Path, names: tuple[str, ...]) -> list[str]:
    for n in names:
        f = base / "ImageSets" / "Main" / f"{n}.txt"
        if f.is_file():
            return [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
    raise DataMissingError(f"dataset 'voc_multilabel': none of {', '.join(n + '.txt' for n in names)} in "
                           f"{base / 'ImageSets' / 'Main'}; set scenario.root to a VOC year folder (e.g. VOC2007)")


def _voc_labels(base: Path, image_id: str) -> set[int]:
    path = base / "Annotations" / f"{image_id}.xml"
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as e:
        raise DataMissingError(f"dataset 'voc_multilabel': annotation {str(path)!r} is missing or unreadable "
                               f"({type(e).__name__}); restore it or remove {image_id} from the split file") from e
    out = set()
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DataMissingError(f"dataset 'voc_multilabel': {str(path)!r} names class {name!r}, not one of the "
                                   "20 VOC classes; fix the annotation")
        if (obj.findtext("difficult") or "0").strip() != "1":
            out.add(VOC_CLASSES.index(name))
    return out


def load_voc(root: str | None, download: bool = False, resize: int = 224) -> Dataset:
    """PASCAL VOC at ``root`` (a year folder such as ``VOCdevkit/VOC2007``, or a folder holding one): train =
    ``ImageSets/Main/trainval.txt`` (else ``train.txt``), test = ``test.txt`` (else ``val.txt``)."""
    r = _root(root)
    candidates = [r, *sorted(p for p in r.glob("VOC*") if p.is_dir()), *sorted(r.glob("VOCdevkit/VOC*"))]
    base = next((p for p in candidates if (p / "JPEGImages").is_dir() and (p / "Annotations").is_dir()), None)
    if base is None:
        raise DataMissingError(f"dataset 'voc_multilabel': no JPEGImages/ and Annotations/ under {str(r)!r}; set "
                               "scenario.root to a VOC year folder (cltoolbox does not download it)")
    sources = []
    for part, names in (("train", ("trainval", "train")), ("test", ("test", "val"))):
        ids = _voc_split(base, names)
        paths = [str(base / "JPEGImages" / f"{i}.jpg") for i in ids]
        check_files(paths, "voc_multilabel", "JPEGImages/<id>.jpg for every id of the split file")
        y = _multi_hot([_voc_labels(base, i) for i in ids], len(VOC_CLASSES))
        sources.append(ImageFiles(paths, y, f"voc_multilabel/{part}", resize, None, 3, IMAGENET_MEAN, IMAGENET_STD))
    return Dataset("voc_multilabel", sources[0], sources[1], len(VOC_CLASSES))


def _coco_part(r: Path, part: str, categories: list[int] | None, resize: int) -> tuple[ImageFiles, list[int]]:
    files = sorted((r / "annotations").glob(f"instances_{part}*.json"))
    if not files:
        raise DataMissingError(f"dataset 'coco_multilabel': no annotations/instances_{part}<year>.json under "
                               f"{str(r)!r}; set scenario.root to the COCO folder (cltoolbox does not download it)")
    path = files[-1]
    try:
        blob = json.loads(path.read_text())
        images = {int(im["id"]): im["file_name"] for im in blob["images"]}
        cats = sorted(int(c["id"]) for c in blob["categories"]) if categories is None else categories
        labels: dict[int, set[int]] = {}
        index = {c: i for i, c in enumerate(cats)}
        for a in blob["annotations"]:
            if int(a["category_id"]) not in index:
                raise DataMissingError(f"dataset 'coco_multilabel': {str(path)!r} has category "
                                       f"{a['category_id']}, absent from the train categories; fix the file")
            labels.setdefault(int(a["image_id"]), set()).add(index[int(a["category_id"])])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataMissingError(f"dataset 'coco_multilabel': {str(path)!r} is not a COCO instances file "
                               f"({type(e).__name__}: {e}); restore it") from e
    ids = sorted(i for i in labels if i in images)
    folder = r / path.stem.removeprefix("instances_")
    paths = [str(folder / images[i]) for i in ids]
    check_files(paths, "coco_multilabel", f"{folder.name}/<file_name> for every annotated image")
    y = _multi_hot([labels[i] for i in ids], len(cats))
    return ImageFiles(paths, y, f"coco_multilabel/{part}", resize, None, 3, IMAGENET_MEAN, IMAGENET_STD), cats


def load_coco(root: str | None, download: bool = False, resize: int = 224) -> Dataset:
    """MS-COCO at ``root``: ``annotations/instances_train<year>.json`` + ``train<year>/`` for training,
    ``instances_val<year>.json`` + ``val<year>/`` for testing; classes = the train file's category ids, sorted."""
    r = _root(root)
    if not (r / "annotations").is_dir() and (r / "coco" / "annotations").is_dir():
        r = r / "coco"
    train, cats = _coco_part(r, "train", None, resize)
    test, _ = _coco_part(r, "val", cats, resize)
    return Dataset("coco_multilabel", train, test, len(cats))


@register_dataset("voc_multilabel")
def voc_multilabel(root: str | None = None, download: bool = False) -> Dataset:
    """Multi-label PASCAL VOC (20 classes) from a local root: JPEGImages, Annotations/*.xml, ImageSets/Main."""
    return load_voc(root, download)


@register_dataset("coco_multilabel")
def coco_multilabel(root: str | None = None, download: bool = False) -> Dataset:
    """Multi-label MS-COCO (80 classes) from a local root: annotations/instances_*.json and image folders."""
    return load_coco(root, download)
