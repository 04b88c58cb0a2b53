"""Experiment trackers (cltoolbox.loggers): a quickstart run logs to TensorBoard, W&B (offline) and MLflow (local
file store), and every tracker is read back offline with its own reader: TensorBoard's EventAccumulator, the
W&B offline run's .wandb record log (wandb's protobuf records), MLflow's MlflowClient."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from cltoolbox import loggers
from cltoolbox.cli import main
from cltoolbox.config import validate
from cltoolbox.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# the quickstart config, made small: digits instead of MNIST-5k, one seed, ER only
SMALL = ["scenario.dataset=digits", "model.hidden=[32]", "train.epochs=2", "train.batch_size=32",
         "strategy=[{name: er, memory_size: 50}]"]


@pytest.fixture(autouse=True)
def _trackers_stay_local(monkeypatch) -> None:
    """A developer's exported WANDB_MODE=online or MLFLOW_TRACKING_URI must not send these tests to a server (and
    the defaults, W&B offline and a local MLflow store, are what the tests check)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B ``.wandb`` file (LevelDB log format: a 7-byte ':W&B' header, then 32 KiB
    blocks of records, each with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = path.read_bytes()
    assert buf[:4] == b":W&B"
    out, parts, pos, block = [], [], 7, 32768
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        data, pos = buf[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            parts = [data]
        elif kind in (2, 3):
            parts = ([] if kind == 2 else parts) + [data]
            continue
        else:
            parts.append(data)
        rec = pb.Record()
        rec.ParseFromString(b"".join(parts))
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loggers")
    code = main(["run", str(ROOT / "experiments" / "quickstart.yaml"), "--seeds", "0", "--out", str(out), "-q",
                 "--loggers", "tensorboard", "wandb", "mlflow", *SMALL])
    assert code == 0
    return out


def _run_dir(out: Path) -> Path:
    return next(out.glob("quickstart/er/*/seed_0"))


def _train_log(run: Path) -> list[dict]:
    with open(run / "train_log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # the module's logged run: ~15 s on 2 busy cores
def test_tensorboard_event_files_hold_config_losses_rows_metrics_figures(logged_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run_dir(logged_run)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    log = _train_log(run)
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx([float(r["loss"]) for r in log], rel=1e-6)  # one point per epoch
    assert [e.step for e in acc.Scalars("train/lr")] == [int(r["step"]) for r in log]
    summary = json.loads((run / "metrics.json").read_text())
    assert acc.Scalars("final/class_il/acc")[0].value == pytest.approx(summary["class_il"]["acc"], rel=1e-6)
    # each accuracy-matrix row as evaluated: rows 0 (before training) .. 5, for experience 0's column
    R = [line.split(",") for line in (run / "matrices" / "accuracy_class_il.csv").read_text().splitlines()]
    col0 = acc.Scalars("accuracy/class_il/exp0")
    assert [e.step for e in col0] == list(range(6))
    assert [e.value for e in col0] == pytest.approx([float(row[1]) for row in R[1:]], rel=1e-6)
    assert "figures/heatmap_class_il_class_incremental-digits" in tags["images"]
    assert "config/text_summary" in tags["tensors"]


@pytest.mark.slow  # the module's logged run: ~15 s on 2 busy cores
def test_wandb_offline_run_holds_config_history_summary_and_figures(logged_run: Path) -> None:
    run = _run_dir(logged_run)
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "an offline run inside the run folder"
    records = wandb_records(files[0])
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert losses == pytest.approx([float(r["loss"]) for r in _train_log(run)], rel=1e-6)
    rows = [h for h in history if "accuracy/class_il/mean_trained" in h]
    assert [h["eval/trained_experiences"] for h in rows] == [1, 2, 3, 4, 5]
    assert any(k.startswith("figures/heatmap_class_il") for h in history for k in h)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key: json.loads(u.value_json) for u in r.summary.update if u.key})
    metrics = json.loads((run / "metrics.json").read_text())
    assert summary["final/class_il/acc"] == pytest.approx(metrics["class_il"]["acc"], rel=1e-9)
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.config.update if kind == "config" else r.run.config.update if kind == "run" else []
        config.update({u.key: json.loads(u.value_json) for u in updates})
    unwrap = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    assert unwrap["strategy"]["name"] == "er" and unwrap["train"]["epochs"] == 2


@pytest.mark.slow  # the module's logged run: ~15 s on 2 busy cores
def test_mlflow_local_store_holds_params_metrics_and_artifacts(logged_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = _run_dir(logged_run)
    client = MlflowClient(tracking_uri=(logged_run / "mlruns").as_uri())
    exp = client.get_experiment_by_name("quickstart")
    (found,) = client.search_runs([exp.experiment_id])
    assert found.data.tags["cltoolbox.run_dir"] == str(run.absolute())
    assert found.info.status == "FINISHED"
    assert found.data.params["train.lr"] == "0.1" and found.data.params["strategy.name"] == "er"
    metrics = json.loads((run / "metrics.json").read_text())
    assert found.data.metrics["final/class_il/acc"] == pytest.approx(metrics["class_il"]["acc"], rel=1e-9)
    losses = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted(m.value for m in losses) == pytest.approx(sorted(float(r["loss"]) for r in _train_log(run)))
    rows = client.get_metric_history(found.info.run_id, "accuracy/task_il/mean_trained")
    assert sorted(m.step for m in rows) == [1, 2, 3, 4, 5]
    arts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert "config.json" in arts
    figs = [a.path for a in client.list_artifacts(found.info.run_id, "figures")]
    assert "figures/heatmap_class_il_class_incremental-digits.png" in figs


@pytest.mark.slow  # the module's logged run: ~15 s on 2 busy cores
def test_adding_a_tracker_to_a_finished_run_resumes_it_as_is(logged_run: Path, tmp_path: Path) -> None:
    # loggers are not a run's identity: a finished run is skipped under --resume with other trackers
    code = main(["run", str(ROOT / "experiments" / "quickstart.yaml"), "--seeds", "0", "--out", str(logged_run),
                 "-q", "--resume", "--loggers", "none", *SMALL])
    assert code == 0


def test_logger_validation_is_one_line(tiny_config: dict, monkeypatch, capsys) -> None:
    for spec, msg in (([{"name": "tensorbord"}], "loggers[0]: unknown tracker 'tensorbord' (did you mean"),
                      (["wandb", "wandb"], "loggers[1]: 'wandb' is listed twice"),
                      ([{"name": "mlflow", "uri": "x"}], "loggers[0].uri: unknown option of mlflow"),
                      ([{"name": "wandb", "mode": "cloud"}], "loggers[0].mode: 'cloud' is not a W&B mode"),
                      (3, "loggers: expected a list of tracker names")):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            validate({**tiny_config, "loggers": spec})
    # a tracker that cannot be imported: one line at validation, naming the fix
    monkeypatch.setitem(loggers.TRACKERS, "wandb", ("cltoolbox_no_such_module", {}))
    fix = r"pip install 'cltoolbox\[trackers\]'"
    with pytest.raises(ConfigError, match=r"loggers\[0\]: wandb cannot be imported .*" + fix):
        validate({**tiny_config, "loggers": ["wandb"]})


def test_a_failing_tracker_never_breaks_a_run(tiny_config: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    from cltoolbox.runner import run

    class Broken(loggers.TensorBoardTracker):
        def epoch(self, row: dict) -> None:
            raise RuntimeError("disk of the tracker full")

    monkeypatch.setitem(loggers.CLASSES, "tensorboard", Broken)
    (res,) = run({**tiny_config, "loggers": ["tensorboard"]}, out=str(tmp_path), quiet=True)
    assert res["status"] == "done"
    err = capsys.readouterr().err
    assert err.count("warning: logger tensorboard failed to log (epoch)") == 1  # once, then it is off


def test_only_rank0_logs(tmp_path: Path, monkeypatch) -> None:
    from cltoolbox import distributed

    monkeypatch.setattr(distributed, "is_rank0", lambda: False)  # another rank of a --nproc run
    run = loggers.RunLoggers([{"name": "tensorboard", "dir": None}], {"name": "x"}, tmp_path / "run")
    assert not run.active and not (tmp_path / "run").exists()


def test_tracker_time_is_left_out_of_the_run_cost(tiny_config: dict, tmp_path: Path, monkeypatch) -> None:
    import time

    from cltoolbox.runner import run

    class Slow(loggers.Tracker):
        name = "tensorboard"

        def __init__(self, *args) -> None:
            time.sleep(0.5)

        def epoch(self, row: dict) -> None:
            time.sleep(0.4)

    monkeypatch.setitem(loggers.CLASSES, "tensorboard", Slow)
    (plain,) = run(tiny_config, out=str(tmp_path / "a"), quiet=True)
    (slow,) = run({**tiny_config, "loggers": ["tensorboard"]}, out=str(tmp_path / "b"), quiet=True)
    # the tracker slept 0.5 + 5 x 0.4 = 2.5 s; the run's own clock leaves that out
    assert slow["cost"]["wall_s"] - plain["cost"]["wall_s"] < 1.2


@pytest.mark.slow  # W&B's service start: ~5-10 s on 2 busy cores
def test_a_resumed_run_continues_its_tracker_runs(tiny_config: dict, tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from cltoolbox.errors import CLToolboxError
    from cltoolbox.runner import run
    from cltoolbox.session import RunSession

    cfg = {**tiny_config, "loggers": ["wandb", "mlflow"]}
    original = RunSession.after_experience

    def crash_at_3(self, learner, exp):
        if exp.index == 3:
            raise KeyboardInterrupt  # killed after 3 checkpointed experiences
        original(self, learner, exp)

    monkeypatch.setattr(RunSession, "after_experience", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out=str(tmp_path), quiet=True)
    monkeypatch.setattr(RunSession, "after_experience", original)
    with pytest.raises(CLToolboxError, match="unfinished run"):
        run(cfg, out=str(tmp_path), quiet=True)
    (res,) = run(cfg, out=str(tmp_path), quiet=True, resume=True)
    assert res["status"] == "done"
    run_dir = Path(res["run_dir"])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])  # one MLflow run
    assert found.info.status == "FINISHED"
    rows = client.get_metric_history(found.info.run_id, "accuracy/class_il/mean_trained")
    assert sorted({m.step for m in rows}) == [1, 2, 3, 4, 5]
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # run-<id>.wandb in each offline run
    assert len(files) == 2 and len({f.stem for f in files}) == 1  # the same W&B run id
