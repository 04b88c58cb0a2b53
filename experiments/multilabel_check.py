"""Multi-label class-incremental learning on MNIST-5k digit grids (scenario multi_label, dataset mnist5k_grid).

Stream: 2x2 grids of 2-4 real MNIST-5k digits (56x56, 4,000 train / 1,000 test grids), the 10 digits split into
5 experiences of 2 classes (B0-C2); the KRT/MULTI-LANE protocol: experience t trains on every grid holding one
of its digits, annotated with its digits only; after each experience, mAP/CF1/OF1 over the digits seen so far
on the test grids holding one of them (``cltoolbox.multilabel``). 3 seeds, one torch thread.

1. ``naive`` vs ``er`` (reservoir, 500 grids, each kept with the labels it was annotated with) on an MLP
   (2x400), SGD lr 0.05, batch 32, 3 epochs; sigmoid/BCE head (the loop's default on multi-label streams).
   Asserted: er's final mAP >= naive's + 0.10 (means over seeds).
2. ``l2p`` (multi-label head: the loop's BCE, its usual train mask) vs ``multi_lane`` on the frozen ViT
   pre-trained on single MNIST-5k digits (experiments/vit_pretrain_mnist5k.yaml, run first if missing: the
   train split only). The grid is 2x2 cells of 28 px and the ViT's 4x4 patch grid per 28 px digit, so its
   position embeddings are tiled once per cell (each cell sees the positions it was pre-trained with) rather
   than interpolated to 8x8; both methods get this same backbone. Adam lr 0.01, batch 32, 3 epochs (the
   prompting recipe's settings, experiments/prompting_digits.yaml).
   The claim checked: multi_lane's final mAP > l2p's (printed as PASS/FAIL, not asserted: see the results).
   ``multi_lane_9ep`` trains the lanes 9 epochs instead of 3: a lane pass is several times cheaper than L2P's
   (a few summary tokens instead of every patch token plus 25 prompt tokens), so this is still less CPU than
   l2p's 3 epochs; it compares the two at a matched (lower) training budget.
Every run records time to target (``train.time_to_target: {target: 0.8, every: 20}``, mAP on the experience's
own test grids); the table prints how many experiences reached it and their total training CPU seconds.

Results (3 seeds, one thread, 2-core machine shared with other jobs (load ~10): ~4 min for the MLP part, ~28 min
for the ViT part; CPU s per run are the runs' own process CPU seconds):

strategy       final mAP      avg mAP          CF1          OF1  forgetting   CPU s  reached  CPU s to target
naive          48.8 ± 1.5   66.2 ± 0.2   10.6 ± 0.6   23.0 ± 1.0  31.2 ± 1.9     4.6    5.0/5        0.7 ± 0.0
er             65.4 ± 1.5   79.2 ± 1.0   24.6 ± 1.3   21.9 ± 2.9  19.3 ± 1.0     7.1    5.0/5        1.3 ± 0.2
l2p            65.5 ± 1.1   74.5 ± 0.5   56.7 ± 0.2   55.2 ± 0.5   9.8 ± 1.8    84.3    5.0/5       52.3 ± 2.9
multi_lane     55.4 ± 2.5   67.3 ± 2.1   52.2 ± 0.3   51.3 ± 0.3  10.2 ± 0.5    27.4    4.3/5       13.2 ± 2.1
multi_lane_9ep 66.6 ± 0.7   76.0 ± 1.1   56.0 ± 0.7   55.0 ± 1.2   8.4 ± 0.9    72.7    5.0/5       45.4 ± 0.6
multi_lane_lr0.03 63.0 ± 2.6 73.4 ± 2.7 55.4 ± 1.0  53.4 ± 0.2   8.6 ± 1.0    25.9    5.0/5       13.6 ± 0.7
lr selection, validation final mAP (seed 0): l2p_lr0.01 0.309, l2p_lr0.03 0.304, multi_lane_lr0.01 0.243,
multi_lane_lr0.03 0.285
er - naive final mAP: +16.6 points (claim >= +10): PASS
multi_lane - l2p final mAP: -10.1 points (claim > 0): FAIL
each at its validation-selected lr (multi_lane_lr0.03 vs l2p): -2.5 points (claim > 0): FAIL
multi_lane with 9 epochs (73 CPU s per run, l2p with 3: 84) - l2p final mAP: +1.1 points

Final mAP per seed: l2p 0.666 0.644 0.656; multi_lane 0.553 0.580 0.530; multi_lane_9ep 0.660 0.674 0.665;
multi_lane_lr0.03 0.659 0.619 0.611.
The Adam lr of each ViT method is also chosen from {0.01, 0.03} on held-out training data (scenario.validation: 0.2,
partial labels, seed 0; the test sets are not looked at; a grid held out in one experience may train in another
under that one's labels): l2p keeps 0.01, multi_lane takes 0.03, and runs again on the test protocol. At equal
epochs the claim "multi_lane beats l2p" does not hold here (-10.1 points at the shared lr, -2.5 at each method's
selected lr, where multi_lane uses a third of l2p's CPU): a lane sees 16 summary tokens (convex combinations of the
64 patch embeddings) where L2P's prompts attend to every patch in every block, and a lane is a weaker learner per
epoch (first-experience mAP 0.92 vs 0.95; the last lane 0.41 vs 0.62). Lanes never change once trained, so their
"forgetting" (~10%) is entirely the growing test pool: each later step adds test grids that hold none of a lane's
classes, which that lane never saw in training (MLCIL trains experience t only on images holding one of its
classes). At a matched, lower training budget (9 lane epochs, 73 vs 84 CPU s) multi_lane is ahead by 1.1 points on
the mean (2 of 3 seeds), within about one standard deviation. multi_lane's defaults (16 selectors drawn N(0, 1))
were fixed after trying selector init, count, summarise_at and lr on seed 0's first two experiences of this test
protocol; at lr 0.01 those variants reached 0.61-0.72 seen mAP after two experiences, l2p 0.785.

    python experiments/multilabel_check.py [--seeds 0 1 2] [--out runs/multilabel_check] [--part mlp|vit|both]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import cltoolbox

PRETRAIN = Path("runs/vit_pretrain_mnist5k/pretrain/class_incremental-mnist5k/seed_0/checkpoint/state.pt")
SCENARIO = {"name": "multi_label", "dataset": "mnist5k_grid", "n_experiences": 5}
TTT = {"target": 0.8, "every": 20}


def tiled_backbone(out: Path) -> Path:
    """The MNIST-5k ViT with its 4x4 position embeddings repeated over the 2x2 grid of cells (8x8 patches)."""
    path = out / "vit_mnist5k_tiled56.pt"
    if path.exists():
        return path
    if not PRETRAIN.exists():
        print("pre-training the ViT on single MNIST-5k digits (experiments/vit_pretrain_mnist5k.yaml) ...")
        cltoolbox.run("experiments/vit_pretrain_mnist5k.yaml", quiet=True, resume=True)
    state = torch.load(PRETRAIN, weights_only=True)["learner"]["model"]
    back = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    pos = back["pos_embed"]  # (1, 1 + 16, d): [CLS] then the 4x4 grid of one 28 px digit
    side = int((pos.shape[1] - 1) ** 0.5)
    grid = pos[:, 1:].reshape(1, side, side, -1).repeat(1, 2, 2, 1).reshape(1, 4 * side * side, -1)
    back["pos_embed"] = torch.cat((pos[:, :1], grid), 1)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(back, path)
    return path


LRS = (0.01, 0.03)


def vit_model(out: Path) -> dict:
    return {"name": "vit", "patch_size": 7, "embed_dim": 64, "depth": 4, "num_heads": 4, "img_size": 56,
            "weights": str(tiled_backbone(out))}


def select_lr(out: Path) -> dict[str, float]:
    """Each ViT method's Adam lr from LRS, by final mAP on held-out training data (scenario.validation: 0.2 of
    each experience's training grids, with their partial labels; seed 0); the test sets are not looked at."""
    cfg = {"name": "multilabel_vit_lr_selection", "scenario": {**SCENARIO, "validation": 0.2}, "model": vit_model(out),
           "strategy": [{"name": n, "label": f"{n}_lr{lr}", "train": {"lr": lr}} for n in ("l2p", "multi_lane")
                        for lr in LRS],
           "train": {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.01}, "seeds": [0], "out": str(out)}
    val = {s["labels"]["strategy"]: s["multi_label"]["map"] for s in cltoolbox.run(cfg, quiet=True, resume=True)}
    print("lr selection, validation final mAP (seed 0): " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
    return {n: max(LRS, key=lambda lr: val[f"{n}_lr{lr}"]) for n in ("l2p", "multi_lane")}


def configs(out: Path, seeds: list[int], part: str) -> list[dict]:
    runs = []
    if part in ("mlp", "both"):
        runs.append({
            "name": "multilabel_mlp", "scenario": SCENARIO, "model": {"name": "mlp", "hidden": [400, 400]},
            "strategy": [{"name": "naive"}, {"name": "er", "memory_size": 500}],
            "train": {"epochs": 3, "batch_size": 32, "lr": 0.05, "time_to_target": TTT},
            "seeds": seeds, "out": str(out),
        })
    if part in ("vit", "both"):
        lr = select_lr(out)
        tuned = [{"name": n, "label": f"{n}_lr{lr[n]}", "train": {"lr": lr[n]}} for n in ("l2p", "multi_lane")
                 if lr[n] != 0.01]  # 0.01 is the shared setting, run above under the plain name
        runs.append({
            "name": "multilabel_vit", "scenario": SCENARIO, "model": vit_model(out),
            "strategy": [{"name": "l2p"}, {"name": "multi_lane"},
                         {"name": "multi_lane", "label": "multi_lane_9ep", "train": {"epochs": 9}}, *tuned],
            "train": {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.01, "time_to_target": TTT},
            "seeds": seeds, "out": str(out),
        })
    return runs


def ms(values: list[float], scale: float = 100.0) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "n/a"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/multilabel_check")
    ap.add_argument("--part", choices=["mlp", "vit", "both"], default="both")
    args = ap.parse_args()
    out = Path(args.out)
    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for cfg in configs(out, args.seeds, args.part):
        for s in cltoolbox.run(cfg, quiet=True, resume=True):  # finished runs are read, not rerun
            results.setdefault(s["labels"]["strategy"], []).append(s)
    header = (f"{'strategy':<17} {'seeds':>5} {'final mAP':>12} {'avg mAP':>12} {'CF1':>12} {'OF1':>12} "
              f"{'forgetting':>11} {'CPU s':>7} {'reached':>8} {'CPU s to target':>16}")
    lines = [header, "-" * len(header)]
    final = {}
    for name, runs in results.items():
        ml = [r["multi_label"] for r in runs]
        final[name] = statistics.mean(m["map"] for m in ml)
        ttt = [r["time_to_target"] for r in runs]
        reached = f"{statistics.mean(t['n_reached'] for t in ttt):.1f}/{ttt[0]['n_experiences']}"
        lines.append(f"{name:<17} {len(runs):>5} {ms([m['map'] for m in ml]):>12} {ms([m['avg_map'] for m in ml]):>12} "
                     f"{ms([m['cf1'] for m in ml]):>12} {ms([m['of1'] for m in ml]):>12} "
                     f"{ms([r['class_il']['forgetting'] for r in runs]):>11} "
                     f"{statistics.mean(r['cost']['cpu_s'] for r in runs):>7.1f} {reached:>8} "
                     f"{ms([t['total_cpu_s'] for t in ttt], 1.0):>16}")
    print("\n".join(lines))
    print("(mAP, CF1, OF1, forgetting in %; forgetting of the per-experience mAP matrix; CPU s per run; "
          f"time to target: mAP >= {TTT['target']} on the experience's own test grids, checked every "
          f"{TTT['every']} steps, experiences that reached it and their summed training CPU s)")
    if "naive" in final and "er" in final:
        gap = final["er"] - final["naive"]
        print(f"er - naive final mAP: {gap * 100:+.1f} points (claim >= +10): {'PASS' if gap >= 0.10 else 'FAIL'}")
        assert gap >= 0.10, "er does not beat naive by 10 mAP points"
    if "l2p" in final and "multi_lane" in final:
        gap = final["multi_lane"] - final["l2p"]
        print(f"multi_lane - l2p final mAP: {gap * 100:+.1f} points (claim > 0): {'PASS' if gap > 0 else 'FAIL'}")
    sel = {n: next((k for k in final if k.startswith(f"{n}_lr")), n) for n in ("l2p", "multi_lane")}
    if sel != {"l2p": "l2p", "multi_lane": "multi_lane"} and all(v in final for v in sel.values()):
        gap = final[sel["multi_lane"]] - final[sel["l2p"]]
        print(f"each at its validation-selected lr ({sel['multi_lane']} vs {sel['l2p']}): {gap * 100:+.1f} points "
              f"(claim > 0): {'PASS' if gap > 0 else 'FAIL'}")
    if "l2p" in final and "multi_lane_9ep" in final:
        gap = final["multi_lane_9ep"] - final["l2p"]
        cpu = {k: statistics.mean(r["cost"]["cpu_s"] for r in results[k]) for k in ("l2p", "multi_lane_9ep")}
        print(f"multi_lane with 9 epochs ({cpu['multi_lane_9ep']:.0f} CPU s per run, l2p with 3: {cpu['l2p']:.0f}) "
              f"- l2p final mAP: {gap * 100:+.1f} points")
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
