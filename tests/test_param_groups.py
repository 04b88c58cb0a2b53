"""The ``param_groups`` hook: plugins give the loop's optimizer parameter groups with their own settings."""

from __future__ import annotations

import pytest
import torch

from cltoolbox.errors import PluginError
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.plugin import Plugin, check_composition
from cltoolbox.registry import MODELS


class HeadFast(Plugin):
    """The head at 10x the configured lr; everything else left to the loop."""

    def param_groups(self, learner, params):
        return [{"params": list(learner.model.head.parameters()), "lr": 10 * learner.config.lr}]


class Extra(Plugin):
    def __init__(self) -> None:
        self.w = torch.zeros(3, requires_grad=True)

    def parameters(self):
        return [self.w]


def _model():
    torch.manual_seed(0)
    return MODELS.get("mlp").factory((8,), 4, hidden=[16])


def test_named_groups_keep_their_settings_and_the_rest_gets_train_defaults() -> None:
    model, extra = _model(), Extra()
    learner = Learner(model, [HeadFast(), extra], TrainConfig(lr=0.1, momentum=0.9, weight_decay=1e-3), seed=0)
    head, rest = learner.make_optimizer().param_groups
    assert head["lr"] == pytest.approx(1.0) and head["momentum"] == 0.9 and head["weight_decay"] == 1e-3
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert rest["lr"] == 0.1  # the tensors no group names: body and the plugin's own tensor
    assert {id(p) for p in rest["params"]} == {id(p) for p in model.body.parameters()} | {id(extra.w)}


def test_training_follows_the_groups(tmp_path) -> None:
    """One SGD step through train_data: the head moves by 10x lr * grad, the body by lr * grad."""
    model = _model()
    learner = Learner(model, [HeadFast()], TrainConfig(lr=0.1, batch_size=4), seed=0)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters())),
                     strict=True))
    learner.train_data(x, y, torch.zeros(4, dtype=torch.int64), epochs=1)  # one batch: the same gradient
    after = model.state_dict()
    torch.testing.assert_close(after["head.weight"], before["head.weight"] - 1.0 * grads["head.weight"])
    torch.testing.assert_close(after["body.1.weight"], before["body.1.weight"] - 0.1 * grads["body.1.weight"])


def test_bad_groups_are_one_line_plugin_errors() -> None:
    class Twice(Plugin):
        def param_groups(self, learner, params):
            return [{"params": params}, {"params": params[:1]}]

    class Foreign(Plugin):
        def param_groups(self, learner, params):
            return [{"params": [torch.zeros(2, requires_grad=True)]}]

    class NoParams(Plugin):
        def param_groups(self, learner, params):
            return [{"lr": 0.1}]

    for plugin, words in ((Twice(), "two groups"), (Foreign(), "not among"), (NoParams(), "'params'")):
        with pytest.raises(PluginError, match=words) as info:
            Learner(_model(), [plugin], TrainConfig(), seed=0).make_optimizer()
        assert "\n" not in str(info.value)


def test_first_answer_wins_and_two_answering_plugins_are_refused() -> None:
    class Other(HeadFast):
        pass

    with pytest.raises(PluginError, match="param_groups"):
        check_composition([HeadFast(), Other()])

    class Sharing(HeadFast):
        composes = frozenset({"param_groups"})

        def param_groups(self, learner, params):
            return None  # defers to the other plugin

    learner = Learner(_model(), [Sharing(), HeadFast()], TrainConfig(lr=0.1), seed=0)
    assert [g["lr"] for g in learner.make_optimizer().param_groups] == [pytest.approx(1.0), 0.1]
    assert len(Learner(_model(), [], TrainConfig(lr=0.1), seed=0).make_optimizer().param_groups) == 1
