"""train.device / precision / channels_last / compile / deterministic: validation, and every registered
strategy trained under bf16 autocast on CPU (it runs, or it refuses with one line)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import cltoolbox
from cltoolbox import config as cfgmod
from cltoolbox.errors import CLToolboxError, ConfigError
from cltoolbox.registry import STRATEGIES, import_plugins
from cltoolbox.testing import SMALL_MODEL, SMALL_STREAM, strategy_cases

import_plugins([])
# over 3 s each on 2 busy cores (ViT prompt methods, podnet's pooled distillation, adamerging's merges): slow tier
SLOW = {"l2p", "coda_prompt", "podnet", "adamerging"}
BUILTINS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in strategy_cases("cltoolbox.strategies")]


def _config(tmp_path, strategy: dict, **train) -> dict:
    entry = STRATEGIES.get(strategy["name"])
    return {"name": "prec", "scenario": dict(SMALL_STREAM), "model": copy.deepcopy(entry.test_model or SMALL_MODEL),
            "strategy": {**entry.test_params, **strategy},
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, **train}, "seeds": [0], "out": str(tmp_path)}


@pytest.mark.parametrize("name", BUILTINS)
def test_every_strategy_runs_or_refuses_bf16(tmp_path, name):
    try:
        results = cltoolbox.run(_config(tmp_path, {"name": name}, precision="bf16"), quiet=True)
    except CLToolboxError as e:  # a refusal must be one line naming the setting
        assert "\n" not in str(e) and "precision" in str(e), str(e)
        return
    acc = results[0]["class_il"]["acc"]
    assert math.isfinite(acc) and 0.0 <= acc <= 1.0


@pytest.mark.parametrize("train, words", [
    ({"precision": "16-mixed"}, "needs a CUDA device"),
    ({"precision": "fp8"}, "is not one of"),
    ({"device": "cuda:0"}, "no CUDA device"),
    ({"device": "gpu"}, "use auto, cpu, cuda or cuda:N"),
    ({"compile": "yes"}, "train.compile"),
])
def test_bad_settings_are_one_line(train, words):
    raw = {"name": "x", "scenario": dict(SMALL_STREAM), "model": dict(SMALL_MODEL), "strategy": {"name": "naive"},
           "train": train}
    if "cuda" in str(train.get("device", "")) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError) as e:
        cfgmod.validate(raw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_channels_last_refuses_a_model_without_convolutions(tmp_path):
    with pytest.raises(CLToolboxError, match="channels_last: the model has no convolutions"):
        cltoolbox.run(_config(tmp_path, {"name": "naive"}, channels_last=True), quiet=True)


def test_bf16_autocast_reaches_the_model_and_fp32_stays_exact(tmp_path):
    """bf16 changes the numbers (autocast is really on), and 32 is the default path, bit for bit."""
    a = cltoolbox.run(_config(tmp_path / "a", {"name": "er", "memory_size": 50}), quiet=True)[0]
    b = cltoolbox.run(_config(tmp_path / "b", {"name": "er", "memory_size": 50}, precision=32), quiet=True)[0]
    c = cltoolbox.run(_config(tmp_path / "c", {"name": "er", "memory_size": 50}, precision="bf16"), quiet=True)[0]
    assert a["class_il"]["acc"] == b["class_il"]["acc"]
    assert c["class_il"]["acc"] != a["class_il"]["acc"] or c["class_il"]["aia"] != a["class_il"]["aia"]
    assert abs(c["class_il"]["acc"] - a["class_il"]["acc"]) < 0.1


def test_conv_model_with_channels_last_and_deterministic(tmp_path):
    raw = _config(tmp_path / "e", {"name": "naive"}, channels_last=True, deterministic=True)
    raw["model"] = {"name": "resnet18_reduced", "nf": 4}
    out = cltoolbox.run(raw, quiet=True)[0]
    assert torch.are_deterministic_algorithms_enabled() and out["class_il"]["acc"] > 0.3
    raw = _config(tmp_path / "f", {"name": "naive"})
    raw["model"] = {"name": "resnet18_reduced", "nf": 4}
    cltoolbox.run(raw, quiet=True)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.slow
def test_compile_gives_the_eager_result(tmp_path):
    """torch.compile (inductor, on CPU with the system C compiler) trains to the eager result up to rounding."""
    eager = cltoolbox.run(_config(tmp_path / "a", {"name": "er", "memory_size": 50}), quiet=True)[0]
    compiled = cltoolbox.run(_config(tmp_path / "b", {"name": "er", "memory_size": 50}, compile=True), quiet=True)[0]
    assert abs(compiled["class_il"]["acc"] - eager["class_il"]["acc"]) < 0.03


def test_stream_data_go_to_the_device_only_when_they_fit():
    from cltoolbox.build import build_stream
    from cltoolbox.data import load_dataset
    from cltoolbox.precision import data_fits, host_bytes, place_stream

    resolved = cfgmod.validate({"name": "x", "scenario": dict(SMALL_STREAM), "model": dict(SMALL_MODEL),
                                "strategy": {"name": "naive"}})
    data = load_dataset("digits")
    stream = build_stream(resolved, data, 0)
    need = host_bytes(stream)
    assert need == sum(s.x.numel() * s.x.element_size() for s in (data.train, data.test))
    assert data_fits(need, 2 * need) and not data_fits(need, 2 * need - 1)
    assert place_stream(stream, torch.device("cpu")).experiences[0].train.source.x.device.type == "cpu"
    kept = stream.to("meta", move_sources=False)  # indices and labels move, the data stay where they are
    assert kept.experiences[0].train.index.device.type == "meta"
    assert kept.experiences[0].train.source is stream.experiences[0].train.source


def test_feature_cache_keeps_autocast_features_apart():
    """A frozen extractor's features computed under bf16 autocast (training) are never what a full-precision pass
    (prototypes, closed-form heads) reads back."""
    from cltoolbox.models.cache import SampleFeatureCache

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16)
    cache = SampleFeatureCache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cache(x, layer)
    assert low.dtype == torch.bfloat16
    full = cache(x, layer)
    assert full.dtype == torch.float32 and torch.equal(full, layer(x).detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cache(x, lambda rows: pytest.fail("recomputed")), low)  # both are cached
    cache.clear()
    assert len(cache) == 0 and len(cache._low) == 0


def test_full_precision_turns_autocast_off_inside():
    from cltoolbox.precision import full_precision

    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with full_precision():
            assert (a @ b).dtype == torch.float32
        assert (a @ b).dtype == torch.bfloat16


def test_fp16_step_scales_the_loss_and_hooks_see_true_gradients():
    """The 16-mixed path (GradScaler) exercised on CPU below the config check (which keeps it to CUDA): hooks
    after backward see unscaled gradients, the step is applied, the scaler's state goes into the checkpoint."""
    from cltoolbox.loop import Learner, TrainConfig
    from cltoolbox.plugin import Plugin

    seen = []

    class Probe(Plugin):
        def after_backward(self, learner, batch):
            seen.append(float(learner.model.weight.grad.abs().sum()))

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    learner = Learner(model, [Probe()], TrainConfig(device="cpu", precision="16-mixed", batch_size=8, lr=0.1))
    assert learner.precision.scaler is not None and learner.precision.scaler.get_scale() > 1
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = model.weight.detach().clone()
    learner.train_data(x, y, torch.zeros(8, dtype=torch.long), epochs=1)
    assert len(seen) == 1 and 0 < seen[0] < 100  # a float16 loss scaled by 65536 would give ~1e4-1e5
    assert not torch.equal(model.weight, before)
    state = learner.state_dict()
    assert state["grad_scaler"]["scale"] == learner.precision.scaler.get_scale()
    other = Learner(torch.nn.Linear(4, 3), [Probe()], TrainConfig(device="cpu", precision="16-mixed"))
    other.load_state_dict(state)
    assert other.precision.scaler.get_scale() == learner.precision.scaler.get_scale()
