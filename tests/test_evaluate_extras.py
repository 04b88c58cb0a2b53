"""The evaluator's extras, recomputed by brute force: class-IL top-5 accuracy, the final confusion matrix and
accuracy on old vs new samples after each experience (on a stream whose experiences differ in size)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from toys import gaussian_pairs_stream

import cltoolbox
from cltoolbox import rss
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


def _run_dir(out) -> Path:
    (done,) = list(Path(out).rglob("DONE"))
    return done.parent


TWENTY_CLASSES = """
import torch
from cltoolbox.data.base import Dataset
from cltoolbox.registry import register_dataset


@register_dataset("gauss20_extras")
def gauss20(root: str | None = None, download: bool = False):
    g = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(20, 16, generator=g)
    y_train, y_test = torch.arange(400) % 20, torch.arange(200) % 20
    x_train = centres[y_train] + torch.randn(400, 16, generator=g)
    x_test = centres[y_test] + torch.randn(200, 16, generator=g)
    return Dataset.from_tensors("gauss20_extras", x_train, y_train, x_test, y_test, 20)
"""


def test_run_folder_holds_old_new_confusion_and_top5(tiny_config, tmp_path):
    tiny_config["out"] = str(tmp_path / "digits")
    (summary,) = cltoolbox.run(tiny_config, quiet=True)
    run = _run_dir(tmp_path / "digits")
    old_new = pd.read_csv(run / "old_new.csv")
    acc = pd.read_csv(run / "accuracy.csv")
    last = old_new[(old_new.trained_exp == 4) & (old_new.setting == "class_il")].iloc[0]
    final = acc[(acc.trained_exp == 4) & (acc.setting == "class_il")]
    old = final[final.eval_exp < 4]
    assert last.n_old == old.n_samples.sum()
    assert math.isclose(last.accuracy_old, (old.accuracy * old.n_samples).sum() / old.n_samples.sum(), abs_tol=1e-12)
    assert math.isclose(summary["class_il"]["acc_old"], last.accuracy_old, abs_tol=1e-12)
    assert math.isclose(summary["class_il"]["acc_new"], final[final.eval_exp == 4].accuracy.iloc[0], abs_tol=1e-12)
    confusion = pd.read_csv(run / "confusion.csv", index_col="true").to_numpy()
    assert confusion.shape == (10, 10) and confusion.sum() == final.n_samples.sum()
    assert math.isclose(confusion.trace() / confusion.sum(), summary["class_il"]["acc_weighted"], abs_tol=1e-12)
    assert not (run / "matrices" / "top5_class_il.csv").exists()  # 10 classes: top-5 says little
    # 20 classes: the top-5 matrix and its final mean
    plugin = tmp_path / "twenty_classes.py"
    plugin.write_text(TWENTY_CLASSES)
    tiny_config["out"] = str(tmp_path / "twenty")
    tiny_config["imports"] = [str(plugin)]
    tiny_config["scenario"] = {"name": "class_incremental", "dataset": "gauss20_extras", "n_experiences": 4}
    (summary,) = cltoolbox.run(tiny_config, quiet=True)
    assert summary["class_il"]["acc_top5"] >= summary["class_il"]["acc"]
    top5 = pd.read_csv(_run_dir(tmp_path / "twenty") / "matrices" / "top5_class_il.csv")
    assert math.isclose(top5[top5.trained_exp == 3].drop(columns="trained_exp").to_numpy().mean(),
                        summary["class_il"]["acc_top5"], abs_tol=1e-12)


def test_peak_rss_is_the_runs_own_not_an_earlier_peak_of_the_process(tiny_config, tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's resettable peak RSS")
    big = torch.ones(100_000_000, dtype=torch.float32)  # 400 MB touched, then returned to the system
    peak_with_big = rss.peak_mb()
    del big
    tiny_config["out"] = str(tmp_path)
    (summary,) = cltoolbox.run(tiny_config, quiet=True)
    assert summary["cost"]["peak_rss_mb"] < peak_with_big - 300
