"""Task-transfer matrices: T[i, j] = acc_j(i then j) - acc_j(j alone), written as a run-style folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cltoolbox.errors import RunExistsError
from cltoolbox.transfer import read_transfer_matrix, transfer


def _config(scenario: dict) -> dict:
    return {
        "name": "tr", "scenario": {"dataset": "digits", **scenario},
        "model": {"name": "mlp", "hidden": [16]}, "strategy": {"name": "naive"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}, "seeds": [0],
    }


def test_transfer_matrix_folder(tmp_path: Path) -> None:
    config = _config({"name": "class_incremental", "n_experiences": 3, "first_classes": 4})
    (summary,) = transfer(config, out=str(tmp_path))
    run = Path(summary["run_dir"])
    assert run == tmp_path / "tr" / "transfer" / "naive" / "class_incremental-digits" / "seed_0"
    files = ["config.yaml", "env.json", "accuracy.csv", "matrices/transfer_class_il.csv",
             "matrices/transfer_task_il.csv", "transfer.json", "transfer.png", "transfer.pdf", "DONE"]
    for f in files:
        assert (run / f).is_file(), f
    assert all((run / f).stat().st_mtime <= (run / "DONE").stat().st_mtime for f in files)  # DONE last

    acc = pd.read_csv(run / "accuracy.csv")
    for setting in ("class_il", "task_il"):
        T = read_transfer_matrix(run / "matrices" / f"transfer_{setting}.csv")
        assert T.shape == (3, 3) and np.isnan(np.diag(T)).all() and not np.isnan(T[~np.eye(3, dtype=bool)]).any()
        a = acc[acc.setting == setting].set_index(["first_task", "second_task"]).accuracy
        for i in range(3):
            for j in range(3):
                if i != j:  # the definition, from the raw accuracies
                    assert T[i, j] == pytest.approx(a[(i, j)] - a[(-1, j)])
        saved = np.array(json.loads((run / "transfer.json").read_text())["transfer"][setting], dtype=float)
        np.testing.assert_allclose(saved, T, rtol=1e-12)  # NaN (null in JSON) on the diagonal in both
    assert summary["status"] == "done" and summary["cost"]["trainings"] == 9
    assert [t["classes"] for t in summary["tasks"]] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    header = (run / "matrices" / "transfer_class_il.csv").read_text().splitlines()[0]
    assert header == "first_task,task_0,task_1,task_2"

    with pytest.raises(RunExistsError, match="--overwrite"):
        transfer(config, out=str(tmp_path))
    (again,) = transfer(config, out=str(tmp_path), overwrite=True, plot=False)  # same seed: same numbers
    for setting in ("class_il", "task_il"):
        np.testing.assert_array_equal(np.array(again["transfer"][setting], dtype=float),
                                      np.array(summary["transfer"][setting], dtype=float))


def test_transfer_uses_the_distinct_tasks_of_a_recurring_stream(tmp_path: Path) -> None:
    config = _config({"name": "power_law", "n_tasks": 3, "n_experiences": 9, "samples_per_experience": 50})
    (summary,) = transfer(config, out=str(tmp_path), plot=False)
    assert summary["labels"]["n_tasks"] == 3 and np.array(summary["transfer"]["class_il"]).shape == (3, 3)
    assert [t["task_id"] for t in summary["tasks"]] == [0, 1, 2]


def test_transfer_command_is_wired_into_the_cli(tmp_path, capsys) -> None:
    from cltoolbox.cli import main

    assert main(["transfer", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config:") and "missing.yaml" in err and "\n" not in err
