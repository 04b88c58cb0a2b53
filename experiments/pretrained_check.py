"""EfficientNet-Lite0 (ImageNet) features on Split-MNIST-5k, class-IL: simplecil vs fsa vs fetril, 3 seeds.

The backbone is frozen in all three runs compared here (fsa and fetril with ``adapt: none``: body adaptation
of EfficientNet on CPU is too slow for a check), so the 5,000 images are embedded once (96x96 RGB, about
30 s on 2 cores) and registered as a dataset of 1280-d features; the strategies then run through
``cltoolbox.run`` on ``mlp`` with ``hidden: []`` (features = identity, a linear head), which is the same
computation as running them on ``efficientnet_lite0`` (see experiments/pretrained_split_mnist5k.yaml).

Expected (asserted): fsa >= 0.90, fetril >= 0.80, simplecil >= 0.70, fsa - simplecil >= 0.10.

    python experiments/pretrained_check.py [--resize 96]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import cltoolbox
from cltoolbox.data import load_dataset
from cltoolbox.data.base import Dataset
from cltoolbox.models.pretrained import efficientnet_lite0
from cltoolbox.registry import register_dataset
from cltoolbox.strategies.extractor import extract_features

SEEDS = [0, 1, 2]
STRATEGIES = [
    {"name": "simplecil"},
    {"name": "fsa", "adapt": "none"},
    {"name": "fetril", "adapt": "none"},
]
THRESHOLDS = {"simplecil": 0.70, "fsa": 0.90, "fetril": 0.80}


def embed(resize: int) -> Dataset:
    data = load_dataset("mnist5k")
    torch.manual_seed(0)
    model = efficientnet_lite0(data.input_shape, data.n_classes, pretrained=True, frozen=True, resize=resize)
    start = time.perf_counter()
    ftr, fte = (extract_features(model, x, 250) for x in (data.x_train, data.x_test))  # 5,000 small images
    print(f"embedded {len(ftr) + len(fte)} images at {resize}x{resize} in {time.perf_counter() - start:.1f} s")
    return Dataset.from_tensors("mnist5k_lite0", ftr, data.y_train, fte, data.y_test, data.n_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resize", type=int, default=96)
    args = parser.parse_args()
    feats = embed(args.resize)

    @register_dataset("mnist5k_lite0")
    def mnist5k_lite0(root: str | None = None, download: bool = False) -> Dataset:
        return feats

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as out:
        for strat in STRATEGIES:
            config = {
                "name": "pretrained_check",
                "scenario": {"name": "class_incremental", "dataset": "mnist5k_lite0", "n_experiences": 5},
                "model": {"name": "mlp", "hidden": []},
                "strategy": strat,
                "train": {"epochs": 1, "batch_size": 10, "lr": 0.1},
                "seeds": SEEDS,
                "out": out,
            }
            summaries = cltoolbox.run(config, out=out, overwrite=True, quiet=True)
            results[strat["name"]] = [s["class_il"]["acc"] for s in summaries]
    print(f"{'strategy':<10} {'class-IL ACC per seed':<28} mean")
    for name, accs in results.items():
        mean = sum(accs) / len(accs)
        print(f"{name:<10} {' '.join(f'{a:.4f}' for a in accs):<28} {mean:.4f}")
    means = {k: sum(v) / len(v) for k, v in results.items()}
    for name, thr in THRESHOLDS.items():
        assert means[name] >= thr, f"{name}: {means[name]:.4f} < {thr}"
    gap = means["fsa"] - means["simplecil"]
    print(f"fsa (LDA) - simplecil (prototypes): {100 * gap:.1f} points")
    assert gap >= 0.10, f"LDA head beats prototypes by only {100 * gap:.1f} points"
    print("all checks passed")


if __name__ == "__main__":
    main()
