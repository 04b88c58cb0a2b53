"""Model merging as continual learning on frozen EfficientNet-Lite0 features, Split-MNIST-5k, class-IL, 3 seeds.

EfficientNet-Lite0 (ImageNet weights, offline) is frozen; the 5,000 digits are embedded once at 96x96 and
registered as a dataset of 1280-d features, so each strategy runs through ``cltoolbox.run`` on ``mlp`` with
``hidden: []`` (features = identity, then the head): the same computation as ``efficientnet_lite0`` with
``frozen: true`` (see experiments/merging_split_mnist5k.yaml). What is fine-tuned per experience and merged:
a residual bottleneck adapter (1280 -> 64 -> 1280) on the features plus the experience's head rows (cosine
head); fine-tuning the image encoder itself, as the papers do with CLIP, is out of reach on a CPU.

Compared: naive fine-tuning (the toolbox's ``naive``: the linear head, sequentially, full cross-entropy),
``task_arithmetic`` (lambda picked on 10% held out per experience), ``ties_merging`` (k = 20%, lambda 1),
``adamerging`` (layer-wise, entropy on the unlabeled test inputs of the experiences seen so far: test-time
adaptation; ``adamerging_seen`` scores them over all seen classes instead of each task's own), ``magmax``
(lambda 0.5), and ``no_task_vectors`` (task arithmetic with lambda 0: the fixed class-mean heads on the
pre-trained features, what every merge starts from). Claim checked: adamerging >= task_arithmetic >= naive.

    python experiments/merging_check.py [--seeds 0 1 2] [--only task_arithmetic adamerging] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import cltoolbox
from cltoolbox.data import load_dataset
from cltoolbox.data.base import Dataset
from cltoolbox.models.pretrained import efficientnet_lite0
from cltoolbox.registry import register_dataset
from cltoolbox.strategies.extractor import extract_features

ADAPTER = 64
STRATEGIES = {
    "naive": {"name": "naive"},
    "task_arithmetic": {"name": "task_arithmetic", "adapter": ADAPTER},
    "ties_merging": {"name": "ties_merging", "adapter": ADAPTER},
    "adamerging": {"name": "adamerging", "adapter": ADAPTER},
    "adamerging_seen": {"name": "adamerging", "adapter": ADAPTER, "entropy_over": "seen", "label": "adamerging_seen"},
    "magmax": {"name": "magmax", "adapter": ADAPTER},
    # lambda 0: the class-mean cosine heads on the pre-trained features alone (no task vector added)
    "no_task_vectors": {"name": "task_arithmetic", "adapter": ADAPTER, "lam": 0.0, "label": "no_task_vectors"},
}


def embed(resize: int, cache: Path | None) -> Dataset:
    data = load_dataset("mnist5k")
    if cache is not None and cache.exists():
        ftr, fte = torch.load(cache, weights_only=True)  # our own tensors, written below
    else:
        torch.manual_seed(0)
        model = efficientnet_lite0(data.input_shape, data.n_classes, pretrained=True, frozen=True, resize=resize)
        start = time.perf_counter()
        ftr, fte = (extract_features(model, x, 250) for x in (data.x_train, data.x_test))
        print(f"embedded {len(ftr) + len(fte)} images at {resize}x{resize} in {time.perf_counter() - start:.1f} s")
        if cache is not None:
            torch.save((ftr, fte), cache)
    return Dataset.from_tensors("mnist5k_lite0", ftr, data.y_train, fte, data.y_test, data.n_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--head-scale", type=float, default=16.0)
    parser.add_argument("--adapter", type=int, default=ADAPTER)
    parser.add_argument("--resize", type=int, default=96)
    parser.add_argument("--cache", type=Path, default=None, help="file to keep the embedded features in")
    parser.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    feats = embed(args.resize, args.cache)

    @register_dataset("mnist5k_lite0", override=True)
    def mnist5k_lite0(root: str | None = None, download: bool = False) -> Dataset:
        return feats

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        for name in args.only:
            config = {
                "name": "merging_check",
                "scenario": {"name": "class_incremental", "dataset": "mnist5k_lite0", "n_experiences": 5},
                "model": {"name": "mlp", "hidden": []},
                "strategy": STRATEGIES[name] if name == "naive" else
                {**STRATEGIES[name], "head_scale": args.head_scale, "adapter": args.adapter},
                "train": {"epochs": args.epochs, "batch_size": 32, "lr": args.lr, "momentum": args.momentum},
                "seeds": args.seeds,
            }
            t0, c0 = time.perf_counter(), time.process_time()
            summaries = cltoolbox.run(config, out=out, overwrite=True, quiet=True)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            accs = torch.tensor([s["class_il"]["acc"] for s in summaries])
            forg = torch.tensor([s["class_il"]["forgetting"] for s in summaries])
            mem = summaries[0]["cost"]["memory_bytes"]
            rows.append((name, accs, forg, mem, wall, cpu))
            if name == "adamerging" and args.seeds:
                m = json.loads((Path(summaries[0]["run_dir"]) / "metrics.json").read_text())
                last = [r for r in m["strategy"]["adamerging_coefficients"] if r["merged_after"] == 4]
                print(f"adamerging coefficients after the last experience, seed {args.seeds[0]} "
                      f"(metrics.json strategy.adamerging_coefficients, "
                      f"unlabeled={m['strategy']['adamerging_unlabeled']}):")
                for r in last:
                    print(f"  task {r['task']} {r['layer']:<22} {r['coefficient']:.3f}")
            if name == "task_arithmetic":
                lams = [json.loads((Path(s["run_dir"]) / "metrics.json").read_text())["strategy"]
                        ["task_arithmetic_lambda"] for s in summaries]
                print(f"task_arithmetic lambda per merge and seed: {lams}")
    print(f"\nSplit-MNIST-5k class-IL, frozen EfficientNet-Lite0 (96 px), adapter {ADAPTER}, "
          f"{args.epochs} epochs, seeds {args.seeds}")
    print(f"{'strategy':<16} {'ACC mean ± std':<16} {'per seed':<24} {'forgetting':<11} {'memory MB':<10} "
          f"{'wall s':<7} cpu s")
    for name, accs, forg, mem, wall, cpu in rows:
        std = float(accs.std()) if len(accs) > 1 else 0.0
        print(f"{name:<16} {float(accs.mean()):.3f} ± {std:.3f}    {' '.join(f'{a:.3f}' for a in accs):<24} "
              f"{float(forg.mean()):<11.3f} {mem / 2**20:<10.2f} {wall:<7.1f} {cpu:.1f}")
    means = {name: float(accs.mean()) for name, accs, *_ in rows}
    if {"naive", "task_arithmetic", "adamerging"} <= means.keys():
        ok = means["adamerging"] >= means["task_arithmetic"] >= means["naive"]
        print(f"adamerging >= task_arithmetic >= naive: {ok}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
