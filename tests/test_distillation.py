"""LwF: the distillation term, old-class restriction under task-IL masking, composition with replay, and
less forgetting than fine-tuning on task-IL Split-MNIST-5k."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import cltoolbox
from cltoolbox.data import load_dataset
from cltoolbox.errors import ConfigError
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.plugin import Plugin
from cltoolbox.registry import MODELS, SCENARIOS, STRATEGIES
from cltoolbox.strategies.distillation import LwFPlugin, distillation_loss


def _learner(plugins: list[Plugin], scenario: str, **params) -> tuple:
    stream = SCENARIOS.get(scenario).factory(load_dataset("digits"), 0, **params)
    torch.manual_seed(0)
    model = MODELS.get("mlp").factory(stream.input_shape, stream.n_classes, hidden=[32])
    learner = Learner(model, plugins, TrainConfig(epochs=1, batch_size=32, lr=0.05, device="cpu"), seed=0)
    learner.begin(stream)
    return learner, stream


def test_distillation_loss_is_the_temperature_scaled_kl() -> None:
    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    p_old, T = F.softmax(old / 2, dim=1), 2.0
    cross_entropy = -(p_old * F.log_softmax(new / T, dim=1)).sum(1).mean()  # the paper's L_old
    entropy = -(p_old * p_old.log()).sum(1).mean()
    assert torch.allclose(distillation_loss(new, old, T), cross_entropy - entropy, atol=1e-6)
    assert distillation_loss(old, old, T).abs() < 1e-6


class Probe(Plugin):
    """Records LwF's loss per experience, and checks it against a manual per-old-task computation."""

    def __init__(self, lwf: LwFPlugin) -> None:
        self.lwf = lwf
        self.values: dict[int, list[float]] = {}

    def loss(self, learner, batch, logits):
        value = float(torch.as_tensor(self.lwf.loss(learner, batch, logits)).detach())
        self.values.setdefault(learner.experience.index, []).append(value)
        if self.lwf.old_state is not None and learner.multi_head:
            with torch.no_grad():
                raw = learner.model(batch.x)  # unmasked: the old tasks' columns of the current model
            old = self.lwf._old_model(learner)(batch.x)
            want = float(sum(distillation_loss(raw[:, c], old[:, c], 2.0) for c in self.lwf.old_tasks.values()))
            assert abs(value - want) < 1e-5 * max(1.0, want)
            assert value < 1e3  # the -1e9 task mask never enters
        return 0.0


def test_task_il_distils_each_old_task_head_without_the_mask() -> None:
    lwf = LwFPlugin(alpha=1.0, temperature=2.0)
    probe = Probe(lwf)
    learner, stream = _learner([lwf, probe], "task_incremental", n_experiences=3, first_classes=4)
    for exp in stream:
        learner.train_experience(exp)
    assert all(v == 0 for v in probe.values[0])
    assert min(probe.values[1][1:]) > 0 and min(probe.values[2][1:]) > 0
    assert lwf.old_tasks == {0: [0, 1, 2, 3], 1: [4, 5, 6], 2: [7, 8, 9]}


def test_class_il_distils_over_the_classes_seen_before() -> None:
    lwf = LwFPlugin(alpha=1.0, temperature=2.0)
    seen = []

    class Spy(Plugin):
        def loss(self, learner, batch, logits):
            if lwf.old_state is not None:
                old = lwf._old_model(learner)(batch.x)
                classes = sorted(c for cs in lwf.old_tasks.values() for c in cs)
                want = distillation_loss(logits[:, classes], old[:, classes], 2.0)
                seen.append((classes, float(lwf.loss(learner, batch, logits).detach()), float(want.detach())))
            return 0.0

    learner, stream = _learner([lwf, Spy()], "class_incremental", n_experiences=3, first_classes=4)
    for exp in stream:
        learner.train_experience(exp)
    assert {tuple(c) for c, _, _ in seen} == {(0, 1, 2, 3), (0, 1, 2, 3, 4, 5, 6)}
    assert all(abs(a - b) < 1e-6 for _, a, b in seen)


def test_er_plus_lwf_composes_and_survives_a_checkpoint(tmp_path) -> None:
    config = {
        "name": "compose", "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 3,
                                        "first_classes": 4},
        "model": {"name": "mlp", "hidden": [32]},
        "strategy": [{"name": "er", "memory_size": 100}, {"name": "er", "memory_size": 100,
                                                          "plugins": [{"name": "lwf"}]}],
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}, "seeds": [0], "out": str(tmp_path),
    }
    er, er_lwf = cltoolbox.run(config, quiet=True)
    assert er_lwf["labels"]["strategy"] == "er+lwf" and er_lwf["status"] == "done"
    assert er_lwf["class_il"]["acc"] != er["class_il"]["acc"]  # the distillation term changed training
    assert er_lwf["cost"]["memory_bytes"] > er["cost"]["memory_bytes"]  # plus the frozen old model

    (plugin,) = STRATEGIES.get("lwf").factory()
    learner, stream = _learner([plugin], "class_incremental", n_experiences=3, first_classes=4)
    learner.train_experience(stream[0])
    buf = io.BytesIO()
    torch.save(plugin.state_dict(), buf)
    buf.seek(0)
    fresh = LwFPlugin(1.0, 2.0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = stream[1].x_train[:16]
    assert torch.equal(plugin._old_model(learner)(x), fresh._old_model(learner)(x))
    assert fresh.memory_usage()[1] == sum(p.numel() * 4 for p in learner.model.parameters())


@pytest.mark.parametrize("params", [{"alpha": -1.0}, {"temperature": 0.0}])
def test_invalid_hyperparameters_are_config_errors(params: dict) -> None:
    with pytest.raises(ConfigError, match=f"strategy.{next(iter(params))}"):
        STRATEGIES.get("lwf").factory(**params)


@pytest.mark.slow
def test_lwf_reduces_forgetting_on_task_il_split_mnist(tmp_path, one_thread) -> None:
    config = {
        "name": "lwf", "scenario": {"name": "task_incremental", "dataset": "mnist5k", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": [100, 100]},
        "strategy": [{"name": "naive"}, {"name": "lwf", "alpha": 1.0}],
        "train": {"epochs": 1, "batch_size": 10, "lr": 0.1, "device": "cpu"},
        "seeds": [0], "out": str(tmp_path),
    }
    naive, lwf = (r["task_il"] for r in cltoolbox.run(config, quiet=True))
    assert naive["forgetting"] > 0.02, naive
    assert lwf["forgetting"] < 0.5 * naive["forgetting"], (lwf, naive)
    assert lwf["acc"] > naive["acc"], (lwf, naive)


def test_alpha_schedule_per_experience() -> None:
    from cltoolbox.strategies.distillation import lwf as make_lwf

    (plugin,) = make_lwf(alpha=[0.0, 0.5, 2.0])
    assert [plugin.alpha_at(i) for i in range(5)] == [0.0, 0.5, 2.0, 2.0, 2.0]
    (constant,) = make_lwf(alpha=1.5)
    assert constant.alpha_at(7) == 1.5
    with pytest.raises(ConfigError, match="strategy.alpha"):
        make_lwf(alpha=[])
