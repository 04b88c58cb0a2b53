"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, from ``loggers:`` in a config or ``--loggers``.

A config lists trackers by name, or as mappings with options::

    loggers: [tensorboard, wandb, mlflow]
    loggers:
      - {name: wandb, project: my_project, mode: offline, dir: null}
      - {name: mlflow, tracking_uri: null, experiment: null}
      - {name: tensorboard, dir: null}

What each run logs: the resolved run config (``config.yaml``'s content), per epoch the mean training loss and
the learning rate (step = optimizer steps so far), each accuracy-matrix row as it is evaluated (per evaluated
experience and the mean over the experiences trained so far, class-IL and task-IL; step = experiences
trained, 0 = before training), the final metrics (metrics.json: ACC, AIA, BWT, FWT, forgetting, costs) and
the run's own figures: its class-IL and task-IL accuracy-matrix heatmaps, drawn by ``cltoolbox.report`` from
the finished run folder (one small PNG each, about a second per run; ``cltoolbox report`` makes the
multi-run figures). Nothing is sent anywhere by default:

- ``tensorboard``: event files in ``<run_dir>/tensorboard`` (``dir`` to change it);
- ``wandb``: ``mode: offline`` unless ``mode`` or ``WANDB_MODE`` says otherwise (``wandb sync`` uploads
  later); the offline run lands in ``<run_dir>/wandb`` (``dir``); a resumed run continues the same W&B id;
- ``mlflow``: a local file store ``<out>/mlruns`` (``tracking_uri``, or ``MLFLOW_TRACKING_URI``, to change
  it, e.g. ``sqlite:///mlflow.db``); experiment = the config's name, one MLflow run per run folder (a resumed
  run continues it, found by its ``cltoolbox.run_dir`` tag). MLflow 3 keeps its file store in maintenance
  mode; cltoolbox opts in (``MLFLOW_ALLOW_FILE_STORE``) only for that default store, which parallel
  sweep workers can share without a database.

Trackers are imported when the config is validated (a missing package is one line naming the fix) and only
the process that writes the run folder logs (one logger per run). A tracker that fails while a run trains
prints one warning and is switched off for that run: it never breaks a run. Time spent in the trackers
(starting them, each call) is left out of the run's ``cost.wall_s`` / ``cpu_s``, which measure the method.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cltoolbox.errors import ConfigError
from cltoolbox.params import closest

# name -> (module to import, options with their defaults)
TRACKERS: dict[str, tuple[str, dict[str, Any]]] = {
    "tensorboard": ("torch.utils.tensorboard", {"dir": None}),
    "wandb": ("wandb", {"project": None, "entity": None, "mode": None, "dir": None}),
    "mlflow": ("mlflow", {"tracking_uri": None, "experiment": None}),
}
WANDB_MODES = ("offline", "online", "disabled")
INSTALL = "pip install 'cltoolbox[trackers]'"


def check_loggers(spec: Any, field: str = "loggers") -> list[dict[str, Any]]:
    """``loggers:`` as a list of ``{name, <options>}`` with defaults filled; each tracker is imported now, so
    that a missing or broken package is one line before any run starts."""
    if spec is None:
        return []
    if isinstance(spec, (str, dict)):
        spec = [spec]
    if not isinstance(spec, list):
        raise ConfigError(f"{field}: expected a list of tracker names, e.g. [tensorboard, wandb, mlflow], got {spec!r}")
    out, seen = [], set()
    for i, entry in enumerate(spec):
        where = f"{field}[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{where}: expected a tracker name or a mapping like {{name: wandb, project: p}}, "
                              f"got {entry!r}")
        name = entry["name"]
        if name not in TRACKERS:
            raise ConfigError(f"{where}: unknown tracker '{name}'{closest(name, TRACKERS)}; use one of: "
                              f"{', '.join(TRACKERS)}")
        if name in seen:
            raise ConfigError(f"{where}: '{name}' is listed twice; list each tracker once")
        seen.add(name)
        module, defaults = TRACKERS[name]
        for key, value in entry.items():
            if key == "name":
                continue
            if key not in defaults:
                raise ConfigError(f"{where}.{key}: unknown option of {name}{closest(str(key), defaults)}; use: "
                                  f"{', '.join(defaults) or 'none'}")
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{where}.{key}: expected a string or null, got {value!r}")
        if name == "wandb" and entry.get("mode") not in (None, *WANDB_MODES):
            raise ConfigError(f"{where}.mode: {entry['mode']!r} is not a W&B mode; use one of: "
                              f"{', '.join(WANDB_MODES)}")
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken install raising anything
            raise ConfigError(f"{where}: {name} cannot be imported ({type(e).__name__}: {' '.join(str(e).split())}); "
                              f"{INSTALL} or remove it from loggers") from None
        out.append({"name": name, **{k: entry.get(k, v) for k, v in defaults.items()}})
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """metrics.json's numbers as flat ``class_il/acc``-style keys (NaN and non-numbers left out)."""
    out = {}
    for section in ("class_il", "task_il", "cost"):
        for k, v in (summary.get(section) or {}).items():
            if _finite(v):
                out[f"{section}/{k}"] = float(v)
    return out


def _params(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as flat ``train.lr``-style string parameters (lists as text)."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_params(v, key + "."))
        else:
            out[key] = str(v)
    return out


class Tracker:
    """One tracker's calls; every method may raise (RunLoggers switches a failing tracker off)."""

    name = ""

    def config(self, cfg: dict[str, Any]) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def accuracy_row(self, step: int, values: dict[str, float]) -> None: ...
    def final(self, metrics: dict[str, float]) -> None: ...
    def figures(self, paths: list[Path]) -> None: ...
    def close(self, status: str) -> None: ...


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, opts: dict, run_cfg: dict, run_dir: Path, run_id: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(opts["dir"]) if opts["dir"] else run_dir / "tensorboard"))
        self.last_step = 0

    def config(self, cfg: dict[str, Any]) -> None:
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(cfg, sort_keys=False) + "```")

    def epoch(self, row: dict[str, Any]) -> None:
        self.last_step = int(row["step"])
        self.writer.add_scalar("train/loss", row["loss"], self.last_step)
        self.writer.add_scalar("train/lr", row["lr"], self.last_step)

    def accuracy_row(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def final(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"final/{k}", v, 0)

    def figures(self, paths: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for p in paths:
            img = np.asarray(Image.open(p).convert("RGB"))
            self.writer.add_image(f"figures/{p.stem}", img, 0, dataformats="HWC")

    def close(self, status: str) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, opts: dict, run_cfg: dict, run_dir: Path, run_id: str) -> None:
        import wandb

        self.wandb = wandb
        mode = opts["mode"] or os.environ.get("WANDB_MODE") or "offline"
        folder = Path(opts["dir"]) if opts["dir"] else run_dir
        folder.mkdir(parents=True, exist_ok=True)
        labels = f"{run_cfg['strategy']['label']}-seed{run_cfg['seed']}"
        self.run = wandb.init(project=opts["project"] or run_cfg["name"], entity=opts["entity"], mode=mode,
                              dir=str(folder), id=run_id, name=labels, resume="allow", reinit="create_new",
                              group=run_cfg["strategy"]["label"], settings=wandb.Settings(silent=True))

    def config(self, cfg: dict[str, Any]) -> None:
        self.run.config.update(cfg, allow_val_change=True)

    def epoch(self, row: dict[str, Any]) -> None:
        self.run.log({"train/loss": row["loss"], "train/lr": row["lr"], "train/step": int(row["step"]),
                      "train/experience": row["experience"], "train/epoch": row["epoch"]})

    def accuracy_row(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, "eval/trained_experiences": step})

    def final(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.run.summary[f"final/{k}"] = v

    def figures(self, paths: list[Path]) -> None:
        self.run.log({f"figures/{p.stem}": self.wandb.Image(str(p)) for p in paths})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "done" else 1)


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, opts: dict, run_cfg: dict, run_dir: Path, run_id: str) -> None:
        uri = opts["tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the default local store; see the module doc
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(run_cfg.get("out") or "runs").absolute() / "mlruns").as_uri()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = opts["experiment"] or run_cfg["name"]
        exp = self.client.get_experiment_by_name(name)
        try:
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - a parallel worker created it first
            exp_id = self.client.get_experiment_by_name(name).experiment_id
        tag = str(run_dir.absolute())
        found = self.client.search_runs([exp_id], filter_string=f"tags.`cltoolbox.run_dir` = '{tag}'",
                                        max_results=1)
        if found:  # a resumed run continues its MLflow run
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(exp_id, run_name=f"{run_cfg['strategy']['label']}-seed{run_cfg['seed']}",
                                         tags={"cltoolbox.run_dir": tag, "cltoolbox.id": run_id})
            self.run_id = run.info.run_id

    def config(self, cfg: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_dict(self.run_id, cfg, "config.json")
        existing = self.client.get_run(self.run_id).data.params  # params are write-once: a resume skips them
        params = [Param(k, v[:6000]) for k, v in _params(cfg).items() if k not in existing]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def epoch(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ms, step = int(time.time() * 1000), int(row["step"])
        self.client.log_batch(self.run_id, metrics=[Metric("train/loss", row["loss"], ms, step),
                                                    Metric("train/lr", row["lr"], ms, step)])

    def accuracy_row(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("@", "_"), v, ms, step)
                                                    for k, v in values.items()])

    def final(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"final/{k}", v, ms, 0) for k, v in metrics.items()])

    def figures(self, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), "figures")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if status == "done" else "FAILED")


CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class RunLoggers:
    """The trackers of one run. Every call goes to every tracker; one that raises prints one warning line and
    is switched off for the rest of the run, so a tracker never breaks a run."""

    def __init__(self, specs: list[dict[str, Any]], run_cfg: dict[str, Any], run_dir: Path) -> None:
        from cltoolbox import distributed

        self.trackers: list[Tracker] = []
        # time spent in the trackers (start included), which the run's cost clocks leave out (RunSession)
        self.wall, self.cpu = 0.0, 0.0
        run_dir = Path(run_dir)
        if not distributed.is_rank0():  # --nproc / torchrun: the other ranks train in a scratch folder, silent
            return
        t0, c0 = time.perf_counter(), time.process_time()
        # the same id on every resume of this run folder (W&B's run id, MLflow's tag)
        run_id = hashlib.sha1(str(run_dir.absolute()).encode()).hexdigest()[:16]
        for spec in specs:
            opts = {k: v for k, v in spec.items() if k != "name"}
            try:
                self.trackers.append(CLASSES[spec["name"]](opts, run_cfg, run_dir, run_id))
            except Exception as e:  # noqa: BLE001
                self._warn(spec["name"], "start", e)
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    @staticmethod
    def _warn(name: str, what: str, e: BaseException) -> None:
        print(f"warning: logger {name} failed to {what} ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
              "it is off for the rest of this run", file=sys.stderr, flush=True)

    def _call(self, method: str, *args: Any) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # noqa: BLE001 - never break a run
                self._warn(t.name, f"log ({method})", e)
                self.trackers.remove(t)
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0

    def config(self, cfg: dict[str, Any]) -> None:
        self._call("config", cfg)

    def epoch(self, row: dict[str, Any]) -> None:
        self._call("epoch", row)

    def accuracy_row(self, trained_exp: int, matrices: dict[str, Any]) -> None:
        """Row ``trained_exp + 1`` of each setting's (T+1) x K matrix (``History.matrix``)."""
        values: dict[str, float] = {}
        for setting, R in matrices.items():
            row = R[trained_exp + 1]
            for j, v in enumerate(row):
                if _finite(float(v)):
                    values[f"accuracy/{setting}/exp{j}"] = float(v)
            seen = [float(v) for v in row[: trained_exp + 1] if _finite(float(v))]
            if seen:
                values[f"accuracy/{setting}/mean_trained"] = sum(seen) / len(seen)
        if values:
            self._call("accuracy_row", trained_exp + 1, values)

    def finish(self, summary: dict[str, Any], run_dir: Path, status: str) -> None:
        """Final metrics, the run's figures (when it finished), then close every tracker."""
        self._call("final", flat_metrics(summary))
        if status == "done" and self.trackers:
            with tempfile.TemporaryDirectory(prefix="cltoolbox_fig") as tmp:
                try:
                    paths = run_figures(run_dir, Path(tmp))
                except Exception as e:  # noqa: BLE001
                    print(f"warning: loggers: the run's figures could not be drawn ({type(e).__name__}: {e})",
                          file=sys.stderr)
                    paths = []
                if paths:
                    self._call("figures", paths)
        self._call("close", status)


def run_figures(run_dir: Path, out: Path) -> list[Path]:
    """The run's accuracy-matrix heatmaps (class-IL, task-IL where it differs), as ``cltoolbox report`` draws
    them, PNG only."""
    import matplotlib

    matplotlib.use("Agg")
    from cltoolbox import report
    from cltoolbox.results import load

    data = load([run_dir])
    infos = {sc: report.scenario_info(g.run.iloc[0]) for sc, g in data["accuracy"].groupby("scenario", sort=False)}
    report.paper_style()
    paths: list[Path] = []
    for setting in ("class_il", "task_il"):
        if any(setting in info["settings"] for info in infos.values()):
            paths += [p for p in report.plot_heatmaps(data["accuracy"], setting, out, infos) if p.suffix == ".png"]
    return paths
