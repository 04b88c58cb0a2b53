"""Write a synthetic image dataset in the ``image_folder`` layout (``root/train/<class>/*.jpg``, ``root/test/...``).

    python experiments/synthetic_images.py ROOT [--classes 200] [--train 30000] [--test 3000] [--size 224]

Each class is a smooth colour pattern of its own (sinusoids of class-specific frequencies), each image that
pattern shifted and with pixel noise, saved as JPEG (quality 90, ~19 KB at 224 px, ImageNet-R-like sizes).
The classes are learnable, so a benchmark on them trains a real model. Images are written by two processes;
an existing complete tree (a ``COMPLETE`` marker) is reused as is.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def class_pattern(c: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) * (224.0 / size)
    f1, f2, f3 = (c % 14 + 1) / 40, (c // 14 + 1) / 40, 0.05 * (1 + c % 5)
    return np.stack([127 + 100 * np.sin(xx * f1), 127 + 100 * np.cos(yy * f2),
                     127 + 100 * np.sin((xx + yy) * f3)], -1)


def _write(job: tuple[str, int, int, int, int]) -> None:
    from PIL import Image

    folder, c, first, count, size = job
    rng = np.random.default_rng(1000 * c + first)
    base = class_pattern(c, size)
    os.makedirs(folder, exist_ok=True)
    for i in range(first, first + count):
        shifted = np.roll(base, (int(rng.integers(size)), int(rng.integers(size))), axis=(0, 1))
        img = (shifted + rng.normal(0, 12, shifted.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.jpg"), "JPEG", quality=90)


def make_image_folder(root: str | Path, classes: int = 200, train: int = 30_000, test: int = 3_000,
                      size: int = 224, processes: int = 2) -> Path:
    """The tree under ``root`` (made once; reused when complete). Returns ``root``."""
    root = Path(root)
    marker = root / "COMPLETE"
    spec = f"{classes} {train} {test} {size}\n"
    if marker.exists() and marker.read_text() == spec:
        return root
    jobs = []
    for split, n in (("train", train), ("test", test)):
        per, extra = divmod(n, classes)
        offset = 0 if split == "train" else 10**5
        for c in range(classes):
            jobs.append((str(root / split / f"class_{c:03d}"), c, offset, per + (c < extra), size))
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_write, jobs, chunksize=4))
    marker.write_text(spec)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--train", type=int, default=30_000)
    ap.add_argument("--test", type=int, default=3_000)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    print(make_image_folder(a.root, a.classes, a.train, a.test, a.size))


if __name__ == "__main__":
    main()
