"""EWC, online EWC, SI and MAS: exact importances, penalties, state, and forgetting reduced on real data."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import cltoolbox
from cltoolbox.data import load_dataset
from cltoolbox.errors import ConfigError
from cltoolbox.flat import flat_parameters
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.per_sample import per_sample_mean
from cltoolbox.plugin import Plugin
from cltoolbox.registry import MODELS, SCENARIOS, STRATEGIES
from cltoolbox.strategies.regularization import (
    EWCPlugin,
    MASPlugin,
    SIPlugin,
    empirical_fisher,
    output_sensitivity,
)


def _learner(plugins: list[Plugin], scenario: str = "permuted", momentum: float = 0.0, lr: float = 0.05,
             **params) -> tuple:
    data = load_dataset("digits")
    params = params or {"n_experiences": 3, "train_samples": 300}
    stream = SCENARIOS.get(scenario).factory(data, 0, **params)
    torch.manual_seed(0)
    model = MODELS.get("mlp").factory(stream.input_shape, stream.n_classes, hidden=[32])
    config = TrainConfig(epochs=1, batch_size=32, lr=lr, momentum=momentum, device="cpu")
    learner = Learner(model, plugins, config, seed=0)
    learner.begin(stream)
    return learner, stream


def _reference(learner, x, t, y, objective, kind: str) -> torch.Tensor:
    """Per-sample gradients with a plain Python loop (test only)."""
    params = [p for p in learner.model.parameters() if p.requires_grad]
    learner.model.eval()
    total = torch.zeros(sum(p.numel() for p in params))
    for i in range(x.shape[0]):
        value = objective(learner.model(x[i : i + 1]), t[i : i + 1], y[i : i + 1]).sum()
        g = torch.cat([v.reshape(-1) for v in torch.autograd.grad(value, params)])
        total += g.square() if kind == "square" else g.abs()
    learner.model.train()
    return total / x.shape[0]


@pytest.mark.parametrize("scenario", ["permuted", "task_incremental"])
def test_fisher_and_mas_importance_are_exact_per_sample_means(scenario: str) -> None:
    params = {"n_experiences": 3, "train_samples": 300} if scenario == "permuted" else {"n_experiences": 5}
    learner, stream = _learner([], scenario, **params)
    learner.train_experience(stream[0])
    exp = stream[1]
    x, y = exp.x_train[:40], exp.y_train[:40]
    t = torch.full_like(y, exp.task_id)
    mask = learner.task_mask

    def nll(logits, ti, yi):
        if learner.multi_head:
            logits = logits.masked_fill(~mask[ti], -1e9)
        return F.cross_entropy(logits, yi, reduction="none")

    def sq_norm(logits, ti, yi):  # multi-head: the task's own outputs only
        return (logits * mask[ti] if learner.multi_head else logits).square().sum(1)

    fisher = empirical_fisher(learner, x, y, exp.task_id)
    assert torch.allclose(fisher, _reference(learner, x, t, y, nll, "square"), rtol=1e-4, atol=1e-8)
    mas = output_sensitivity(learner, x, exp.task_id)
    # stream keys (fetched chunk by chunk) give exactly the importances of the inputs themselves, on both paths
    keys = stream.keys(exp.train)[:40]
    assert torch.equal(empirical_fisher(learner, keys, y, exp.task_id), fisher)
    assert torch.equal(output_sensitivity(learner, keys, exp.task_id), mas)
    assert torch.equal(per_sample_mean(learner, keys, t, y, nll, "square", method="vmap"),
                       per_sample_mean(learner, x, t, y, nll, "square", method="vmap"))
    assert torch.allclose(mas, _reference(learner, x, t, y, sq_norm, "abs"), rtol=1e-4, atol=1e-7)
    # the Linear-layer matmul path and the generic vmap path agree
    assert torch.allclose(fisher, per_sample_mean(learner, x, t, y, nll, "square", method="vmap"), rtol=1e-4,
                          atol=1e-8)
    assert torch.allclose(mas, per_sample_mean(learner, x, t, y, sq_norm, "abs", method="vmap"), rtol=1e-4,
                          atol=1e-7)
    assert fisher.min() >= 0 and fisher.max() > 0 and mas.max() > 0
    if learner.multi_head:  # MAS ignores the -1e9 fill: the other tasks' head rows get no importance
        head = learner.model.head
        n_before = sum(p.numel() for p in learner.model.parameters()) - head.weight.numel() - head.bias.numel()
        w = mas[n_before : n_before + head.weight.numel()].reshape(head.weight.shape)
        other = ~mask[exp.task_id]
        assert w[other].abs().max() == 0 and w[~other].abs().max() > 0


def test_ewc_keeps_one_penalty_per_experience_and_online_ewc_one_running_fisher() -> None:
    ewc, online = EWCPlugin(10.0, online=False), EWCPlugin(10.0, online=True, gamma=0.5)
    learner, stream = _learner([ewc, online])
    fishers, anchors = [], []
    for exp in stream:
        learner.train_experience(exp)
        fishers.append(empirical_fisher(learner, stream.keys(exp.train), exp.y_train, exp.task_id))
        anchors.append(flat_parameters(list(learner.model.parameters())).detach().clone())
    assert ewc.fisher.shape == (3, fishers[0].numel()) and online.fisher.shape == (1, fishers[0].numel())
    for k in range(3):
        assert torch.allclose(ewc.fisher[k], fishers[k]) and torch.equal(ewc.anchor[k], anchors[k])
    expected = 0.25 * fishers[0] + 0.5 * fishers[1] + fishers[2]
    assert torch.allclose(online.fisher[0], expected) and torch.equal(online.anchor[0], anchors[2])

    with torch.no_grad():  # move away from every anchor, then check both penalties against their formulas
        for p in learner.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    theta = flat_parameters(list(learner.model.parameters()))
    want = sum(5.0 * (fishers[k] * (theta - anchors[k]) ** 2).sum() for k in range(3))
    assert torch.allclose(ewc.loss(learner, None, None), want)
    assert torch.allclose(online.loss(learner, None, None), 5.0 * (expected * (theta - anchors[2]) ** 2).sum())
    p_bytes = theta.numel() * 4
    assert ewc.memory_usage() == (0, 2 * 3 * p_bytes) and online.memory_usage() == (0, 2 * p_bytes)


class _PathSpy(Plugin):
    """Recomputes SI's path integral independently: sum over steps of -grad * actual parameter change."""

    def __init__(self) -> None:
        self.path = self.sgd_path = self.start = None

    def before_experience(self, learner, exp) -> None:
        self.start = flat_parameters(list(learner.model.parameters())).detach().clone()
        self.path = torch.zeros_like(self.start)
        self.sgd_path = torch.zeros_like(self.start)

    def after_backward(self, learner, batch) -> None:
        self.g = torch.cat([p.grad.reshape(-1) for p in learner.model.parameters()]).clone()
        self.before = flat_parameters(list(learner.model.parameters())).detach().clone()

    def after_step(self, learner, batch) -> None:
        delta = flat_parameters(list(learner.model.parameters())).detach() - self.before
        self.path -= self.g * delta
        self.sgd_path += learner.config.lr * self.g**2  # what -g * (-lr g) would give, ignoring momentum


def test_si_path_integral_uses_the_actual_step_with_momentum() -> None:
    si_plugin, spy = SIPlugin(si_c=1.0, xi=0.1), _PathSpy()
    learner, stream = _learner([spy, si_plugin], momentum=0.9)
    learner.train_experience(stream[0])
    theta = flat_parameters(list(learner.model.parameters())).detach()
    want = (spy.path / ((theta - spy.start) ** 2 + 0.1)).clamp(min=0)
    assert torch.allclose(si_plugin.omega, want, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(spy.path, spy.sgd_path, rtol=0.1)  # momentum makes the actual step differ
    assert torch.equal(si_plugin.anchor, theta)


def test_si_penalty_is_active_from_experience_two_and_changes_results() -> None:
    """Guards against the 'SI == naive' failure (importance never updated, clipped to ~0, or unused)."""

    class PenaltyProbe(Plugin):
        values: list[tuple[int, float]] = []

        def after_step(self, learner, batch):
            value = torch.as_tensor(si_plugin.loss(learner, batch, None)).detach()
            PenaltyProbe.values.append((learner.experience.index, float(value)))

    si_plugin = SIPlugin(si_c=1.0, xi=0.1)
    setting = {"lr": 0.1, "n_experiences": 3, "train_samples": None}  # digits, ~1400 images per experience
    learner, stream = _learner([si_plugin, PenaltyProbe()], **setting)
    naive, _ = _learner([], **setting)
    accs = []
    for lrn in (learner, naive):
        for exp in stream:
            lrn.train_experience(exp)
        x, y = stream[0].x_test, stream[0].y_test
        accs.append(float((lrn.logits(x, torch.zeros_like(y)).argmax(1) == y).float().mean()))
    first = [v for i, v in PenaltyProbe.values if i == 0]
    later = [v for i, v in PenaltyProbe.values if i >= 1]
    assert all(v == 0 for v in first)  # nothing to protect during the first experience
    assert min(later) > 0  # from the first step of experience 2 on, the penalty is active
    assert (si_plugin.omega > 0).float().mean() > 0.5 and si_plugin.omega.max() > 0.1
    # the protected model ends up elsewhere than plain fine-tuning, and remembers experience 1 better
    theta_si = flat_parameters(list(learner.model.parameters()))
    theta_naive = flat_parameters(list(naive.model.parameters()))
    assert (theta_si - theta_naive).abs().max() > 0.05
    assert accs[0] > accs[1] + 0.03, accs


def test_mas_accumulates_importance_by_summing() -> None:
    mas = MASPlugin(1.0)
    learner, stream = _learner([mas])
    learner.train_experience(stream[0])
    first = mas.omega.clone()
    learner.train_experience(stream[1])
    new = output_sensitivity(learner, stream.keys(stream[1].train), stream[1].task_id)
    assert torch.allclose(mas.omega, first + new)
    assert mas.memory_usage() == (0, 2 * first.numel() * 4)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _importance(n: int, seed: int) -> torch.Tensor:
    """Non-negative weights spanning many magnitudes, with zeros and subnormals (where rounding differs)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) * 10.0 ** torch.randint(-12, 3, (n,), generator=g).float()
    w[::17] = 0.0
    w[::23] = torch.rand(w[::23].shape, generator=g) * 1e-40
    return w


@pytest.mark.parametrize("kind", ["ewc", "si", "mas"])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
def test_penalty_value_and_gradient_are_autograd_bit_for_bit(kind: str, grad_scale: float) -> None:
    """The closed-form penalty (_WeightedSquare) against the plain expression differentiated by autograd,
    added to a cross-entropy as in the loop (the two gradients meet in each parameter's accumulation)."""
    plugin = {"ewc": EWCPlugin(3.0, online=False), "si": SIPlugin(0.1, 0.1), "mas": MASPlugin(0.7)}[kind]
    learner, stream = _learner([plugin])
    params = list(learner.model.parameters())
    n = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(3)
    if kind == "ewc":
        plugin.fisher = torch.stack([_importance(n, 1), _importance(n, 2)])
        plugin.anchor = torch.stack([flat_parameters(params).detach() + 0.01 * torch.randn(n, generator=g)
                                     for _ in range(2)])
        f_sum, mean, const = plugin._collapse()

        def reference(theta):
            return 0.5 * 3.0 * ((f_sum * (theta - mean).square()).sum() + const)
    else:
        plugin.omega = _importance(n, 4)
        plugin.anchor = flat_parameters(params).detach() + 0.01 * torch.randn(n, generator=g)
        scale = 0.1 if kind == "si" else 0.7

        def reference(theta):
            return scale * (plugin.omega * (theta - plugin.anchor).square()).sum()
    x, y = stream[0].x_train[:32], stream[0].y_train[:32]
    results = []
    for use_plugin in (True, False):
        for _ in range(2):  # twice: the cached gradient factor is used from the second step on
            learner.step += 1
            for p in params:
                p.grad = None
            pen = plugin.loss(learner, None, None) if use_plugin else reference(flat_parameters(params))
            loss = F.cross_entropy(learner.model(x), y) + pen
            (loss * grad_scale).backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (value, grads), (want_value, want_grads) = results
    assert torch.equal(_bits(value), _bits(want_value))
    for a, b in zip(grads, want_grads, strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_si_gradient_correction_matches_the_plain_formula_bit_for_bit() -> None:
    """after_backward's task-loss gradient, p.grad - 2c Omega (theta - theta*), with theta - theta* reused
    from the penalty's forward: bit for bit the plain formula (also for subnormal c Omega)."""
    for subnormal in (False, True):
        si_plugin = SIPlugin(si_c=0.3, xi=0.1)
        learner, stream = _learner([si_plugin])
        params = list(learner.model.parameters())
        n = sum(p.numel() for p in params)
        si_plugin.omega = _importance(n, 5) if subnormal else torch.rand(n, generator=torch.Generator().manual_seed(5))
        si_plugin.anchor = flat_parameters(params).detach() + 0.01
        x, y = stream[0].x_train[:32], stream[0].y_train[:32]
        for _ in range(2):
            learner.step += 1
            for p in params:
                p.grad = None
            (F.cross_entropy(learner.model(x), y) + si_plugin.loss(learner, None, None)).backward()
            si_plugin.after_backward(learner, None)
            theta = flat_parameters(params).detach()
            want = torch.cat([p.grad.reshape(-1) for p in params]) - 2 * 0.3 * si_plugin.omega * (
                theta - si_plugin.anchor)
            assert torch.equal(_bits(si_plugin._grad), _bits(want))


STATE_PARAMS = {"ewc": {"ewc_lambda": 10.0}, "online_ewc": {"ewc_lambda": 10.0}, "si": {}, "mas": {}}


@pytest.mark.parametrize("name", list(STATE_PARAMS))
def test_state_survives_a_weights_only_checkpoint(name: str) -> None:
    (plugin,) = STRATEGIES.get(name).factory(**STATE_PARAMS[name])
    learner, stream = _learner([plugin])
    learner.train_experience(stream[0])
    learner.train_experience(stream[1])
    buf = io.BytesIO()
    torch.save(plugin.state_dict(), buf)
    buf.seek(0)
    (fresh,) = STRATEGIES.get(name).factory(**STATE_PARAMS[name])
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        for p in learner.model.parameters():
            p.mul_(1.01)
    assert float(plugin.loss(learner, None, None).detach()) > 0
    assert torch.equal(plugin.loss(learner, None, None), fresh.loss(learner, None, None))


@pytest.mark.parametrize("name, params", [
    ("ewc", {"ewc_lambda": -1.0}), ("online_ewc", {"gamma": 0.0}), ("online_ewc", {"gamma": 1.5}),
    ("si", {"si_c": -0.1}), ("si", {"xi": 0.0}), ("mas", {"mas_lambda": float("nan")}),
])
def test_invalid_hyperparameters_are_config_errors(name: str, params: dict) -> None:
    with pytest.raises(ConfigError, match=f"strategy.{next(iter(params))}"):
        STRATEGIES.get(name).factory(**params)


# Permuted-MNIST-5k, 5 experiences, 2x100 MLP, plain SGD (lr 0.1, batch 10), 1 epoch, one seed: the
# full-size setting of experiments/regularization_check.py (about 3 s of CPU per run). Values tuned there.
SLOW_STRATEGIES = {
    "ewc": {"ewc_lambda": 3.0},
    "online_ewc": {"ewc_lambda": 10.0},
    "si": {"si_c": 0.1, "xi": 0.1},
    "mas": {"mas_lambda": 0.03},
}


@pytest.mark.slow
def test_regularizers_reduce_forgetting_on_permuted_mnist(tmp_path, one_thread) -> None:
    config = {
        "name": "reg", "scenario": {"name": "permuted", "dataset": "mnist5k", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": [100, 100]},
        "strategy": [{"name": "naive"}, *({"name": n, **p} for n, p in SLOW_STRATEGIES.items())],
        "train": {"epochs": 1, "batch_size": 10, "lr": 0.1, "device": "cpu"},
        "seeds": [0], "out": str(tmp_path),
    }
    results = {r["labels"]["strategy"]: r["class_il"] for r in cltoolbox.run(config, quiet=True)}
    naive = results["naive"]
    assert naive["forgetting"] > 0.06, naive  # the setting does forget (about 0.09)
    for name in SLOW_STRATEGIES:  # each 0.003-0.04 on seed 0
        r = results[name]
        assert r["forgetting"] < 0.5 * naive["forgetting"], (name, r, naive)
        assert r["acc"] > naive["acc"] + 0.01, (name, r, naive)
