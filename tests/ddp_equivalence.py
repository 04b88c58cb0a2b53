"""Helper of tests/test_distributed.py (run as a script, one process or several under torchrun's environment):
trains each strategy named on the command line (``name`` or ``name@{json settings}``) on a tiny digits stream and
prints one JSON line per strategy with this rank's final class-IL accuracies, the sum of its weights and its plugin
state's checksum."""

from __future__ import annotations

import json
import sys

import torch

from cltoolbox import config as cfgmod
from cltoolbox import distributed
from cltoolbox.build import build_model, build_plugins, build_stream
from cltoolbox.data import load_dataset
from cltoolbox.evaluate import History, evaluate_stream
from cltoolbox.loop import Learner
from cltoolbox.registry import STRATEGIES, import_plugins


def checksum(state) -> float:
    if isinstance(state, torch.Tensor):
        return float(state.double().sum()) if state.is_floating_point() or state.dtype in (torch.int64, torch.int32) \
            else float(state.long().sum())
    if isinstance(state, dict):
        return sum(checksum(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(checksum(v) for v in state)
    return float(state) if isinstance(state, (int, float)) else 0.0


def main() -> None:
    torch.set_num_threads(1)
    import_plugins([])
    d = distributed.init_from_env("cpu")
    data = load_dataset("digits")
    for arg in sys.argv[1:]:  # a strategy name, or name@{"param": value, ...} for other settings than its tests'
        name, _, extra = arg.partition("@")
        settings = json.loads(extra or "{}")
        model = settings.pop("model", None)  # the backbone, when the settings need another than the test one
        train = {"epochs": 1, "batch_size": 16, "lr": 0.05, **settings.pop("train", {})}
        entry = STRATEGIES.get(name)
        cfg = cfgmod.validate({
            "name": "x", "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 3,
                                      "first_classes": 4},
            "model": model or entry.test_model or {"name": "mlp", "hidden": [32]},
            "strategy": {"name": name, **entry.test_params, **settings},
            "train": train})
        run_cfg = cfgmod.run_config(cfg, cfg["strategy"][0], 0)
        stream = build_stream(run_cfg, data, 0)
        torch.manual_seed(0)
        learner = Learner(build_model(run_cfg, stream), build_plugins(run_cfg["strategy"]),
                          cfgmod.train_config(run_cfg), seed=0)
        stream = stream.to(learner.device)
        history = History(len(stream), stream.n_classes, len(stream.eval_experiences))
        learner.fit(stream, on_experience_end=lambda lrn, e, s=stream, h=history: evaluate_stream(lrn, s, e.index, h))
        weights = sum(float(p.detach().double().sum()) for p in learner.model.parameters())
        print(json.dumps({"rank": d.rank if d else 0, "strategy": arg,
                          "acc": history.matrix("class_il")[-1].tolist(), "weights": weights,
                          "plugins": checksum([p.state_dict() for p in learner.plugins])}), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
