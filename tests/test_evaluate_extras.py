"""The evaluator's extras, recomputed by brute force: class-IL top-5 accuracy, the final confusion matrix and
accuracy on old vs new samples after each experience (on a stream whose experiences differ in size)."""

from __future__ import annotations

import math

import torch
from toys import gaussian_pairs_stream

from cltoolbox.evaluate import History, evaluate_stream
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.registry import MODELS
from cltoolbox.stream import Experience, Stream


def unequal_stream() -> Stream:
    """Gaussian classes: 6 in the first experience, then one per experience, with unequal test sizes."""
    base = gaussian_pairs_stream(n_exp=5, per_class=24, dim=10, shuffle=True)
    x = torch.cat([e.x_test for e in base.experiences])
    y = torch.cat([e.y_test for e in base.experiences])
    xtr = torch.cat([e.x_train for e in base.experiences])
    ytr = torch.cat([e.y_train for e in base.experiences])
    splits = [(0, 1, 2, 3, 4, 5), (6,), (7,), (8,), (9,)]
    exps = []
    for i, classes in enumerate(splits):
        tr = torch.isin(ytr, torch.tensor(classes))
        te = torch.nonzero(torch.isin(y, torch.tensor(classes))).flatten()[:: i + 1]  # later ones: fewer tests
        exps.append(Experience.from_tensors(i, 0, classes, xtr[tr], ytr[tr], x[te], y[te]))
    assert all(len(e.y_test) > 0 for e in exps)
    return Stream("unequal", exps, 10, (10,), list(range(10)), "class_incremental")


def run(stream: Stream) -> tuple[Learner, History]:
    torch.manual_seed(0)
    model = MODELS.get("mlp").factory(stream.input_shape, stream.n_classes, hidden=[16])
    learner = Learner(model, [], TrainConfig(epochs=1, batch_size=16, lr=0.05), seed=0)
    history = History(len(stream), stream.n_classes)
    learner.begin(stream)
    evaluate_stream(learner, stream, -1, history)
    learner.fit(stream, on_experience_end=lambda lrn, e: evaluate_stream(lrn, stream, e.index, history))
    return learner, history


def test_top5_and_confusion_equal_a_brute_force_pass():
    stream = unequal_stream()
    learner, history = run(stream)
    logits = [learner.model(e.x_test).detach() for e in stream.experiences]
    for j, (e, z) in enumerate(zip(stream.experiences, logits, strict=True)):
        ranked = z.argsort(1, descending=True)[:, :5]
        expected = sum(int(t in r) for t, r in zip(e.y_test.tolist(), ranked.tolist(), strict=True)) / len(z)
        assert math.isclose(history.top5[-1, j].item(), expected, abs_tol=1e-12)
        assert history.top5[-1, j] >= history.accuracy[-1, j, 0]
    confusion = torch.zeros(10, 10, dtype=torch.int32)
    for e, z in zip(stream.experiences, logits, strict=True):
        for t, p in zip(e.y_test.tolist(), z.argmax(1).tolist(), strict=True):
            confusion[t, p] += 1
    assert torch.equal(history.confusion, confusion)
    correct = confusion.diagonal().sum().item()
    n = sum(len(e.y_test) for e in stream.experiences)
    weighted = sum(history.accuracy[-1, j, 0].item() * len(e.y_test) for j, e in enumerate(stream.experiences))
    assert math.isclose(correct / n, weighted / n, abs_tol=1e-12)


def test_old_and_new_accuracy_are_sample_weighted_over_the_steps_tasks():
    stream = unequal_stream()
    learner, history = run(stream)
    rows = {(r["trained_exp"], r["setting"]): r for r in history.old_new_rows(stream.first_seen())}
    assert len(rows) == 2 * len(stream)
    first = rows[(0, "class_il")]
    assert first["n_old"] == 0 and math.isnan(first["accuracy_old"])
    assert first["accuracy_new"] == history.accuracy[1, 0, 0].item()
    for step in range(1, len(stream)):
        # brute force: the step's model is not kept, so use the per-experience counts the evaluator recorded
        old = range(step)
        n_old = sum(len(stream[j].y_test) for j in old)
        correct_old = sum(history.accuracy[step + 1, j, 0].item() * len(stream[j].y_test) for j in old)
        row = rows[(step, "class_il")]
        assert row["n_old"] == n_old and row["n_new"] == len(stream[step].y_test)
        assert math.isclose(row["accuracy_old"], correct_old / n_old, abs_tol=1e-12)
        assert row["accuracy_new"] == history.accuracy[step + 1, step, 0].item()
    # unweighted means over the old experiences differ here: the weighting is what is tested
    last = rows[(len(stream) - 1, "class_il")]
    unweighted = history.accuracy[-1, : len(stream) - 1, 0].mean().item()
    assert not math.isclose(last["accuracy_old"], unweighted, abs_tol=1e-6)
