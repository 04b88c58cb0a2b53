"""der_expand, memo, foster and xder: one test per mechanism (each fails if the mechanism is removed) and a
learning test each. Resume, determinism and memory accounting are covered for every registered strategy by
test_conformance.py; file-backed streams here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_exemplar_strategies import _class_il_acc, _file_stream, _fit

from cltoolbox.errors import ConfigError
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.models.mlp import mlp
from cltoolbox.plugin import Batch
from cltoolbox.registry import STRATEGIES
from cltoolbox.strategies.expansion import Split
from cltoolbox.strategies.foster import balanced_kd, effective_number_weights
from cltoolbox.strategies.xder import XDERPlugin, rescale_update, supcon


def _mean_acc(learner, stream) -> float:
    return sum(_class_il_acc(learner, stream)) / len(stream)


@pytest.fixture(scope="module")
def naive_acc() -> float:
    learner, stream = _fit("naive")
    return _mean_acc(learner, stream)


# -- learning -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["der_expand", "memo", "foster", "xder"])
def test_learns_beyond_naive(name: str, naive_acc: float) -> None:
    learner, stream = _fit(name, memory_size=60)
    assert _mean_acc(learner, stream) > naive_acc + 0.25


@pytest.mark.parametrize("name", ["der_expand", "memo", "foster", "xder"])
def test_task_incremental_streams(name: str) -> None:
    from toys import gaussian_pairs_stream

    stream = gaussian_pairs_stream(n_exp=3, per_class=60, task_labels=True)
    learner, _ = _fit(name, stream, epochs=1, memory_size=60)
    for e in stream:  # task-IL: logits masked to the experience's task
        t = torch.full((e.n_test,), e.task_id, dtype=torch.long)
        logits = learner.logits(e.x_test, t).masked_fill(~learner.task_mask[t], -1e9)
        assert float((logits.argmax(1) == e.y_test).float().mean()) > 0.9


# -- DER / MEMO ---------------------------------------------------------------------------------------------------
def test_der_expand_grows_one_frozen_extractor_per_step() -> None:
    learner, stream = _fit("der_expand", memory_size=60, epochs=1, balanced_epochs=1)
    plugin = learner.plugins[0]
    branches = plugin.branches
    assert len(branches.states) == 2 and branches.fc.in_features == 3 * 32
    per_branch = branches.split.branch_params()
    assert per_branch == 8 * 32 + 32  # the whole body of the mlp
    growth = [b - a for a, b in zip(plugin.params_per_exp, plugin.params_per_exp[1:], strict=False)]
    assert all(g == per_branch + 32 * 6 for g in growth)  # one extractor + the classifier's new columns
    cost = plugin.cost()
    assert cost["expansion_params"] == plugin.params_per_exp[-1] and cost["params_exp_0"] < cost["params_exp_2"]
    # the first extractor was frozen after experience 0: training experience 2 left it as it was
    first = branches.frozen(learner.device)[0]
    assert all(torch.equal(v, branches.states[0][k]) for k, v in first.state_dict().items())
    assert not any(p.requires_grad for p in first.parameters())
    live = branches.split.branch.state_dict()
    assert any(not torch.equal(v, branches.states[0][k]) for k, v in live.items())


def test_der_pruning_removes_units_and_counts_only_kept_weights() -> None:
    learner, stream = _fit("der_expand", memory_size=60, epochs=2, balanced_epochs=1, prune=True)
    plugin = learner.plugins[0]
    branches = plugin.branches
    full = branches.split.branch_params()
    assert len(branches.sizes) == 3 and all(0 < n < full for n in branches.sizes)
    frozen = branches.frozen(learner.device)[0]
    layer = next(m for m in frozen if isinstance(m, torch.nn.Linear))
    dead = (layer.weight == 0).all(1)
    assert 0 < int(dead.sum()) < layer.out_features and (layer.bias[dead] == 0).all()
    kept = int((~dead).sum())
    assert branches.sizes[0] == 8 * kept + kept  # the one-layer branch: kept units' weights and biases
    assert plugin.cost()["expansion_params"] < plugin.cost()["params_exp_0"] - branches.sizes[0] + 3 * full
    with pytest.raises(ConfigError, match="prune"):
        from cltoolbox.models.resnet import reduced_resnet18

        STRATEGIES.get("der_expand").factory(prune=True)[0].check(reduced_resnet18((3, 8, 8), 4, nf=4), stream)


def test_der_aux_targets_map_old_classes_to_one_output() -> None:
    plugin = STRATEGIES.get("der_expand").factory()[0]
    plugin._seen_mask = torch.ones(6, dtype=torch.bool)
    plugin.current_classes = torch.tensor([4, 5])
    assert plugin.aux_targets(torch.tensor([0, 3, 4, 5, 1])).tolist() == [0, 0, 1, 2, 0]


def test_memo_shares_the_trunk_and_freezes_it() -> None:
    from toys import gaussian_pairs_stream

    stream = gaussian_pairs_stream(n_exp=3, per_class=60)
    model = mlp(stream.input_shape, stream.n_classes, hidden=[16, 32])
    split = Split(model, shared=True)
    assert split.trunk_params() == 8 * 16 + 16 and split.branch_params() == 16 * 32 + 32
    # on two layers the first is the trunk: trained with the first experience only
    torch.manual_seed(0)
    plugins = STRATEGIES.get("memo").factory(memory_size=60, balanced_epochs=1)
    learner = Learner(mlp(stream.input_shape, stream.n_classes, hidden=[16, 32]), plugins,
                      TrainConfig(epochs=1, batch_size=10, lr=0.05, device="cpu"), seed=0)
    learner.begin(stream)
    learner.train_experience(stream.experiences[0])
    trunk = {k: v.clone() for k, v in plugins[0].branches.split.trunk.state_dict().items()}
    for e in stream.experiences[1:]:
        learner.train_experience(e)
    assert all(torch.equal(v, plugins[0].branches.split.trunk.state_dict()[k]) for k, v in trunk.items())
    der_plugin = STRATEGIES.get("der_expand").factory()[0]
    der_plugin.branches.setup(mlp(stream.input_shape, stream.n_classes, hidden=[16, 32]), False, 6, "cpu")
    assert plugins[0].branches.split.branch_params() < der_plugin.branches.split.branch_params()


def test_expansion_rejects_models_it_cannot_split() -> None:
    with pytest.raises(ConfigError, match="mlp or resnet18_reduced"):
        Split(torch.nn.Linear(4, 2), shared=True)


def test_resnet_split_of_memo_is_the_last_stage() -> None:
    from cltoolbox.models.resnet import reduced_resnet18

    model = reduced_resnet18((3, 8, 8), 4, nf=4)
    split = Split(model, shared=True)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(split.branch(split.trunk(x)), model.features(x))
    assert split.branch_params() == sum(p.numel() for p in model.stages[-2:].parameters())
    full = Split(model, shared=False)
    assert torch.allclose(full.branch(full.trunk(x)), model.features(x))


def test_memo_on_resnet_keeps_the_shared_stages_and_their_statistics(tmp_path) -> None:
    from cltoolbox.models.resnet import reduced_resnet18

    stream = _file_stream(tmp_path)
    torch.manual_seed(0)
    plugins = STRATEGIES.get("memo").factory(memory_size=30, balanced_epochs=1)
    learner = Learner(reduced_resnet18(stream.input_shape, 6, nf=4), plugins,
                      TrainConfig(epochs=1, batch_size=8, lr=0.05, device="cpu", workers=0), seed=0)
    learner.begin(stream)
    learner.train_experience(stream.experiences[0])
    trunk = {k: v.clone() for k, v in plugins[0].branches.split.trunk.state_dict().items()}
    assert any("running_mean" in k for k in trunk)
    for e in stream.experiences[1:]:
        learner.train_experience(e)
    after = plugins[0].branches.split.trunk.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in trunk.items())  # weights and BN statistics
    assert len(plugins[0].branches.states) == 2 and plugins[0].branches.fc.in_features == 3 * 32


# -- FOSTER -------------------------------------------------------------------------------------------------------
def test_foster_weights_and_balanced_kd() -> None:
    w = effective_number_weights(torch.tensor([0, 10, 100]), 0.96)
    raw = torch.tensor([(1 - 0.96) / (1 - 0.96**10), (1 - 0.96) / (1 - 0.96**100)])
    assert w[0] == 1 and torch.allclose(w[1:], raw / raw.mean())
    assert w[1] > w[2]  # fewer samples, larger weight
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    allowed = torch.ones(3, dtype=torch.bool)
    plain = -(F.softmax(t / 2, 1) * F.log_softmax(s / 2, 1)).sum(1).mean()
    assert torch.isclose(balanced_kd(s, t, torch.ones(3), 2.0, allowed), plain)
    # more weight on class 2, where the student's log-probability is lowest: a larger loss
    assert balanced_kd(s, t, torch.tensor([1.0, 1.0, 3.0]), 2.0, allowed) > plain + 0.05


def test_foster_compresses_back_to_one_backbone() -> None:
    learner, stream = _fit("foster", memory_size=60, epochs=1)
    plugin = learner.plugins[0]
    n_model = sum(p.numel() for p in learner.model.parameters())
    assert plugin.fc is None and plugin._boosted is None  # nothing of the boosted pair is left
    assert plugin.cost()["boosting_params"] == 2 * n_model + (2 * 32 + 1) * 6
    assert plugin.parameters() == []


# -- X-DER --------------------------------------------------------------------------------------------------------
def test_supcon_prefers_class_clusters() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    clustered = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1]]), dim=1)
    mixed = clustered[[0, 2, 1, 3]]
    assert supcon(clustered, labels, 0.5) < supcon(mixed, labels, 0.5)
    assert supcon(clustered, torch.tensor([0, 1, 2, 3]), 0.5) == 0  # no positives


def test_xder_rescales_updates_below_ground_truth() -> None:
    new = torch.tensor([[1.0, 4.0], [0.5, 0.2]])
    out = rescale_update(new, torch.tensor([2.0, 2.0]), 0.85)
    assert torch.isclose(out[0].max(), torch.tensor(1.7)) and torch.allclose(out[1], new[1])


def test_xder_stream_ce_only_on_current_classes() -> None:
    plugin = XDERPlugin(10, 0.3, 0.8, 0.85, 0.05, 5.0, None)
    plugin._current = torch.tensor([False, False, True, True, False, False])
    logits = torch.randn(3, 6, requires_grad=True)
    plugin.criterion(None, Batch(torch.zeros(3, 1), torch.tensor([2, 3, 2]), torch.zeros(3, dtype=torch.long)),
                     logits).backward()
    assert torch.all(logits.grad[:, [0, 1, 4, 5]] == 0) and torch.all(logits.grad[:, 2:4] != 0)


def test_xder_updates_past_logits_with_new_classes_only() -> None:
    learner, stream = _fit("xder", memory_size=60, epochs=1)
    plugin, mem = learner.plugins[0], learner.plugins[0].memory
    key, y = mem.key[: mem.size].clone(), mem.y[: mem.size].clone()
    mem.logits[: mem.size, 4:] = 0.0  # as if classes 4-5 were new: their columns of past entries get rewritten
    z_before = mem.logits[: mem.size].clone()
    now = plugin._logits(learner, key)
    plugin.before_experience(learner, stream.experiences[2])  # the last classes again: 4 and 5 are "current"
    plugin.after_experience(learner, stream.experiences[2])
    after = dict(zip(mem.key[: mem.size].tolist(), mem.logits[: mem.size], strict=True))
    past = torch.nonzero(y < 4).flatten()
    assert len(past) > 0
    for i in past.tolist():  # a past entry: other classes' columns as stored, 4-5 the model's, capped below gt
        z = after[int(key[i])]
        assert torch.equal(z[:4], z_before[i][:4])
        expected = rescale_update(now[i : i + 1, 4:], z_before[i, y[i]].reshape(1), 0.85)[0]
        assert torch.allclose(z[4:], expected)
    assert torch.stack([after[int(key[i])] for i in past.tolist()])[:, 4:].abs().sum() > 0


def test_config_errors() -> None:
    for name, bad, field in [("der_expand", {"aux_weight": -1}, "aux_weight"),
                             ("memo", {"balanced_lr": 0}, "balanced_lr"),
                             ("foster", {"beta1": 1.0}, "beta1"), ("foster", {"compression_epochs": 0}, "compression"),
                             ("xder", {"gamma": 0}, "gamma"), ("xder", {"margin": 2}, "margin")]:
        with pytest.raises(ConfigError, match=field):
            STRATEGIES.get(name).factory(**bad)


# -- file-backed streams ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["der_expand", "memo", "foster", "xder"])
def test_runs_on_file_backed_streams_with_keys_only(name: str, tmp_path) -> None:
    stream = _file_stream(tmp_path)
    assert stream.file_backed()
    torch.manual_seed(0)
    params = {"balanced_epochs": 1} if name in ("der_expand", "memo") else {}
    plugins = STRATEGIES.get(name).factory(memory_size=30, **params)
    learner = Learner(mlp(stream.input_shape, 6, hidden=[16, 16]), plugins,
                      TrainConfig(epochs=2, batch_size=8, lr=0.05, device="cpu", workers=0), seed=0)
    learner.fit(stream)
    mem = learner.plugins[0].memory
    assert mem.size == 30 and mem.key.dtype == torch.int64
    assert learner.fetch(mem.key[: mem.size]).shape == (30, 3, 8, 8)
    assert all(0 <= a <= 1 for a in _class_il_acc(learner, stream))


# -- the conformance kit on the settings its defaults skip -----------------------------------------------------------
def test_contract_with_pruning_and_with_a_shared_trunk() -> None:
    """Resume after a kill, determinism and memory accounting with DER's pruning on, and with MEMO on a two-layer mlp
    (the default one-layer test model has no weights in MEMO's shared trunk, so its freezing is not exercised)."""
    from cltoolbox.testing import check_strategy

    check_strategy("der_expand", params={"memory_size": 60, "balanced_epochs": 2, "prune": True})
    check_strategy("memo", params={"memory_size": 60, "balanced_epochs": 1}, model={"name": "mlp", "hidden": [16, 32]})
