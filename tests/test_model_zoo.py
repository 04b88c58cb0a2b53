"""Model Zoo and Isolated: growth, boosting task choice, the ensemble's logits, checkpoints, and a learning check
on real task-IL Split-MNIST-5k (slow)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import gaussian_pairs_stream

import cltoolbox
from cltoolbox.errors import ConfigError
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.models.mlp import MLP
from cltoolbox.plugin import MASKED_LOGIT
from cltoolbox.strategies.memory import ClassBalancedMemory
from cltoolbox.strategies.model_zoo import ModelZooPlugin, boosting_probabilities, isolated, model_zoo
from cltoolbox.stream import Experience, Stream


def _task_stream(n_tasks: int = 4, per_class: int = 40, dim: int = 8) -> Stream:
    """Task-IL: two Gaussian classes per task, task ids given."""
    return gaussian_pairs_stream(n_tasks, per_class, dim, noise=1.0, task_labels=True, shuffle=True)


def _learner(plugin: ModelZooPlugin, stream: Stream, seed: int = 0) -> Learner:
    torch.manual_seed(0)
    model = MLP(stream.input_shape[0], [16], stream.n_classes, 0.0)
    return Learner(model, [plugin], TrainConfig(epochs=2, batch_size=16, lr=0.1, device="cpu"), seed=seed)


def _zoo(**kw) -> ModelZooPlugin:
    args = {"memory_size": 40, "tasks_per_model": 3, "replay_fraction": 1.0, "weighting": "samples", **kw}
    return ModelZooPlugin(**args)


def test_factories_validate_their_hyperparameters() -> None:
    for kw, field in (({"memory_size": 0}, "memory_size"), ({"tasks_per_model": 0}, "tasks_per_model"),
                      ({"replay_fraction": 0.0}, "replay_fraction"), ({"replay_fraction": 1.5}, "replay_fraction"),
                      ({"weighting": "median"}, "weighting")):
        with pytest.raises(ConfigError, match=f"strategy.{field}"):
            model_zoo(**kw)
    (iso,) = isolated()
    assert iso.memory is None and iso.tasks_per_model == 1


def test_zoo_grows_one_fresh_member_per_experience_with_the_current_task_first(one_thread) -> None:
    stream = _task_stream()
    plugin = _zoo()
    learner = _learner(plugin, stream)
    learner.begin(stream)
    for i, exp in enumerate(stream):
        learner.train_experience(exp)
        assert len(plugin.member_tasks) == i + 1 and len(plugin.frozen) == i  # newest member = learner.model
        tasks = plugin.member_tasks[-1]
        assert tasks[0] == i and len(set(tasks)) == len(tasks) == min(3, i + 1)  # b = 3 tasks at most
        assert set(tasks[1:]) <= set(range(i))
    # weights: the current task's member saw all its samples, replaying members only their stored ones
    assert all(w[0] == stream[i].n_train for i, w in enumerate(plugin.member_weights))
    assert all(0 < v < stream[0].n_train for w in plugin.member_weights for v in w[1:])
    n_params = sum(p.numel() for p in learner.model.parameters())
    member_bytes = sum(p.numel() * p.element_size() for p in learner.model.state_dict().values())
    items, nbytes = plugin.memory_usage()
    assert items == 40 and nbytes == plugin.memory.usage()[1] + 3 * member_bytes
    # the replay memory holds stream keys, counted at the samples' native size (8 float32 values) + y, t
    assert plugin.memory.key.dtype == torch.int64 and plugin.memory.usage() == (40, 40 * (8 * 4 + 2 * 8))
    keys = torch.cat([stream.keys(e.train) for e in stream])
    assert torch.isin(plugin.memory.key[:40], keys).all()
    cost = plugin.cost()
    assert cost["zoo_members"] == 4 and cost["ensemble_params"] == 4 * n_params
    assert cost["inference_flops_per_sample"] == 4 * 2 * (8 * 16 + 16 * 8)  # one matmul per layer, per member
    assert cost["inference_forwards_per_sample"] == 4
    per_task = [sum(k in t for t in plugin.member_tasks) for k in range(4)]
    assert cost["task_il_forwards_per_sample"] == pytest.approx(sum(per_task) / 4)


def test_each_member_starts_from_a_fresh_initialisation(one_thread) -> None:
    """The new member does not depend on the weights learner.model held before (b covers every past task,
    so no sampled choice depends on the previous member either)."""
    stream = _task_stream(2)
    finals = []
    for perturb in (False, True):
        plugin = _zoo(tasks_per_model=5)
        learner = _learner(plugin, stream)
        learner.begin(stream)
        learner.train_experience(stream[0])
        if perturb:
            with torch.no_grad():
                for p in learner.model.parameters():
                    p.add_(1.0)
        learner.train_experience(stream[1])
        finals.append([p.detach().clone() for p in learner.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


def test_boosting_probabilities_follow_the_normalised_exponential_of_the_loss() -> None:
    losses = torch.tensor([0.1, 0.5, 2.0])
    p = boosting_probabilities(losses)
    m = losses.double().mean()
    w = torch.exp((losses.double() - m) / m)
    assert torch.allclose(p, w / w.sum()) and torch.all(p[1:] > p[:-1])
    big = boosting_probabilities(torch.tensor([0.0] * 9 + [1.0]))  # exp(9) is clipped to 1000, exp(-1) is not
    assert big[-1] == pytest.approx(1000 / (1000 + 9 * math.exp(-1)))


def _hand_zoo() -> tuple[ModelZooPlugin, list[nn.Module], Stream]:
    """Tasks {0,1}, {2,3}, {4,5}, {6,7}, {8,9} (the last is new); one member trained on tasks 0-3 that is right
    on tasks 0-2 and swaps the two classes of task 3. The memory holds the keys of inputs e_c for class c."""
    plugin = _zoo(memory_size=40, tasks_per_model=2)
    plugin.task_keys, plugin.task_ids = list(range(5)), list(range(5))
    plugin.task_classes = [[2 * k, 2 * k + 1] for k in range(5)]
    member = nn.Linear(10, 10, bias=False)
    weight = 10.0 * torch.eye(10)
    weight[[6, 7]] = weight[[7, 6]]
    member.weight.data.copy_(weight)
    plugin.member_tasks, plugin.member_weights = [[0, 1, 2, 3]], [[1.0] * 4]
    plugin.frozen = [member.state_dict()]
    y = torch.arange(8).repeat(5)
    x = F.one_hot(y, 10).float()
    stream = Stream("hand", [Experience.from_tensors(0, 0, range(8), x, y, x, y)], 10, (10,), list(range(10)),
                    "task_incremental")
    plugin.memory = ClassBalancedMemory(40)
    plugin.memory.update(stream.keys(stream[0].train), y, y // 2, torch.Generator().manual_seed(0))
    return plugin, [member], stream


class _FakeLearner:
    def __init__(self, model: nn.Module, seed: int, stream: Stream) -> None:
        self.model = model
        self.generator = torch.Generator().manual_seed(seed)
        self.stream = stream

    def fetch(self, keys: torch.Tensor) -> torch.Tensor:
        return self.stream.fetch(keys)


def test_boosting_picks_the_past_task_with_the_highest_zoo_loss(one_thread) -> None:
    plugin, modules, stream = _hand_zoo()
    learner = _FakeLearner(nn.Linear(10, 10, bias=False), seed=0, stream=stream)
    losses = [plugin.zoo_loss(learner, modules, k) for k in range(4)]
    assert max(losses[:3]) < 1e-3 and losses[3] > 9  # the swapped task is the one the zoo gets wrong
    picks = [plugin.select_past_tasks(learner, 4) for _ in range(400)]
    assert all(ls == pytest.approx(losses) for _, ls in picks)
    chosen = [past for past, _ in picks]
    assert all(len(c) == 1 for c in chosen)  # b = 2: the new task plus one past task
    share = sum(c == [3] for c in chosen) / len(chosen)
    expected = float(boosting_probabilities(torch.tensor(losses))[3])  # ~0.95
    assert expected > 0.9 and abs(share - expected) < 0.04
    again = _FakeLearner(nn.Linear(10, 10, bias=False), seed=0, stream=stream)  # draws: learner.generator
    assert [plugin.select_past_tasks(again, 4)[0] for _ in range(20)] == chosen[:20]


def test_task_il_logits_are_the_weighted_average_of_the_right_members(one_thread) -> None:
    """Three linear members over 6 classes: member 0 on task 0, member 1 on tasks 1 and 0 (weights 800 and
    100), member 2 on task 1; task 2 (classes 4, 5) is not seen yet."""
    g = torch.Generator().manual_seed(0)
    plugin = _zoo()
    plugin.task_keys, plugin.task_ids, plugin.task_classes = [0, 1], [0, 1], [[0, 1], [2, 3]]
    plugin.member_tasks = [[0], [1, 0], [1]]
    plugin.member_weights = [[800.0], [800.0, 100.0], [800.0]]
    members = [nn.Linear(4, 6) for _ in range(3)]
    for m in members:
        for p in m.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 3)
    x = torch.randn(50, 4, generator=g)
    logits = plugin.zoo_logits(members, x, n_classes=6)
    z = [m(x).detach().double() for m in members]
    sm = lambda zz, cols: torch.softmax(zz[:, cols], 1)  # noqa: E731
    p0 = (800 * sm(z[0], [0, 1]) + 100 * sm(z[1], [0, 1])) / 900
    p1 = (800 * sm(z[1], [2, 3]) + 800 * sm(z[2], [2, 3])) / 1600
    for cols, p in (([0, 1], p0), ([2, 3], p1)):
        assert torch.allclose(torch.softmax(logits[:, cols], 1), p, atol=1e-12)  # per-task: Model Zoo's average
        assert torch.equal(logits[:, cols].argmax(1), p.argmax(1))  # task-IL decision
    assert torch.all(logits[:, 4:] == MASKED_LOGIT)
    # class-IL: the joint q(T|x) p_T(c|x); member 1 splits its prior mass 2/2 by its softmax over classes 0-3,
    # members 0 and 2 put 1/2 on their own task and the prior 1/2 on the task they never saw
    s1 = torch.softmax(z[1][:, :4], 1)
    q0 = (0.5 + s1[:, :2].sum(1) + 0.5) / 3
    q1 = (0.5 + s1[:, 2:].sum(1) + 0.5) / 3
    assert torch.allclose(logits[:, :2].exp(), q0[:, None] * p0, atol=1e-12)
    assert torch.allclose(logits[:, 2:4].exp(), q1[:, None] * p1, atol=1e-12)
    plugin.weighting = "uniform"  # the weights are stored per member: equal weights give the plain mean
    plugin.member_weights = [[1.0], [1.0, 1.0], [1.0]]
    uniform = plugin.zoo_logits(members, x, n_classes=6)
    assert torch.allclose(torch.softmax(uniform[:, :2], 1), (sm(z[0], [0, 1]) + sm(z[1], [0, 1])) / 2, atol=1e-12)


def test_default_weighting_is_the_papers_plain_mean_of_the_members_that_saw_a_task(one_thread) -> None:
    """Ramesh & Chaudhari 2022 average the members trained on a task equally; the default does the same (the
    old default weighed the first member of a task by its 4-5x larger sample count)."""
    stream = _task_stream()
    (plugin,) = model_zoo(memory_size=40, tasks_per_model=3)
    assert plugin.weighting == "uniform"
    learner = _learner(plugin, stream)
    learner.fit(stream)
    assert all(set(w) == {1.0} for w in plugin.member_weights)
    x = stream[0].x_test
    members = plugin.members(learner)
    logits = plugin.zoo_logits(members, x, stream.n_classes)
    for k, cols in enumerate(plugin.task_classes):
        saw = [m for m, tasks in zip(members, plugin.member_tasks, strict=True) if k in tasks]
        assert len(saw) >= 2 or k == len(plugin.task_classes) - 1
        with torch.no_grad():
            mean = sum(torch.softmax(m(x).double()[:, cols], 1) for m in saw) / len(saw)
        assert torch.allclose(torch.softmax(logits[:, cols], 1), mean, atol=1e-10)
    (samples,) = model_zoo(memory_size=40, tasks_per_model=3, weighting="samples")  # the option stays
    assert samples.weighting == "samples"


def test_isolated_predicts_each_task_with_its_own_member_only(one_thread) -> None:
    stream = _task_stream(3)
    (plugin,) = isolated()
    learner = _learner(plugin, stream)
    learner.fit(stream)
    assert plugin.member_tasks == [[0], [1], [2]] and plugin.memory_usage()[0] == 0
    members = plugin.members(learner)
    x = torch.cat([e.x_test for e in stream])
    logits = learner.logits(x, torch.zeros(len(x), dtype=torch.long))
    for k, m in enumerate(members):
        cols = [2 * k, 2 * k + 1]
        own = F.log_softmax(m.eval()(x).detach().double()[:, cols], 1)
        assert torch.allclose(torch.log_softmax(logits[:, cols], 1), own, atol=1e-12)


def test_checkpoint_restores_members_and_training_continues_identically(one_thread) -> None:
    stream = _task_stream()
    plugin = _zoo(tasks_per_model=2)
    learner = _learner(plugin, stream)
    learner.begin(stream)
    for exp in stream.experiences[:3]:
        learner.train_experience(exp)
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    restored_plugin = _zoo(tasks_per_model=2)
    restored = _learner(restored_plugin, stream)
    restored.load_state_dict(state)
    restored.begin(stream)  # before_fit runs again on resume
    assert restored_plugin.member_tasks == plugin.member_tasks and len(restored_plugin.frozen) == 2
    x = torch.cat([e.x_test for e in stream])
    t = torch.zeros(len(x), dtype=torch.long)
    assert torch.equal(restored.logits(x, t), learner.logits(x, t))
    for lrn in (learner, restored):  # the fourth experience samples a past task and trains a new member
        lrn.train_experience(stream[3])
    assert restored_plugin.member_tasks == plugin.member_tasks
    assert torch.equal(restored.logits(x, t), learner.logits(x, t))


@pytest.mark.slow
def test_model_zoo_beats_naive_on_task_il_split_mnist(tmp_path, one_thread) -> None:
    config = {
        "name": "mz", "scenario": {"name": "task_incremental", "dataset": "mnist5k", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": [100, 100]},
        "strategy": [{"name": "naive"}, {"name": "model_zoo", "memory_size": 500}, {"name": "isolated"}],
        "train": {"epochs": 1, "batch_size": 10, "optimizer": "sgd", "lr": 0.1}, "seeds": [0],
    }
    naive, zoo, iso = cltoolbox.run(config, out=str(tmp_path), quiet=True)
    assert zoo["task_il"]["acc"] >= 0.95 and zoo["task_il"]["acc"] > naive["task_il"]["acc"] + 0.05
    assert iso["task_il"]["acc"] > naive["task_il"]["acc"] + 0.05
    assert zoo["cost"]["zoo_members"] == 5 and zoo["cost"]["ensemble_params"] == 5 * zoo["cost"]["n_params"]
    assert zoo["cost"]["memory_items"] == 500
