"""The speed-ups that must not change a result: each fast path against the plain computation it replaces,
bit for bit (PlainSGD vs torch.optim.SGD, the evaluation pass vs a per-experience reference), and the atomic
replacement of existing files. The regularisers' closed-form penalty gradient is in test_regularization.py."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cltoolbox.data import load_dataset
from cltoolbox.evaluate import SETTINGS, History, evaluate_stream
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.optim import PlainSGD
from cltoolbox.registry import MODELS, SCENARIOS
from cltoolbox.results import atomic_write_bytes, atomic_write_text


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, step, zero_grad, steps: int = 12) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        zero_grad()
        F.cross_entropy(model(x), y).backward()
        step()


@pytest.mark.parametrize("kwargs", [
    {"lr": 0.1},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "weight_decay": 1e-2},
    {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
])
def test_plain_sgd_is_bit_identical_to_torch_sgd(kwargs: dict) -> None:
    ref, fast = _model(), _model()
    ref_opt, fast_opt = torch.optim.SGD(ref.parameters(), **kwargs), torch.optim.SGD(fast.parameters(), **kwargs)
    plain = PlainSGD(fast_opt)
    _train(ref, ref_opt, ref_opt.step, lambda: ref_opt.zero_grad(set_to_none=True))
    _train(fast, fast_opt, plain.step, plain.zero_grad)
    for a, b in zip(ref.parameters(), fast.parameters(), strict=True):
        assert torch.equal(a, b)
    if kwargs.get("momentum"):  # momentum buffers where torch keeps them
        for a, b in zip(ref.parameters(), fast.parameters(), strict=True):
            assert torch.equal(ref_opt.state[a]["momentum_buffer"], fast_opt.state[b]["momentum_buffer"])


def test_plain_sgd_skips_parameters_without_gradient_and_defers_to_hooks() -> None:
    model = _model()
    frozen = list(model.parameters())[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = PlainSGD(opt)
    before = frozen.detach().clone()
    F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    frozen.grad = None
    plain.step()
    assert torch.equal(frozen, before)  # as SGD: a parameter without gradient is left alone
    calls = []
    handle = opt.register_step_post_hook(lambda *a: calls.append(1))
    F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    plain.step()
    handle.remove()
    assert calls == [1]  # a registered hook means opt.step() itself runs
    assert not PlainSGD.supports(torch.optim.Adam(model.parameters()))


def _reference_pass(learner: Learner, stream, trained_exp: int, history: History) -> None:
    """evaluate_stream as it was: one experience at a time, Python floats written element by element."""
    C, row = stream.n_classes, trained_exp + 1
    learner.model.eval()
    with torch.inference_mode():
        for j, exp in enumerate(stream.eval_experiences):
            y = exp.y_test
            logits = learner._eval_logits(exp.x_test, torch.full_like(y, exp.task_id))
            own = torch.zeros(C, dtype=torch.bool)
            own[list(exp.classes)] = True
            task_logits = logits.masked_fill(~own, float("-inf"))
            history.n_samples[j] = y.shape[0]
            history.class_total[j] = torch.bincount(y, minlength=C)
            for s, out in enumerate((logits, task_logits)):
                correct = out.argmax(1) == y
                if y.shape[0]:
                    history.accuracy[row, j, s] = correct.double().mean().item()
                    history.loss[row, j, s] = F.cross_entropy(out.float(), y).item()
                history.class_correct[row, j, s] = torch.bincount(y[correct], minlength=C)
    learner.model.train()
    history.rows_done[row] = True


@pytest.mark.parametrize("scenario,params", [
    ("class_incremental", {"n_experiences": 5}),
    ("task_incremental", {"n_experiences": 5}),
    ("permuted", {"n_experiences": 3, "train_samples": 200}),  # every experience over all classes
    ("empty_test", {"n_experiences": 5}),  # an experience without test samples: NaN, not 0
])
def test_evaluation_pass_matches_the_per_experience_reference(scenario: str, params: dict) -> None:
    stream = SCENARIOS.get(scenario.replace("empty_test", "class_incremental")).factory(
        load_dataset("digits"), 0, **params)
    if scenario == "empty_test":
        e = stream.experiences[3]
        stream.experiences[3] = dataclasses.replace(e, test=e.test.subset(torch.zeros(0, dtype=torch.long)))
    torch.manual_seed(0)
    model = MODELS.get("mlp").factory(stream.input_shape, stream.n_classes, hidden=[16])
    learner = Learner(model, [], TrainConfig(epochs=1, batch_size=16, eval_batch_size=50, device="cpu"))
    learner.begin(stream)
    fast, ref = (History(len(stream), stream.n_classes) for _ in range(2))
    for i, exp in enumerate([None, *stream.experiences[:2]]):
        if exp is not None:
            learner.train_experience(exp)
        evaluate_stream(learner, stream, i - 1, fast)
        _reference_pass(learner, stream, i - 1, ref)
    for name in ("accuracy", "loss", "class_correct", "n_samples", "class_total", "rows_done"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.dtype == b.dtype
        assert torch.equal(a.nan_to_num(-1.0) if a.is_floating_point() else a,
                           b.nan_to_num(-1.0) if b.is_floating_point() else b), name
    assert fast.matrix(SETTINGS[0]).shape == (len(stream) + 1, len(stream))


def test_atomic_write_replaces_an_existing_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.pt"
    for i in range(3):
        atomic_write_bytes(path, bytes([i]) * (1000 + i))
        assert path.read_bytes() == bytes([i]) * (1000 + i)
    atomic_write_text(tmp_path / "DONE", "x\n", durable=True)
    atomic_write_text(tmp_path / "DONE", "y\n", durable=True)
    assert (tmp_path / "DONE").read_text() == "y\n"
    assert sorted(os.listdir(path.parent)) == ["state.pt"]
    assert sorted(os.listdir(tmp_path)) == ["DONE", "sub"]
