"""Cross-check er_ace and bic against Avalanche 0.6.0's ER_ACE and BiC on the same tensors; prints a table.

The protocol of ``experiments/compare_avalanche.py`` (whose helpers this script reuses): Split-MNIST-5k, class
order 0..9, 5 experiences x 2 classes, class-IL, the same initial MLP 2x100 on both sides, SGD lr 0.1, 1 epoch,
batch 10, memory 500, 1 torch thread, seeds 0 1 2. ACC is the final average accuracy over the 5 experiences.

* er_ace vs ``ER_ACE(mem_size=500, batch_size_mem=10)``: 10 incoming + 10 replayed samples per step on both
  sides. Avalanche refills a class-balanced buffer after each experience (so nothing is replayed during the
  first), trains the first experience with plain CE, averages the two loss terms and takes the replay CE over
  all outputs; cltoolbox keeps a reservoir updated at every step (the paper's online memory), always masks the
  incoming term, sums the terms (the paper's objective) and takes the replay CE over the classes seen.
* bic vs ``BiC(mem_size=500, val_percentage=0.1, T=2, stage_2_epochs=200, lr=0.1)``: both distil with
  lambda = n_old / n_seen; Avalanche keeps an experience-balanced buffer and fits its bias layer by 200 epochs
  of SGD on its validation buffer; cltoolbox herds a class-balanced memory and fits by L-BFGS with a ridge.
  Avalanche 0.6.0's BiC needs one patch to run on torch 2.14 (``_patch_bic_scheduler``).

Run: ``python experiments/compare_avalanche_exemplar.py [--seeds 0 1 2]`` (about a minute). Last run (3 seeds):
er_ace 84.6 ± 1.7 (cltoolbox) vs 84.8 ± 1.7 (Avalanche); bic 86.4 ± 0.9 vs 86.0 ± 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_avalanche as ca  # noqa: E402

from cltoolbox.tables import mean_std  # noqa: E402


def _specs() -> dict[str, ca.Spec]:
    def er_ace(model: torch.nn.Module, kw: dict[str, Any]) -> Any:
        return ca._av()["tr"].ER_ACE(model=model, optimizer=ca._sgd(model), criterion=ca._ce(), mem_size=ca.MEMORY,
                                     batch_size_mem=ca.BATCH, **kw)

    def bic(model: torch.nn.Module, kw: dict[str, Any]) -> Any:
        _patch_bic_scheduler()
        return ca._av()["tr"].BiC(model=model, optimizer=ca._sgd(model), criterion=ca._ce(), mem_size=ca.MEMORY,
                                  val_percentage=0.1, T=2, stage_2_epochs=200, lr=0.1, **kw)

    return {
        "er_ace": ca.Spec({"name": "er_ace", "memory_size": ca.MEMORY}, "ER_ACE", f"memory {ca.MEMORY}, batch 10 + 10",
                          er_ace, streams=("split",)),
        "bic": ca.Spec({"name": "bic", "memory_size": ca.MEMORY}, "BiC", f"memory {ca.MEMORY}, val 10%, T 2", bic,
                       streams=("split",)),
    }


def _patch_bic_scheduler() -> None:
    """Avalanche 0.6.0's BiC passes ``verbose=`` to ``MultiStepLR``, which torch 2.14 no longer accepts (a
    TypeError after the first experience); drop the argument, nothing else changes."""
    import avalanche.training.plugins.bic as avbic

    if getattr(avbic.MultiStepLR, "_verbose_dropped", False):
        return
    original = avbic.MultiStepLR

    def multistep(*args: Any, verbose: Any = None, **kwargs: Any) -> Any:
        return original(*args, **kwargs)

    multistep._verbose_dropped = True
    avbic.MultiStepLR = multistep


def run_avalanche(spec: ca.Spec, stream, bm, seed: int, run_cfg: dict) -> float:
    """Avalanche's final class-IL ACC (its own evaluation: BiC's bias layers are applied inside its strategy)."""
    av = ca._av()
    ca._seed_everything(seed)
    model = ca.initial_model(run_cfg, stream, seed)
    with warnings.catch_warnings(record=True):  # its decorators re-enable DeprecationWarnings on every call
        common = dict(train_mb_size=ca.BATCH, train_epochs=ca.EPOCHS, eval_mb_size=ca.EVAL_BATCH, device="cpu",
                      evaluator=av["EvaluationPlugin"](av["accuracy_metrics"](experience=True), loggers=[]))
        strategy = spec.build(model, common)
        for exp in bm.train_stream:
            strategy.train(exp)
        metrics = strategy.eval(bm.test_stream)
    keys = sorted(k for k in metrics if k.startswith("Top1_Acc_Exp/eval_phase/test_stream/"))
    return statistics.mean(float(metrics[k]) for k in keys)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = ca.load_dataset("mnist5k")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in _specs().items():
            ours, theirs = [], []
            for seed in args.seeds:
                stream = ca.build_stream(ca.resolved_config("split", {"name": "naive"}, tmp), data, seed)
                bm = ca.avalanche_benchmark("split", stream)
                resolved = ca.resolved_config("split", spec.ours, tmp)
                run_cfg = ca.cfgmod.run_config(resolved, resolved["strategy"][0], seed)
                ours.append(ca.run_ours("split", spec, stream, seed, Path(tmp)).acc)
                theirs.append(run_avalanche(spec, stream, bm, seed, run_cfg))
            rows.append((name, spec.avalanche, spec.hparams, ours, theirs))
    print(f"Split-MNIST-5k class-IL, MLP 2x100, SGD lr 0.1, 1 epoch, batch 10, seeds {args.seeds}: ACC (%)")
    print(f"{'strategy':<10}{'Avalanche':<11}{'shared values':<30}{'cltoolbox':>14}{'Avalanche':>14}")
    for name, cls, hp, ours, theirs in rows:
        print(f"{name:<10}{cls:<11}{hp:<30}{mean_std(ours, 1, 100):>14}{mean_std(theirs, 1, 100):>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
