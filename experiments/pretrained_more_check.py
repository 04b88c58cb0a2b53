"""RanPAC, APER, EASE and SLCA vs SimpleCIL on frozen EfficientNet-Lite0 features, Split-MNIST-5k class-IL, 3 seeds.

The protocol of experiments/pretrained_check.py: the 5,000 MNIST-5k images are embedded once by the frozen
ImageNet EfficientNet-Lite0 at 96x96 (``pretrained_check.embed``) and registered as a dataset of 1280-d
features; each strategy then runs through ``cltoolbox.run`` on ``mlp`` with ``hidden: []`` (features =
identity, a linear head), the same computation as on ``efficientnet_lite0`` with ``frozen: true``
(experiments/pretrained_more_split_mnist5k.yaml). One torch thread.

Two streams: ``5x2`` (the issue's: 5 experiences of two digits) and ``6+2+2`` (a six-digit first session,
then two of two: ``first_classes: 6``), where APER's premise (a first session rich enough to adapt to the
downstream domain) holds.

Settings: the papers' defaults where the CPU allows, not tuned on the test set.
- ranpac: adapt none, M = 2000 random ReLU features, lambda chosen on a held-out 20% of each experience.
- aper: adapter on the features trained on experience 1 (the authors' SGD momentum 0.9, lr 0.01, batch 48,
  20 epochs; adapter bottleneck 64, scale 0.1).
- ease: one adapter per experience (the authors' SGD momentum 0.9, lr 0.025, weight decay 5e-4, cosine
  schedule, batch 48, 20 epochs; bottleneck 64, scale 0.1, alpha 0.1).
- ``aper_val`` / ``ease_val``: the same methods with lr, adapter scale (and EASE's alpha) chosen per stream from
  a small grid (``GRIDS``) by class-IL ACC on a validation split (``scenario.validation: 0.1``, seed 0), never
  on the test set; the chosen point is printed. With the paper's lr and scale the adapters on pooled
  features do not move (see strategies/aper.py and experiments/aper_diagnose.py), so those rows equal
  SimpleCIL.
- slca: backbone frozen (nothing for the slow learner to move), head trained per task (SGD momentum 0.9,
  lr 0.01, batch 128, 20 epochs), then classifier alignment (5 epochs x 256 samples per class, LogitNorm 0.1).

Asserted (means over seeds): ranpac - simplecil >= 0.05 and slca > simplecil on 5x2; ease_val > simplecil on
5x2; aper_val > simplecil on 6+2+2. APER does not beat SimpleCIL on 5x2 with an adapter on the features at
any grid point (printed, not asserted): two first-session digits teach it a 0-vs-1 direction that hurts the
later digits. ``--aper-film`` runs APER's SSF-like variant (FiLM inside EfficientNet, the real model, ~5 min
per seed on a CPU); ``--film-only`` skips everything else but SimpleCIL (on the cached features).
Results: experiments/results/pretrained_more.md.

    python experiments/pretrained_more_check.py [--resize 96] [--seeds 0 1 2] [--features lite0_96.pt]
    python experiments/pretrained_more_check.py --aper-film --film-only [--film-streams 5x2 6+2+2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import cltoolbox
from cltoolbox.data.base import Dataset
from cltoolbox.registry import register_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrained_check import embed  # noqa: E402  (the same embedding as the simplecil/fsa/fetril check)

SGD = {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01}
APER = {**SGD, "epochs": 20, "batch_size": 48}  # the authors' APER adapter settings (PILOT exps/aper_*.json)
EASE = {**SGD, "lr": 0.025, "weight_decay": 5e-4, "scheduler": "cosine", "epochs": 20, "batch_size": 48}
STRATEGIES = [
    {"name": "simplecil"},
    {"name": "ranpac"},
    {"name": "aper", "adapt": "adapter", "train": APER},
    {"name": "ease", "train": EASE},
    {"name": "slca", "train": {**SGD, "epochs": 20, "batch_size": 128}},
]
# chosen per stream on a validation split (10% of each experience's training data, seed 0), paper settings first
GRIDS = {
    "aper": [{"name": "aper", "adapter_scale": s, "train": {**APER, "lr": lr}}
             for lr in (0.01, 0.1, 1.0) for s in (0.1, 1.0)],
    "ease": [{"name": "ease", "adapter_scale": s, "alpha": a, "train": {**EASE, "lr": lr}}
             for lr in (0.025, 0.1, 1.0) for s in (0.1, 1.0) for a in (0.1, 1.0)],
}
# the stream (5 x 2 digits), and one with a six-digit first session (6 + 2 + 2), APER's premise
STREAMS = {"5x2": {"n_experiences": 5}, "6+2+2": {"n_experiences": 3, "first_classes": 6}}
WHICH = {"5x2": ["simplecil", "ranpac", "aper", "ease", "slca"], "6+2+2": ["simplecil", "aper", "ease"]}


def run(strategy: dict, scenario: dict, seeds: list[int], out: str, validation: float = 0.0) -> list[dict]:
    strategy = copy.deepcopy(strategy)
    train = strategy.pop("train", {})
    config = {
        "name": "pretrained_more_check",
        "scenario": {"name": "class_incremental", "dataset": "mnist5k_lite0", **scenario,
                     **({"validation": validation} if validation else {})},
        "model": {"name": "mlp", "hidden": []},
        "strategy": {**strategy, "train": train} if train else strategy,
        "train": {"epochs": 1, "batch_size": 10, "lr": 0.1},
        "seeds": seeds,
        "out": out,
    }
    return cltoolbox.run(config, out=out, overwrite=True, quiet=True)


def select(name: str, scenario: dict, out: str) -> tuple[dict, list[tuple[str, float]]]:
    """The grid point of ``name`` with the best validation class-IL ACC (seed 0); ties keep the earlier one."""
    scores = []
    for strat in GRIDS[name]:
        acc = run(strat, scenario, [0], out, validation=0.1)[0]["class_il"]["acc"]
        scores.append((describe(strat), acc))
    best = max(range(len(scores)), key=lambda i: (scores[i][1], -i))
    return GRIDS[name][best], scores


def describe(strat: dict) -> str:
    keys = [f"{k}={v}" for k, v in strat.items() if k not in ("name", "train", "adapt")]
    return " ".join([f"lr={strat['train']['lr']}", *keys])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resize", type=int, default=96)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--aper-film", action="store_true",
                        help="also run aper with adapt: film inside EfficientNet-Lite0 (~5 min per seed on a CPU)")
    parser.add_argument("--film-only", action="store_true", help="with --aper-film: run only the FiLM runs")
    parser.add_argument("--film-streams", nargs="+", default=["5x2"], choices=list(STREAMS),
                        help="streams for --aper-film (default 5x2)")
    parser.add_argument("--features", type=Path, help="a .pt file: load the embedded features, or save them there")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.features is not None and args.features.is_file():
        f = torch.load(args.features, weights_only=True)
        feats = Dataset.from_tensors("mnist5k_lite0", f["ftr"], f["ytr"], f["fte"], f["yte"], 10)
    else:
        feats = embed(args.resize)
        if args.features is not None:
            torch.save({"ftr": feats.x_train, "ytr": feats.y_train, "fte": feats.x_test, "yte": feats.y_test},
                       args.features)

    @register_dataset("mnist5k_lite0")
    def mnist5k_lite0(root: str | None = None, download: bool = False) -> Dataset:
        return feats

    results: dict[tuple[str, str], list[float]] = {}
    task_il: dict[tuple[str, str], list[float]] = {}
    seconds: dict[tuple[str, str], float] = {}
    chosen: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory() as out:
        for stream, scenario in STREAMS.items():
            if args.film_only:
                break
            todo = [(s["name"], s) for s in STRATEGIES if s["name"] in WHICH[stream]]
            for name in GRIDS:
                if name in WHICH[stream]:
                    strat, scores = select(name, scenario, out)
                    chosen[(stream, f"{name}_val")] = describe(strat)
                    print(f"[{stream}] {name} validation ACC: " + ", ".join(f"{d}: {a:.4f}" for d, a in scores),
                          flush=True)
                    todo.append((f"{name}_val", strat))
            for label, strat in todo:
                start, cpu = time.perf_counter(), time.process_time()
                summaries = run(strat, scenario, args.seeds, out)
                seconds[(stream, label)] = (time.perf_counter() - start) / len(args.seeds)
                results[(stream, label)] = [s["class_il"]["acc"] for s in summaries]
                task_il[(stream, label)] = [s["task_il"]["acc"] for s in summaries]
                print(f"[{stream}] {label}: {results[(stream, label)]} (wall {seconds[(stream, label)]:.1f} s/run, "
                      f"cpu {(time.process_time() - cpu) / len(args.seeds):.1f} s/run)", flush=True)
        for stream in args.film_streams if args.aper_film else []:
            # adaptation inside the backbone: the real model, embedded anew by every run
            if args.film_only:  # simplecil beside it, on the cached features (the same computation)
                summaries = run({"name": "simplecil"}, STREAMS[stream], args.seeds, out)
                results[(stream, "simplecil")] = [s["class_il"]["acc"] for s in summaries]
                task_il[(stream, "simplecil")] = [s["task_il"]["acc"] for s in summaries]
                seconds[(stream, "simplecil")] = 0.0
            config = {
                "name": "pretrained_more_check", "imports": ["cltoolbox.models.pretrained"],
                "scenario": {"name": "class_incremental", "dataset": "mnist5k", **STREAMS[stream]},
                "model": {"name": "efficientnet_lite0", "pretrained": True, "frozen": True, "resize": args.resize},
                "strategy": {"name": "aper", "label": "aper_film", "adapt": "film"},
                "train": {**SGD, "epochs": 5, "batch_size": 48, "eval_batch_size": 250},
                "seeds": args.seeds, "out": out,
            }
            start, cpu = time.perf_counter(), time.process_time()
            summaries = cltoolbox.run(config, out=out, overwrite=True, quiet=True)
            key = (stream, "aper_film")
            seconds[key] = (time.perf_counter() - start) / len(args.seeds)
            results[key] = [s["class_il"]["acc"] for s in summaries]
            task_il[key] = [s["task_il"]["acc"] for s in summaries]
            print(f"[{stream}] aper_film: {results[key]} (wall {seconds[key]:.1f} s/run, "
                  f"cpu {(time.process_time() - cpu) / len(args.seeds):.1f} s/run)", flush=True)

    def fmt(v: list[float]) -> str:
        return f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"

    means = {k: statistics.mean(v) for k, v in results.items()}
    print(f"\n{'stream':<7} {'strategy':<11} {'class-IL ACC per seed':<24} {'class-IL mean ± std':<20} "
          f"{'vs simplecil':<13} {'task-IL ACC':<20} s/run  setting")
    for (stream, name), accs in results.items():
        gap = 100 * (means[(stream, name)] - means[(stream, "simplecil")])
        print(f"{stream:<7} {name:<11} {' '.join(f'{a:.4f}' for a in accs):<24} {fmt(accs):<20} "
              f"{'' if name == 'simplecil' else f'{gap:+.1f}':<13} {fmt(task_il[(stream, name)]):<20} "
              f"{seconds[(stream, name)]:<6.1f} {chosen.get((stream, name), '')}")
    verdicts = []
    for key in sorted(means):
        if key[1] != "simplecil":
            won = means[key] > means[(key[0], "simplecil")]
            verdicts.append(f"[{key[0]}] {key[1]} {'beats' if won else 'does NOT beat'} simplecil")
    print("\n".join(verdicts))
    if args.film_only:
        return
    base = means[("5x2", "simplecil")]
    assert means[("5x2", "ranpac")] - base >= 0.05, "ranpac beats simplecil by less than 5 points"
    assert means[("5x2", "slca")] > base, "slca does not beat simplecil"
    assert means[("5x2", "ease_val")] > base, "ease (validation-chosen settings) does not beat simplecil"
    assert means[("6+2+2", "aper_val")] > means[("6+2+2", "simplecil")], "aper does not beat simplecil on 6+2+2"
    print("all checks passed")


if __name__ == "__main__":
    main()
