"""Run folders: the on-disk contract, refusing to overwrite, divergence handling, the lock, loading."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import cltoolbox
from cltoolbox import metrics
from cltoolbox.errors import CLToolboxError, RunExistsError
from cltoolbox.runfolder import RunLock


def _only_run(out: Path) -> Path:
    (run,) = [p.parent for p in out.rglob("DONE")]
    return run


def test_run_folder_matches_the_contract(tiny_config, tmp_path: Path) -> None:
    tiny_config["out"] = str(tmp_path)
    cltoolbox.run(tiny_config, quiet=True)
    run = _only_run(tmp_path)
    assert run.relative_to(tmp_path).parts == ("tiny", "naive", "class_incremental-digits", "seed_0")

    acc = pd.read_csv(run / "accuracy.csv")
    assert list(acc.columns) == ["trained_exp", "eval_exp", "setting", "accuracy", "loss", "n_samples"]
    assert len(acc) == 6 * 5 * 2 and set(acc.setting) == {"class_il", "task_il"}
    init = acc[acc.trained_exp == -1]
    assert len(init) == 10  # the untrained model is evaluated on every experience

    m = json.loads((run / "metrics.json").read_text())
    for setting in ("class_il", "task_il"):
        R = np.full((6, 5), np.nan)
        for r in acc[acc.setting == setting].itertuples():
            R[r.trained_exp + 1, r.eval_exp] = r.accuracy
        assert m[setting]["acc"] == pytest.approx(metrics.acc(R))
        assert m[setting]["bwt"] == pytest.approx(metrics.bwt(R))
        assert m[setting]["forgetting"] == pytest.approx(metrics.forgetting(R))
        M = pd.read_csv(run / "matrices" / f"accuracy_{setting}.csv", index_col="trained_exp")
        assert list(M.index) == [-1, 0, 1, 2, 3, 4]
        np.testing.assert_allclose(M.to_numpy(), R)
        F = pd.read_csv(run / "matrices" / f"forgetting_{setting}.csv", index_col="trained_exp").to_numpy()
        np.testing.assert_allclose(F, metrics.forgetting_matrix(R))
    # task-IL restricts each experience to its own 2 classes: never worse than class-IL
    assert m["task_il"]["acc"] >= m["class_il"]["acc"]
    assert set(m["cost"]) >= {"wall_s", "train_s", "eval_s", "peak_rss_mb", "n_params", "memory_items",
                              "memory_bytes"}
    env = json.loads((run / "env.json").read_text())
    assert {"python", "torch", "cltoolbox", "device", "torch_threads", "start_time", "end_time"} <= set(env)
    log = pd.read_csv(run / "train_log.csv")
    assert list(log.columns) == ["experience", "epoch", "step", "loss", "lr", "samples_per_s"]
    assert list(log.experience) == [0, 1, 2, 3, 4]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["momentum"] == 0.0 and resolved["seed"] == 0
    assert not list(run.rglob(".*tmp*")), "temporary files left behind"


def test_finished_run_is_not_overwritten(tiny_config, tmp_path: Path) -> None:
    tiny_config["out"] = str(tmp_path)
    cltoolbox.run(tiny_config, quiet=True)
    run = _only_run(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(RunExistsError, match="--overwrite"):
        cltoolbox.run(tiny_config, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    (summary,) = cltoolbox.run(tiny_config, resume=True, quiet=True)  # --resume skips finished runs
    assert summary["status"] == "done" and {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    cltoolbox.run(tiny_config, overwrite=True, quiet=True)
    assert (run / "DONE").stat().st_mtime_ns != before[run / "DONE"]


def test_diverging_run_stops_cleanly_and_keeps_what_it_measured(tiny_config, tmp_path: Path) -> None:
    tiny_config.update(out=str(tmp_path), train={"epochs": 1, "batch_size": 32, "lr": 1e12})
    with pytest.raises(CLToolboxError, match="diverged"):
        cltoolbox.run(tiny_config, quiet=True)
    (run,) = list(tmp_path.glob("tiny/naive/*/seed_0"))
    assert not (run / "DONE").exists()
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "diverged"
    acc = pd.read_csv(run / "accuracy.csv")
    assert set(acc.trained_exp) == {-1}  # the init row was measured and kept
    assert not math.isnan(acc.accuracy.iloc[0])


def test_lock_keeps_a_second_writer_out(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        with pytest.raises(RunExistsError, match="another process"):
            with RunLock(tmp_path):
                pass
    host = platform.node()
    (tmp_path / ".lock").write_text(f"{host}:999999999")  # a stale lock whose writer is gone is taken over
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{host}:{os.getpid()}"
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text("another-node:1")  # held on another host: cannot be checked, respected
    with pytest.raises(RunExistsError, match="another-node"):
        with RunLock(tmp_path):
            pass


def test_same_seed_identical_other_seed_differs(tiny_config, tmp_path: Path) -> None:
    outs = []
    for i, seed in enumerate((0, 0, 1)):
        tiny_config.update(out=str(tmp_path / str(i)), seeds=[seed])
        cltoolbox.run(tiny_config, quiet=True)
        outs.append((_only_run(tmp_path / str(i)) / "accuracy.csv").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_single_experience_gives_nan_not_zero(tiny_config, tmp_path: Path) -> None:
    tiny_config.update(out=str(tmp_path))
    tiny_config["scenario"]["n_experiences"] = 1
    (summary,) = cltoolbox.run(tiny_config, quiet=True)
    assert math.isnan(summary["class_il"]["bwt"]) and math.isnan(summary["class_il"]["forgetting"])
    on_disk = json.loads((_only_run(tmp_path) / "metrics.json").read_text())
    assert on_disk["class_il"]["bwt"] is None and on_disk["class_il"]["fwt"] is None


def test_resume_refuses_a_run_started_from_another_config(tiny_config, tmp_path: Path) -> None:
    tiny_config["out"] = str(tmp_path)
    cltoolbox.run(tiny_config, quiet=True)
    tiny_config["train"]["lr"] = 0.01
    with pytest.raises(RunExistsError, match="train.lr"):
        cltoolbox.run(tiny_config, resume=True, quiet=True)


def test_a_resumed_run_keeps_its_first_start_time(tiny_config, tmp_path: Path) -> None:
    tiny_config["out"] = str(tmp_path)
    cltoolbox.run(tiny_config, quiet=True)
    run = _only_run(tmp_path)
    (run / "DONE").unlink()  # as if killed after its last checkpoint
    env = json.loads((run / "env.json").read_text())
    env["start_time"] = "2000-01-01T00:00:00+00:00"
    (run / "env.json").write_text(json.dumps(env))
    cltoolbox.run(tiny_config, resume=True, quiet=True)
    env = json.loads((run / "env.json").read_text())
    assert env["start_time"] == "2000-01-01T00:00:00+00:00" and env["resumed_at_experience"] == 5
    assert (run / "DONE").exists()


@pytest.mark.parametrize(("ratio", "saved"), [(0, [1, 2, 3, 4, 5]), (1e9, [1, 5])])
def test_checkpoints_that_would_dominate_the_work_are_skipped_and_resume_stays_exact(
        tiny_config, tmp_path: Path, monkeypatch, ratio: float, saved: list[int]) -> None:
    import io

    import torch

    from cltoolbox import session

    # ratio 0: every experience; 1e9: no experience is worth a checkpoint but the first (nothing to compare
    # with yet) and the last (always saved)
    monkeypatch.setattr(session, "CHECKPOINT_WORK_RATIO", ratio)
    writes: list[int] = []
    real_write = session.atomic_write_bytes

    def spy(path: Path, data) -> None:
        if path.name == "state.pt":
            writes.append(int(torch.load(io.BytesIO(bytes(data)), weights_only=True)["next_experience"]))
        real_write(path, data)

    monkeypatch.setattr(session, "atomic_write_bytes", spy)
    cltoolbox.run({**tiny_config, "out": str(tmp_path / "whole")}, quiet=True)
    assert writes == saved

    real_eval = session.evaluate_stream

    def crash_in_experience_3(learner, stream, row, history) -> None:
        if row == 3:
            raise KeyboardInterrupt
        real_eval(learner, stream, row, history)

    monkeypatch.setattr(session, "evaluate_stream", crash_in_experience_3)
    with pytest.raises(KeyboardInterrupt):
        cltoolbox.run({**tiny_config, "out": str(tmp_path / "killed")}, quiet=True)
    monkeypatch.setattr(session, "evaluate_stream", real_eval)
    (killed,) = [p.parent.parent for p in (tmp_path / "killed").rglob("state.pt")]
    assert not (killed / "DONE").exists()
    state = torch.load(killed / "checkpoint" / "state.pt", weights_only=True)
    assert state["next_experience"] == (3 if ratio == 0 else 1)  # killed while evaluating experience 3
    cltoolbox.run({**tiny_config, "out": str(tmp_path / "killed")}, resume=True, quiet=True)
    whole = _only_run(tmp_path / "whole")
    for name in ("accuracy.csv", "per_class.csv", "matrices/accuracy_class_il.csv"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
