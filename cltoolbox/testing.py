"""A conformance kit for strategies and scenarios, built-in or your own.

``check_strategy(name)`` runs a strategy on a small class-incremental stream of ``digits`` and checks that it
learns, calls the hooks in the documented order, writes every result file, gives identical results for the
same seed and different ones for another seed, ends a run killed mid-stream and resumed exactly like an
uninterrupted run (memory included), reports its memory consistently, and rejects bad parameters with a
ConfigError. ``check_scenario(name)`` checks that a scenario makes seeded, well-formed streams the loop can
run. Both raise ``AssertionError`` with one clear line on the first failure.

Plugins declare the small settings to check with at registration::

    @register_strategy("my_method", test_params={"memory_size": 50})

In pytest, parametrise over a package's or a file's plugins::

    @pytest.mark.parametrize("name", strategy_cases("my_plugins.py"))
    def test_my_strategy(name):
        check_strategy(name, imports=["my_plugins.py"])

On the command line: ``cltoolbox check my_plugins.py``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cltoolbox.errors import CLToolboxError, ConfigError, one_line
from cltoolbox.params import Limit
from cltoolbox.plugin import FIRST_ANSWER_HOOKS, Plugin, held_tensors, unsaved_tensors
from cltoolbox.registry import SCENARIOS, STRATEGIES, import_plugins, register_strategy, registered_by

__all__ = ["check_scenario", "check_strategy", "scenario_cases", "strategy_cases"]

TOKENS = {
    "before_fit": "F", "before_experience": "E", "train_experience": "X", "before_epoch": "P",
    "transform_batch": "B", "forward": "D", "loss": "L", "after_backward": "W", "after_step": "S", "after_epoch": "Q",
    "after_experience": "A", "predict": "R", "after_fit": "Z",
}
# init evaluation (predict) after before_fit; per experience: epochs of batches, then evaluation.
# forward (D) and predict (R) reach the recorder unless an earlier plugin already answered them.
HOOK_ORDER = re.compile(r"FR*(EX?(P(BD?LWS)*Q)*AR*)+Z")
RECORDER = "test_recorder"
SMALL_MODEL: dict[str, Any] = {"name": "mlp", "hidden": [32]}
SMALL_STREAM: dict[str, Any] = {"name": "class_incremental", "dataset": "digits", "n_experiences": 3,
                                "first_classes": 4}
RESULT_FILES = ("config.yaml", "env.json", "accuracy.csv", "per_class.csv", "metrics.json", "train_log.csv", "DONE",
                "checkpoint/state.pt", *(f"matrices/{k}_{s}.csv" for k in ("accuracy", "forgetting", "transfer")
                                         for s in ("class_il", "task_il")))
UNTIMED = ["experience", "epoch", "step", "loss", "lr"]  # train_log.csv's samples_per_s is a timing
LEARNING_MARGIN = 0.05  # accuracy on the experience just learned must beat the untrained model's by this much


class Crash(Exception):
    """The recorder's simulated kill."""


class Recorder(Plugin):
    """Records every hook call; dies in after_experience of experience ``Recorder.crash_at`` (-1: never).

    The crash is set on the class, not in the config, so the resumed run has the same config as the killed
    one (resume refuses a folder started from another config)."""

    calls: list[str] = []
    plugins: list[Plugin] = []
    model: Any = None

    crash_at = -1
    composes = frozenset(FIRST_ANSWER_HOOKS)  # it answers None / False: the strategy's own answer counts

    def __init__(self) -> None:
        Recorder.calls = []

    def __getattribute__(self, name: str) -> Any:
        if name in TOKENS:
            Recorder.calls.append(TOKENS[name])
        return object.__getattribute__(self, name)

    def before_fit(self, learner, stream):
        Recorder.plugins = [p for p in learner.plugins if not isinstance(p, Recorder)]  # the strategy's, trained
        Recorder.model = learner.model

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


@register_strategy(RECORDER)
def recorder() -> list[Plugin]:
    """Test-only: records hook calls (the conformance kit's probe)."""
    return [Recorder()]


def _specs(imports: str | Sequence[str]) -> list[str]:
    """``imports`` as absolute ``.py`` paths and module names (a run's config may be read from elsewhere)."""
    specs = [imports] if isinstance(imports, str) else list(imports)
    return [str(Path(s).resolve()) if s.endswith(".py") else s for s in specs]


def strategy_cases(package_or_imports: str | Sequence[str]) -> list[str]:
    """The strategies that a module or package (``"my_pkg"``), or ``.py`` files, register: names to
    parametrise a test over (``@pytest.mark.parametrize("name", strategy_cases("my_plugins.py"))``)."""
    return sorted({n for s in _specs(package_or_imports) for n in registered_by(s)["strategies"]} - {RECORDER})


def scenario_cases(package_or_imports: str | Sequence[str]) -> list[str]:
    """The scenarios that a module, package or ``.py`` files register and that can be checked on a toy
    dataset (a scenario registered with ``test_dataset=None`` is left out)."""
    names = {n for s in _specs(package_or_imports) for n in registered_by(s)["scenarios"]}
    return sorted(n for n in names if SCENARIOS.get(n).test_dataset is not None)


class _Check:
    """Runs one plugin's checks; ``fail`` raises the one-line AssertionError."""

    def __init__(self, kind: str, name: str) -> None:
        self.prefix = f"{kind} '{name}'"

    def fail(self, message: str) -> None:
        raise AssertionError(f"{self.prefix}: {message}")

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            self.fail(message)

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the plugin becomes the check's one line
            self.fail(f"{what} raised {one_line(e)}")


def check_strategy(name: str, imports: str | Sequence[str] = (), params: dict[str, Any] | None = None,
                   model: dict[str, Any] | None = None) -> None:
    """Check a registered strategy on a small stream; raise AssertionError on the first failure.

    ``imports`` are the files or modules that register it; ``params`` and ``model`` replace the small
    settings it declared at registration (``test_params`` / ``test_model``), else its defaults and a small MLP.
    """
    check = _Check("strategy", name)
    specs = _specs(imports)
    check.call("importing its plugins", import_plugins, specs)
    check.expect(name in STRATEGIES, f"not registered (imports: {specs or 'none'})")
    entry = STRATEGIES.get(name)
    params = dict(entry.test_params if params is None else params)
    model = copy.deepcopy(model or entry.test_model or SMALL_MODEL)

    def config(out: Path, seed: int = 0, **strategy: Any) -> dict[str, Any]:
        return {"name": "conformance", **({"imports": specs} if specs else {}),
                "scenario": dict(SMALL_STREAM), "model": copy.deepcopy(model),
                "strategy": {"name": name, **copy.deepcopy(params), **strategy, "plugins": [{"name": RECORDER}]},
                "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}, "seeds": [seed], "out": str(out)}

    def run_dir(out: Path, seed: int = 0) -> Path:
        return out / "conformance" / f"{name}+{RECORDER}" / "class_incremental-digits" / f"seed_{seed}"

    import cltoolbox

    with tempfile.TemporaryDirectory(prefix="cltoolbox-check-") as tmp:
        a, b, c, d, e = (Path(tmp) / x for x in "abcde")
        _check_bad_params(check, entry, config(e))

        check.call("a run", cltoolbox.run, config(a), quiet=True)
        calls = "".join(Recorder.calls)
        # plugins may call learner.forward again (replay logits, reference gradients): keep the loop's own call
        loop_calls = re.sub(r"(?<=BD)[^B]*", lambda m: m.group(0).replace("D", ""), calls)
        check.expect(bool(HOOK_ORDER.fullmatch(loop_calls)), f"hook order violated: {calls[:200]}")
        check.expect(calls.count("E") == 3 and calls.count("A") == 3,
                     f"expected 3 before_experience and 3 after_experience calls: {calls[:200]}")
        run = run_dir(a)
        for f in RESULT_FILES:
            check.expect((run / f).is_file(), f"the run did not write {f}")
        acc = cltoolbox.load_results(run)["accuracy"]
        check.expect(len(acc) == 4 * 3 * 2 and set(acc.trained_exp) == {-1, 0, 1, 2},
                     f"accuracy.csv has {len(acc)} rows, expected 24 (init + 3 rows) x 3 experiences x 2 settings")
        check.expect(bool(acc.accuracy.between(0, 1).all()), "accuracy outside [0, 1]")
        _check_learning(check, acc)
        cost = json.loads((run / "metrics.json").read_text())["cost"]
        _check_unsaved_state(check, {"name": name, **params})
        _check_memory(check, cost)

        check.call("a second run with the same seed", cltoolbox.run, config(b), quiet=True)
        check.expect((run / "accuracy.csv").read_bytes() == (run_dir(b) / "accuracy.csv").read_bytes(),
                     "not deterministic: the same seed gave another accuracy.csv")
        logs = [pd.read_csv(r / "train_log.csv")[UNTIMED] for r in (run, run_dir(b))]
        check.expect(logs[0].equals(logs[1]), "not deterministic: the same seed gave another train_log.csv")

        check.call("a run with another seed", cltoolbox.run, config(c, seed=1), quiet=True)
        check.expect((run / "accuracy.csv").read_bytes() != (run_dir(c, seed=1) / "accuracy.csv").read_bytes(),
                     "seed 1 gave the same accuracy.csv as seed 0: the seed is not used")

        _check_resume(check, config(d), run, run_dir(d), cost)


def _check_bad_params(check: _Check, entry: Any, config: dict[str, Any]) -> None:
    """An unknown key, a value of the wrong type for each typed parameter and a value just outside each declared
    limit are ConfigErrors naming it."""
    from cltoolbox.config import validate

    bad_values: dict[Any, Any] = {int: "not-a-number", float: "not-a-number", bool: "yes-please", str: 12345}
    cases = [("no_such_parameter", 1)]
    cases += [(p.name, bad_values[p.annotation]) for p in entry.params.values() if p.annotation in bad_values]
    cases += [(p.name, _outside(lim, p.annotation)) for p in entry.params.values() for lim in p.limits]
    for key, value in cases:
        bad = copy.deepcopy(config)
        bad["strategy"][key] = value
        try:
            validate(bad)
        except ConfigError as e:
            check.expect(key in str(e), f"{key}: {value!r} gave a ConfigError that does not name '{key}': {e}")
            continue
        except Exception as e:  # noqa: BLE001
            check.fail(f"{key}: {value!r} raised {one_line(e)}, not a ConfigError naming '{key}'")
        check.fail(f"{key}: {value!r} was accepted; a bad parameter must be a ConfigError")


def _outside(limit: Limit, kind: Any) -> float:
    """A value of the parameter's type just outside ``limit``."""
    if limit.low is not None:
        value = limit.low if limit.low_open else limit.low - 1
    else:
        value = limit.high if limit.high_open else limit.high + 1
    return int(value) if kind is int and float(value).is_integer() else value


def _check_learning(check: _Check, acc: pd.DataFrame) -> None:
    """Class-IL accuracy on each experience just learned beats the untrained model's on it, on average."""
    ci = acc[acc.setting == "class_il"]
    learned = ci[ci.trained_exp == ci.eval_exp].sort_values("eval_exp").accuracy.to_numpy()
    untrained = ci[ci.trained_exp == -1].sort_values("eval_exp").accuracy.to_numpy()
    check.expect(learned.mean() >= untrained.mean() + LEARNING_MARGIN,
                 f"does not learn: class-IL accuracy on each new experience {learned.mean():.3f} on average, "
                 f"untrained {untrained.mean():.3f} (needs +{LEARNING_MARGIN})")


def _check_memory(check: _Check, cost: dict[str, Any]) -> None:
    items, nbytes = cost.get("memory_items"), cost.get("memory_bytes")
    check.expect(isinstance(items, int) and isinstance(nbytes, int) and items >= 0 and nbytes >= 0,
                 f"memory_usage() must give (items, bytes) as non-negative ints, got ({items!r}, {nbytes!r})")
    check.expect(items == 0 or nbytes > 0, f"memory_usage() gives {items} stored items in 0 bytes")


def _check_unsaved_state(check: _Check, strategy: dict[str, Any]) -> None:
    """No plugin without ``state_dict`` holds tensors it did not have as built (a resume would lose them)."""
    from cltoolbox.build import build_plugins

    fresh = build_plugins(strategy)  # the factory's defaults fill what the check's params leave out
    for trained, built in zip(Recorder.plugins, fresh, strict=False):
        lost = unsaved_tensors(trained, held_tensors(built), Recorder.model)
        check.expect(not lost, f"{type(trained).__name__} holds tensors in {', '.join('self.' + a for a in lost)} "
                               "but has no state_dict(): a resumed run loses them; implement state_dict() and "
                               "load_state_dict()")


def _check_resume(check: _Check, config: dict[str, Any], run: Path, resumed: Path, cost: dict[str, Any]) -> None:
    """Killed while finishing experience 2 (after a checkpoint, or before any), then resumed: identical."""
    import cltoolbox

    Recorder.crash_at = 2
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the runner prints the simulated crash's traceback
            cltoolbox.run(config, quiet=True)
    except CLToolboxError as e:  # a failed run is recorded, then raised after the other runs
        check.expect(isinstance(e.__cause__, Crash), f"the killed run failed with {one_line(e)}")
    except Exception as e:  # noqa: BLE001
        check.fail(f"the killed run raised {one_line(e)}")
    else:
        check.fail("a run killed in experience 2 was not reported as failed")
    finally:
        Recorder.crash_at = -1
    check.expect(not (resumed / "DONE").exists(), "a killed run wrote DONE")
    check.call("resuming a killed run", cltoolbox.run, config, resume=True, quiet=True)
    for f in ("accuracy.csv", "per_class.csv", "matrices/forgetting_class_il.csv"):
        check.expect((run / f).read_bytes() == (resumed / f).read_bytes(),
                     f"resume changed {f}: state_dict()/load_state_dict() miss some state")
    logs = [pd.read_csv(r / "train_log.csv")[UNTIMED] for r in (run, resumed)]
    check.expect(logs[0].equals(logs[1]),
                 "resume changed train_log.csv: state_dict()/load_state_dict() miss some state")
    again = json.loads((resumed / "metrics.json").read_text())["cost"]
    for k in ("memory_items", "memory_bytes"):
        check.expect(again.get(k) == cost.get(k), f"resume changed {k}: {cost.get(k)} -> {again.get(k)}")


def check_scenario(name: str, imports: str | Sequence[str] = (), params: dict[str, Any] | None = None) -> None:
    """Check a registered scenario: seeded, well-formed streams that the loop can run. AssertionError on failure.

    ``params`` replace the small settings it declared at registration (``test_params``)."""
    from cltoolbox.data import load_dataset

    check = _Check("scenario", name)
    specs = _specs(imports)
    check.call("importing its plugins", import_plugins, specs)
    check.expect(name in SCENARIOS, f"not registered (imports: {specs or 'none'})")
    entry = SCENARIOS.get(name)
    check.expect(entry.test_dataset is not None, "registered with test_dataset=None: it cannot be checked here")
    params = dict(entry.test_params if params is None else params)
    data = check.call(f"loading dataset '{entry.test_dataset}'", load_dataset, entry.test_dataset)
    s1 = check.call("making a stream", entry.factory, data, 0, **copy.deepcopy(params))
    s2 = check.call("making a stream again", entry.factory, data, 0, **copy.deepcopy(params))
    check.expect(len(s1) >= 1 and [e.index for e in s1] == list(range(len(s1))),
                 "experiences must be numbered 0, 1, ... and there must be at least one")
    check.expect(len(s1) == len(s2), "not seeded: the same seed made streams of different lengths")
    for e1, e2 in zip(s1, s2, strict=True):
        where = f"experience {e1.index}"
        check.expect(e1.classes == e2.classes and e1.task_id == e2.task_id
                     and torch.equal(e1.x_train, e2.x_train) and torch.equal(e1.y_train, e2.y_train)
                     and torch.equal(e1.x_test, e2.x_test) and torch.equal(e1.y_test, e2.y_test),
                     f"not seeded: the same seed made another {where}")
        check.expect(e1.n_train > 0 and e1.n_test > 0, f"{where} has no train or no test samples")
        check.expect(e1.x_train.dtype == torch.float32 and e1.y_train.dtype == torch.int64,
                     f"{where}: x must be float32 and y int64, got {e1.x_train.dtype} and {e1.y_train.dtype}")
        check.expect(tuple(e1.x_train.shape[1:]) == tuple(s1.input_shape),
                     f"{where}: inputs of shape {tuple(e1.x_train.shape[1:])}, the stream says {s1.input_shape}")
        check.expect(set(e1.y_train.unique().tolist()) <= set(e1.classes)
                     and set(e1.y_test.unique().tolist()) <= set(e1.classes),
                     f"{where} has labels outside its classes {e1.classes}")
    # the stream's output space: the dataset's classes, or fewer when labels are relabelled (domain-IL splits)
    check.expect(s1.n_classes <= data.n_classes and sorted(s1.class_order) == list(range(s1.n_classes)),
                 f"class_order must be a permutation of range(n_classes={s1.n_classes})")
    check.expect(s1.scenario in ("class_incremental", "task_incremental", "domain_incremental"),
                 f"unknown setting '{s1.scenario}'")

    import cltoolbox

    with tempfile.TemporaryDirectory(prefix="cltoolbox-check-") as tmp:
        config = {
            "name": "scen", **({"imports": specs} if specs else {}),
            "scenario": {"name": name, "dataset": entry.test_dataset, **copy.deepcopy(params)},
            "model": dict(SMALL_MODEL), "strategy": {"name": "naive"},
            "train": {"epochs": 1, "batch_size": 64, "lr": 0.05}, "seeds": [0], "out": tmp,
        }
        (summary,) = check.call("a run", cltoolbox.run, config, quiet=True)
    check.expect(summary["status"] == "done", f"the run ended {summary['status']}")
    check.expect(summary["labels"]["n_experiences"] == len(s1), "the run saw another number of experiences")
    check.expect(0 <= summary["class_il"]["acc"] <= 1, "accuracy outside [0, 1]")
