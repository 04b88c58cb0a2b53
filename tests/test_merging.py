"""Model merging strategies: the merge rules on hand-made tensors, memory accounting of the stored task vectors,
AdaMerging's coefficients in the run folder, and learning runs on digits against naive fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cltoolbox
from cltoolbox.errors import CLToolboxError, ConfigError
from cltoolbox.strategies.merging import max_magnitude, ties_merge


def test_ties_merge_trims_elects_and_takes_the_disjoint_mean() -> None:
    taus = [torch.tensor([1.0, -2.0, 0.1, 3.0]), torch.tensor([-3.0, 1.0, 0.2, 1.0])]
    # keep 3 of 4: [1, -2, 0, 3] and [-3, 1, 0, 1]; elected signs (of the sums -2, -1, 0, 4): -, -, 0, +;
    # mean over the entries that agree: -3, -2, 0, (3 + 1) / 2
    merged = ties_merge(taus, keep=0.75)
    torch.testing.assert_close(merged, torch.tensor([-3.0, -2.0, 0.0, 2.0]))
    # one task vector, all kept: unchanged
    torch.testing.assert_close(ties_merge(taus[:1], keep=1.0), taus[0])


def test_max_magnitude_running_merge_equals_the_merge_of_all_task_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(50, generator=g) for _ in range(6)]
    running = taus[0]
    for t in taus[1:]:
        running = max_magnitude(running, t)
    stack = torch.stack(taus)
    expected = stack.gather(0, stack.abs().argmax(0, keepdim=True))[0]
    torch.testing.assert_close(running, expected)


def _config(strategy: dict, epochs: int = 3, n_exp: int = 5) -> dict:
    return {
        "name": "merging",
        "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": n_exp},
        "model": {"name": "mlp", "hidden": [64]},
        "strategy": strategy,
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "seeds": [0],
    }


def _run(tmp_path: Path, strategy: dict, **kw) -> dict:
    return cltoolbox.run(_config(strategy, **kw), out=str(tmp_path), quiet=True)[0]


def test_merging_strategies_beat_naive_fine_tuning_in_class_il(tmp_path: Path) -> None:
    naive = _run(tmp_path, {"name": "naive"})["class_il"]["acc"]
    for name in ("task_arithmetic", "ties_merging", "magmax"):
        acc = _run(tmp_path, {"name": name})["class_il"]["acc"]
        assert acc >= naive + 0.2, (name, acc, naive)


def test_memory_counts_every_task_vector_but_magmax_keeps_one_running_vector(tmp_path: Path) -> None:
    n_params = 64 * 64 + 64  # the trained body: Linear(64, 64) of digits' 8x8 inputs (the head rows are fixed)
    costs = {}
    for name in ("task_arithmetic", "magmax"):
        for n_exp in (2, 5):
            s = cltoolbox.run(_config({"name": name, "val_fraction": 0.1}, epochs=1, n_exp=n_exp),
                              out=str(tmp_path / f"{name}{n_exp}"), quiet=True)[0]
            costs[name, n_exp] = s["cost"]["memory_bytes"]
    # task arithmetic: theta_0 and one task vector per experience (float32); held-out keys (int64) on top
    ta_growth = costs["task_arithmetic", 5] - costs["task_arithmetic", 2]
    assert 3 * 4 * n_params <= ta_growth < 3 * 4 * n_params + 8 * 1437
    # magmax: theta_0, the running merged vector and the fine-tuned weights whatever the stream's length
    assert costs["magmax", 5] - costs["magmax", 2] < 8 * 1437
    assert costs["magmax", 5] >= 3 * 4 * n_params


def test_adamerging_writes_its_coefficients_and_names_its_unlabeled_data(tmp_path: Path) -> None:
    s = _run(tmp_path, {"name": "adamerging", "steps": 30}, n_exp=5)
    m = json.loads((Path(s["run_dir"]) / "metrics.json").read_text())["strategy"]
    assert m["adamerging_unlabeled"] == "test"
    rows = m["adamerging_coefficients"]
    layers = {"model.body.1.weight", "model.body.1.bias"}
    assert {r["layer"] for r in rows} == layers
    # after experience k, one coefficient per (task <= k, layer)
    assert len(rows) == sum(k * len(layers) for k in range(1, 6))
    assert all(0.0 <= r["coefficient"] <= 1.0 for r in rows)
    assert any(abs(r["coefficient"] - 0.3) > 1e-3 for r in rows)  # learned, not left at the init
    task = _run(tmp_path / "t", {"name": "adamerging", "steps": 30, "granularity": "task",
                                 "unlabeled": "validation"}, n_exp=2)
    m = json.loads((Path(task["run_dir"]) / "metrics.json").read_text())["strategy"]
    assert m["adamerging_unlabeled"] == "validation"
    assert {r["layer"] for r in m["adamerging_coefficients"]} == {"all"}


def test_bad_settings_are_one_line_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        cltoolbox.run(_config({"name": "task_arithmetic", "val_fraction": 0.0}), out=str(tmp_path), quiet=True)
    with pytest.raises(ConfigError, match="keep"):
        cltoolbox.run(_config({"name": "ties_merging", "keep": 0.0}), out=str(tmp_path), quiet=True)
    for strategy in ({"name": "ties_merging", "lambda_on": "task_il"},  # lam 1.0 fixed: nothing is picked
                     {"name": "task_arithmetic", "lam": 0.3, "lambda_on": "task_il"},
                     {"name": "adamerging", "lambda_on": "task_il"}):  # init 0.3, no selection: nothing scored
        with pytest.raises(ConfigError, match="^strategy.lambda_on: task_il"):
            cltoolbox.run(_config(strategy), out=str(tmp_path), quiet=True)
    frozen = _config({"name": "magmax"})
    frozen["model"] = {"name": "mlp", "hidden": []}  # only the (fixed) head: nothing to merge
    with pytest.raises(CLToolboxError, match="adapter"):
        cltoolbox.run(frozen, out=str(tmp_path / "f"), quiet=True)


def test_adamerging_from_task_arithmetic_keeps_the_validation_best_step(tmp_path: Path) -> None:
    s = _run(tmp_path, {"name": "adamerging", "steps": 20, "init": "task_arithmetic", "select": "validation",
                        "granularity": "task"}, n_exp=5)
    m = json.loads((Path(s["run_dir"]) / "metrics.json").read_text())["strategy"]
    init, kept, rows = m["adamerging_init_lambda"], m["adamerging_steps_kept"], m["adamerging_coefficients"]
    assert len(init) == len(kept) == 5 and all(0 <= k <= 20 for k in kept)
    accs = m["adamerging_held_out_accuracy"]
    assert [a["merged_after"] for a in accs] == list(range(5))
    assert all(a["kept"] >= a["initial"] for a in accs)  # never worse on held-out data than task arithmetic
    assert all(a["kept"] > a["initial"] for a, k in zip(accs, kept, strict=True) if k > 0)  # strictly, or step 0
    for merge, (lam, k) in enumerate(zip(init, kept, strict=True)):
        coefs = [r["coefficient"] for r in rows if r["merged_after"] == merge]
        assert len(coefs) == merge + 1
        if k == 0:  # no entropy step kept: task arithmetic's coefficient, for every task
            assert coefs == pytest.approx([lam] * len(coefs))
    # steps too small to change a prediction: the earliest checkpoint (task arithmetic's lambda) is kept
    s = _run(tmp_path / "still", {"name": "adamerging", "steps": 10, "lr": 1e-9, "init": "task_arithmetic",
                                  "select": "validation"}, n_exp=2)
    m = json.loads((Path(s["run_dir"]) / "metrics.json").read_text())["strategy"]
    assert m["adamerging_steps_kept"] == [0, 0]
    lam = m["adamerging_init_lambda"][1]
    assert all(r["coefficient"] == pytest.approx(lam) for r in m["adamerging_coefficients"] if r["merged_after"] == 1)
    with pytest.raises(ConfigError, match="val_fraction"):
        _run(tmp_path / "bad", {"name": "adamerging", "select": "validation", "val_fraction": 0.0})


def test_finetuning_over_seen_classes_changes_the_task_vectors(tmp_path: Path) -> None:
    accs = {over: _run(tmp_path / over, {"name": "task_arithmetic", "lam": 1.0, "finetune_over": over},
                       epochs=1, n_exp=5)["class_il"]["acc"] for over in ("task", "seen")}
    assert accs["task"] != accs["seen"]  # the old classes' rows enter the later fine-tunings
    assert min(accs.values()) > 0.4  # both well above the last experience's share of the test set (0.2)


def test_lambda_on_task_il_scores_each_held_out_sample_over_its_own_experience_classes() -> None:
    from types import SimpleNamespace

    from torch import nn

    from cltoolbox.strategies.merging import TaskArithmeticPlugin

    # two experiences (classes 0-1, 2-3); rows are the logits of four held-out samples (the net is the identity)
    logits = torch.tensor([[3.0, 1.0, 5.0, 0.0],  # y 0: class-IL says 2 (wrong), its task's classes say 0
                           [0.0, 2.0, 0.0, 1.0],  # y 1: right either way
                           [4.0, 0.0, 3.0, 1.0],  # y 2: class-IL says 0 (wrong), task-aware says 2
                           [0.0, 0.0, 0.0, 1.0]])  # y 3: right either way
    exps = [SimpleNamespace(classes=[0, 1]), SimpleNamespace(classes=[2, 3])]
    stream = SimpleNamespace(n_classes=4, experiences=exps)
    learner = SimpleNamespace(stream=stream, device=torch.device("cpu"), batches=lambda keys: [(keys, logits[keys])])
    scores = {}
    for on in ("class_il", "task_il"):
        plugin = TaskArithmeticPlugin(0, 16.0, 0.5, None, [0.0], lambda_on=on)
        plugin.net, plugin.seen = nn.Identity(), torch.ones(4, dtype=torch.bool)
        plugin.val_keys, plugin.val_y = [torch.tensor([0, 1]), torch.tensor([2, 3])], [torch.tensor([0, 1]),
                                                                                      torch.tensor([2, 3])]
        scores[on] = plugin.val_accuracy(learner, {})
    assert scores == {"class_il": 0.5, "task_il": 1.0}


def test_adamerging_starts_from_the_lambda_task_arithmetic_picks_on_the_same_held_out_score(tmp_path: Path) -> None:
    for on in ("class_il", "task_il"):
        runs = {name: _run(tmp_path / f"{name}_{on}", {"name": name, "lambda_on": on, **extra}, epochs=1, n_exp=5)
                for name, extra in (("task_arithmetic", {}), ("adamerging", {"init": "task_arithmetic", "steps": 2}))}
        m = {name: json.loads((Path(s["run_dir"]) / "metrics.json").read_text())["strategy"]
             for name, s in runs.items()}
        # same seed, same fine-tuning: adamerging's starting lambda is task arithmetic's pick on the same score
        assert m["adamerging"]["adamerging_init_lambda"] == m["task_arithmetic"]["task_arithmetic_lambda"]


def test_orthogonal_head_is_fixed_before_any_data_and_still_learns(tmp_path: Path) -> None:
    from cltoolbox.runfolder import load_checkpoint

    accs = {}
    for name in ("task_arithmetic", "magmax"):
        s = _run(tmp_path / name, {"name": name, "head_init": "orthogonal"})
        head = load_checkpoint(Path(s["run_dir"]) / "checkpoint" / "state.pt")["learner"]["model"]["head.weight"]
        assert torch.allclose(head @ head.T, torch.eye(10), atol=1e-5)  # orthonormal rows for all ten classes
        accs[name] = s["class_il"]["acc"]
    naive = _run(tmp_path / "naive", {"name": "naive"})["class_il"]["acc"]
    assert min(accs.values()) > naive + 0.05, (accs, naive)  # weaker than class-mean rows, still above naive
    with pytest.raises(ConfigError, match="^strategy.head_init: orthogonal needs no more classes"):
        cltoolbox.run(_config({"name": "magmax", "head_init": "orthogonal", "adapter": 0}) | {
            "model": {"name": "mlp", "hidden": [8]}}, out=str(tmp_path / "narrow"), quiet=True)
