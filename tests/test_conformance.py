"""One contract, checked on every registered strategy and scenario (built-in or added later).

Strategies: hooks in the documented order, the same seed gives identical results, a different seed gives
different ones, a run killed mid-stream and resumed ends with results identical to an uninterrupted run,
and every result file is written. Scenarios: seeded, well-formed streams that the loop can run.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import cltoolbox
from cltoolbox.data import load_dataset
from cltoolbox.errors import CLToolboxError
from cltoolbox.plugin import FIRST_ANSWER_HOOKS, Plugin
from cltoolbox.registry import SCENARIOS, STRATEGIES, register_strategy

TOKENS = {
    "before_fit": "F", "before_experience": "E", "train_experience": "X", "before_epoch": "P",
    "transform_batch": "B", "forward": "D", "loss": "L", "after_backward": "W", "after_step": "S", "after_epoch": "Q",
    "after_experience": "A", "predict": "R", "after_fit": "Z",
}
# init evaluation (predict) after before_fit; per experience: epochs of batches, then evaluation.
# forward (D) and predict (R) reach the recorder unless an earlier plugin already answered them.
HOOK_ORDER = re.compile(r"FR*(EX?(P(BD?LWS)*Q)*AR*)+Z")


class Crash(Exception):
    pass


class Recorder(Plugin):
    """Records every hook call; dies in after_experience of experience ``Recorder.crash_at`` (-1: never).

    The crash is set on the class, not in the config, so the resumed run has the same config as the killed
    one (resume refuses a folder started from another config)."""

    calls: list[str] = []

    crash_at = -1
    composes = frozenset(FIRST_ANSWER_HOOKS)  # it answers None / False: the strategy's own answer counts

    def __init__(self) -> None:
        Recorder.calls = []

    def __getattribute__(self, name):
        if name in TOKENS:
            Recorder.calls.append(TOKENS[name])
        return object.__getattribute__(self, name)

    def before_fit(self, learner, stream):
        pass

    def before_experience(self, learner, exp):
        pass

    def train_experience(self, learner, exp):
        return False

    def before_epoch(self, learner, exp, epoch):
        pass

    def transform_batch(self, learner, batch):
        return batch

    def forward(self, learner, x, t):
        return None

    def loss(self, learner, batch, logits):
        return 0.0

    def after_backward(self, learner, batch):
        pass

    def after_step(self, learner, batch):
        pass

    def after_epoch(self, learner, exp, epoch):
        pass

    def after_experience(self, learner, exp):
        if exp.index == self.crash_at:
            raise Crash(f"killed in experience {exp.index}")

    def predict(self, learner, x, task_ids):
        return None

    def after_fit(self, learner, stream):
        pass


@register_strategy("test_recorder")
def recorder() -> list[Plugin]:
    """Test-only: records hook calls."""
    return [Recorder()]


BUILTIN_STRATEGIES = [n for n in STRATEGIES.names() if not n.startswith("test_")]
# Parameters that make a strategy fit the tiny stream; anything not listed runs with its defaults.
TINY_STRATEGY_PARAMS: dict[str, dict] = {"er": {"memory_size": 50}, "gem": {"patterns_per_experience": 20},
                                         "agem": {"patterns_per_experience": 20, "sample_size": 16},
                                         "rer": {"memory_size": 50},
                                         "der": {"memory_size": 50}, "derpp": {"memory_size": 50},
                                         "gdumb": {"memory_size": 60, "epochs": 2}, "icarl": {"memory_size": 50},
                                         "dualprompt": {"g_layers": [0], "e_layers": [1]},
                                         "coda_prompt": {"pool_size": 6, "layers": [0, 1]},
                                         "ranpac": {"projection_dim": 200}}
# Strategies that need another backbone than the default MLP.
TINY_VIT = {"name": "vit", "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}
TINY_STRATEGY_MODELS: dict[str, dict] = {name: TINY_VIT for name in ("l2p", "dualprompt", "coda_prompt")}
TINY_SCENARIO_PARAMS: dict[str, dict] = {
    "class_incremental": {"n_experiences": 3, "first_classes": 4},
    "task_incremental": {"n_experiences": 5},
    "domain_incremental": {"n_experiences": 5},
    "permuted": {"n_experiences": 3, "train_samples": 200},
    "rotated": {"n_experiences": 3, "train_samples": 200},
    "online": {"n_tasks": 2, "chunk_size": 250, "blur": 0.1},
    "few_shot": {"base_classes": 4, "ways": 2, "shots": 5, "n_sessions": 3},
    "power_law": {"n_tasks": 3, "n_experiences": 6, "samples_per_experience": 100},
    "curriculum": {"n_experiences": 5},
    "repetition": {"n_experiences": 7, "new_classes_per_exp": 2, "p_repeat": 0.3, "repeat_fraction": 0.5},
}


def _config(strategy: str, out: Path, seed: int = 0) -> dict:
    return {
        "name": "conformance",
        "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 3, "first_classes": 4},
        "model": TINY_STRATEGY_MODELS.get(strategy, {"name": "mlp", "hidden": [32]}),
        "strategy": {"name": strategy, **TINY_STRATEGY_PARAMS.get(strategy, {}),
                     "plugins": [{"name": "test_recorder"}]},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "seeds": [seed],
        "out": str(out),
    }


def _run_dir(out: Path, strategy: str, seed: int = 0) -> Path:
    return out / "conformance" / f"{strategy}+test_recorder" / "class_incremental-digits" / f"seed_{seed}"


@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
def test_strategy_contract(name: str, tmp_path: Path) -> None:
    a, b, c, d = (tmp_path / x for x in "abcd")

    cltoolbox.run(_config(name, a), quiet=True)
    calls = "".join(Recorder.calls)
    # plugins may call learner.forward again (replay logits, reference gradients): keep the loop's own call
    loop_calls = re.sub(r"(?<=BD)[^B]*", lambda m: m.group(0).replace("D", ""), calls)
    assert HOOK_ORDER.fullmatch(loop_calls), f"hook order violated: {calls[:200]}"
    assert calls.count("E") == 3 and calls.count("A") == 3

    run = _run_dir(a, name)
    for f in ("config.yaml", "env.json", "accuracy.csv", "per_class.csv", "metrics.json", "train_log.csv", "DONE",
              "checkpoint/state.pt", *(f"matrices/{k}_{s}.csv" for k in ("accuracy", "forgetting", "transfer")
                                       for s in ("class_il", "task_il"))):
        assert (run / f).is_file(), f"missing {f}"
    results = cltoolbox.load_results(run)
    acc = results["accuracy"]
    assert len(acc) == 4 * 3 * 2  # (init + 3 rows) x 3 experiences x 2 settings
    assert set(acc.trained_exp) == {-1, 0, 1, 2}
    assert acc.accuracy.between(0, 1).all()

    untimed = ["experience", "epoch", "step", "loss", "lr"]  # samples_per_s is a timing
    cltoolbox.run(_config(name, b), quiet=True)  # same seed: identical, down to every epoch's mean loss
    assert (run / "accuracy.csv").read_bytes() == (_run_dir(b, name) / "accuracy.csv").read_bytes()
    pd.testing.assert_frame_equal(*[pd.read_csv(r / "train_log.csv")[untimed] for r in (run, _run_dir(b, name))],
                                  check_exact=True)

    cltoolbox.run(_config(name, c, seed=1), quiet=True)  # another seed: different
    assert (run / "accuracy.csv").read_bytes() != (_run_dir(c, name, seed=1) / "accuracy.csv").read_bytes()

    with pytest.raises(CLToolboxError) as failed:  # killed while finishing experience 2 (after a checkpoint, or
        Recorder.crash_at = 2                        # before any): recorded as failed, raised after the other runs
        try:
            cltoolbox.run(_config(name, d), quiet=True)
        finally:
            Recorder.crash_at = -1
    assert isinstance(failed.value.__cause__, Crash)
    assert not (_run_dir(d, name) / "DONE").exists()
    cltoolbox.run(_config(name, d), resume=True, quiet=True)
    for f in ("accuracy.csv", "per_class.csv", "matrices/forgetting_class_il.csv"):
        assert (run / f).read_bytes() == (_run_dir(d, name) / f).read_bytes(), f"resume changed {f}"
    logs = [pd.read_csv(r / "train_log.csv")[untimed] for r in (run, _run_dir(d, name))]
    pd.testing.assert_frame_equal(*logs, check_exact=True)


# Scenarios of one dataset's own protocol (CORe50's sessions) cannot run on digits; tests/test_catalogue.py
# checks them on a CORe50 layout, end to end.
DATASET_PROTOCOLS = ("core50_ni", "core50_nc")


@pytest.mark.parametrize("name", [n for n in SCENARIOS.names() if not n.startswith("test_")
                                  and n not in DATASET_PROTOCOLS])
def test_scenario_contract(name: str, tmp_path: Path) -> None:
    data = load_dataset("digits")
    params = TINY_SCENARIO_PARAMS.get(name, {})
    gen = SCENARIOS.get(name).factory
    s1, s2 = gen(data, 0, **params), gen(data, 0, **copy.deepcopy(params))
    assert len(s1) >= 1 and [e.index for e in s1] == list(range(len(s1)))
    for e1, e2 in zip(s1, s2, strict=True):  # seeded: the same seed makes the same stream
        assert e1.classes == e2.classes and e1.task_id == e2.task_id
        assert torch.equal(e1.x_train, e2.x_train) and torch.equal(e1.y_train, e2.y_train)
        assert torch.equal(e1.x_test, e2.x_test) and torch.equal(e1.y_test, e2.y_test)
        assert e1.n_train > 0 and e1.n_test > 0
        assert e1.x_train.dtype == torch.float32 and e1.y_train.dtype == torch.int64
        assert tuple(e1.x_train.shape[1:]) == s1.input_shape
        assert set(e1.y_train.unique().tolist()) <= set(e1.classes)
        assert set(e1.y_test.unique().tolist()) <= set(e1.classes)
    # the stream's output space: the dataset's classes, or fewer when labels are relabelled (domain-IL splits)
    assert s1.n_classes <= data.n_classes and sorted(s1.class_order) == list(range(s1.n_classes))
    if name != "domain_incremental":
        assert s1.n_classes == data.n_classes
    assert s1.scenario in ("class_incremental", "task_incremental", "domain_incremental")

    config = {
        "name": "scen", "scenario": {"name": name, "dataset": "digits", **params},
        "model": {"name": "mlp", "hidden": [32]}, "strategy": {"name": "naive"},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05}, "seeds": [0], "out": str(tmp_path),
    }
    (summary,) = cltoolbox.run(config, quiet=True)
    assert summary["status"] == "done" and summary["labels"]["n_experiences"] == len(s1)
    assert 0 <= summary["class_il"]["acc"] <= 1
