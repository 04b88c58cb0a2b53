"""bf16 autocast vs float32 for er and derpp on Split-MNIST-5k (issue 12), 3 seeds, side by side.

    python experiments/precision_check.py                 # er + derpp, seeds 0 1 2
    python experiments/precision_check.py --seeds 0       # shorter

Each strategy runs with its reference config: er from experiments/quickstart.yaml (MLP 2x400, 2 epochs),
derpp from experiments/derpp_split_mnist5k.yaml (MLP 2x100, 1 epoch, alpha 1, beta 0.5); batch 10, SGD 0.1.
Runs on CPU (bf16 autocast works there; 16-mixed needs CUDA). Prints per seed the final class-IL ACC under
each precision, the mean and its difference (the claim: within 2 points), and wall and CPU time per run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cltoolbox
from cltoolbox.config import load_yaml

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {"er": "quickstart.yaml", "derpp": "derpp_split_mnist5k.yaml"}  # the reference config of each


def config(out: str, name: str, seed: int, precision) -> dict:
    raw = load_yaml(ROOT / "experiments" / STRATEGIES[name])
    strategy = next(s for s in raw["strategy"] if s["name"] == name)
    return {**raw, "strategy": strategy, "train": {**raw["train"], "device": "cpu", "precision": precision},
            "seeds": [seed], "out": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    args = ap.parse_args()
    print(f"{'strategy':8} {'seed':>4} {'fp32 ACC':>9} {'bf16 ACC':>9} {'fp32 wall/cpu s':>16} {'bf16 wall/cpu s':>16}")
    for name in args.strategies:
        accs: dict[str, list[float]] = {"32": [], "bf16": []}
        for seed in args.seeds:
            row = {}
            for prec in (32, "bf16"):
                with tempfile.TemporaryDirectory() as out:
                    t0, c0 = time.perf_counter(), time.process_time()
                    res = cltoolbox.run(config(out, name, seed, prec), quiet=True)[0]
                    row[str(prec)] = (res["class_il"]["acc"], time.perf_counter() - t0, time.process_time() - c0)
                    accs[str(prec)].append(res["class_il"]["acc"])
            a, b = row["32"], row["bf16"]
            print(f"{name:8} {seed:>4} {a[0]:9.4f} {b[0]:9.4f} {a[1]:8.1f}/{a[2]:<7.1f} {b[1]:8.1f}/{b[2]:<7.1f}")
        m32, m16 = statistics.mean(accs["32"]), statistics.mean(accs["bf16"])
        print(f"{name:8} mean {m32:9.4f} {m16:9.4f}   bf16 - fp32 = {100 * (m16 - m32):+.2f} points "
              f"({'within' if abs(m16 - m32) <= 0.02 else 'NOT within'} 2 points)")


if __name__ == "__main__":
    main()
