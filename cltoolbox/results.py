"""Run folders: the atomic writer used during a run and the pandas loaders used afterwards.

Layout of one run folder (see README "Run folder"):
    config.yaml, env.json, accuracy.csv, per_class.csv, matrices/{accuracy,forgetting,transfer}_<setting>.csv,
    metrics.json, train_log.csv, checkpoint/state.pt, DONE (written last).
Every file is written to a temporary name and renamed (one sync before DONE), so a killed run never leaves a
half-written file behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cltoolbox.errors import CLToolboxError


class ResultsNotFoundError(CLToolboxError, FileNotFoundError):
    """No finished run under the given paths."""

ACCURACY_FIELDS = ["trained_exp", "eval_exp", "setting", "accuracy", "loss", "n_samples"]
PER_CLASS_FIELDS = ["trained_exp", "eval_exp", "setting", "class", "n_samples", "n_correct"]
TRAIN_LOG_FIELDS = ["experience", "epoch", "step", "loss", "lr", "samples_per_s"]
OLD_NEW_FIELDS = ["trained_exp", "setting", "accuracy_old", "n_old", "accuracy_new", "n_new"]


def atomic_write_bytes(path: Path, data: bytes | bytearray | memoryview, durable: bool = False) -> None:
    """Write to a temporary name and rename: a killed process never leaves a half-written file.

    ``durable`` also fsyncs, against power loss. Runs sync everything once before their DONE marker
    (which is durable) instead of paying an fsync per file and per checkpoint.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str, durable: bool = False) -> None:
    atomic_write_bytes(path, text.encode(), durable)


def _json_safe(obj: Any) -> Any:
    """NaN/inf become null: JSON has no NaN and undefined metrics must stay distinguishable from 0."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def write_csv(path: Path, rows: Iterable[dict], fields: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items() if k in fields})
    atomic_write_text(path, buf.getvalue())


def write_matrix(path: Path, M: Any) -> None:
    """A (T+1) x T matrix with a header of eval experiences and a ``trained_exp`` column (-1..T-1)."""
    T = M.shape[1]
    lines = ["trained_exp," + ",".join(f"exp_{j}" for j in range(T))]
    for i in range(M.shape[0]):
        lines.append(f"{i - 1}," + ",".join("" if math.isnan(v) else repr(float(v)) for v in M[i]))
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_confusion(path: Path, counts: Any) -> None:
    """A C x C count matrix: row = true class, column = predicted class (header ``true,pred_0..pred_{C-1}``)."""
    C = counts.shape[0]
    lines = ["true," + ",".join(f"pred_{c}" for c in range(C))]
    lines += [f"{c}," + ",".join(str(int(v)) for v in counts[c]) for c in range(C)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def is_done(run_dir: Path) -> bool:
    return (Path(run_dir) / "DONE").exists()


# --------------------------------------------------------------------------------------------------
# Loading (pandas is imported here only, never on the training path)


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every finished run folder (holding DONE) at or below the given paths."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if is_done(p):
            runs.append(p)
        elif p.is_dir():
            runs.extend(sorted(d.parent for d in p.rglob("DONE")))
    return runs


def _start_time(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "env.json").read_text()).get("start_time") or ""
    except (OSError, ValueError):
        return ""


def _run_labels(run_dir: Path) -> dict[str, Any]:
    meta = json.loads((run_dir / "metrics.json").read_text())
    return {"run": str(run_dir), **meta.get("labels", {})}


def _method(run_dir: Path, label: str) -> str:
    """The registry name of the run's strategy (config.yaml), e.g. ``joint`` for a run labelled ``joint-lr0.1``."""
    import yaml

    try:
        strategy = yaml.safe_load((run_dir / "config.yaml").read_text()).get("strategy")
        name = strategy.get("name") if isinstance(strategy, dict) else None
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        name = None
    return name if isinstance(name, str) else label


def unfinished_runs(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """Run folders at or below ``paths`` without a DONE marker, with the reason metrics.json gives (diverged,
    failed, interrupted) or 'no DONE marker'."""
    out: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.is_dir():
            continue
        for cfg in sorted(p.rglob("config.yaml")):
            run = cfg.parent
            if run in seen or is_done(run) or not run.name.startswith("seed_"):
                continue
            seen.add(run)
            try:
                status = json.loads((run / "metrics.json").read_text()).get("status", "unknown")
                why = f"not finished (status: {status})"
            except (OSError, ValueError, AttributeError):
                why = "not finished (no DONE marker; interrupted or still running)"
            out.append((run, why))
    return out


def _seen(accuracy: Any, run: Path) -> Any:
    """Per row: had training reached the evaluated experience (``metrics.seen_mask`` of stream.json's
    ``first_seen``)? Not ``eval_exp <= trained_exp`` on streams whose training experiences are chunks or
    repetitions of the evaluated tasks (online, recurring); that is the default for older run folders."""
    from cltoolbox.metrics import seen_mask

    n_cols = int(accuracy.eval_exp.max()) + 1
    try:
        first = json.loads((run / "stream.json").read_text())["first_seen"]
    except (OSError, ValueError, KeyError):
        first = range(1, n_cols + 1)
    mask = seen_mask(first, int(accuracy.trained_exp.max()) + 2)
    return mask[accuracy.trained_exp.to_numpy() + 1, accuracy.eval_exp.to_numpy()]


class RunUnreadableError(CLToolboxError, ValueError):
    """A finished run folder whose result files cannot be read."""


def _read_run(run: Path) -> tuple[Any, Any, list[dict[str, Any]]]:
    """(accuracy, train_log, metric rows) of one finished run; RunUnreadableError says what is wrong."""
    import pandas as pd

    try:
        meta = json.loads((run / "metrics.json").read_text())
    except OSError as e:
        raise RunUnreadableError(f"metrics.json unreadable ({e.strerror or e})") from None
    except ValueError as e:
        raise RunUnreadableError(f"metrics.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), dict) for k in ("class_il", "task_il", "cost")):
        raise RunUnreadableError("metrics.json lacks its class_il/task_il/cost sections")
    if meta.get("status", "done") != "done":
        raise RunUnreadableError(f"status {meta.get('status')!r} in metrics.json")
    try:
        a = pd.read_csv(run / "accuracy.csv")
    except pd.errors.EmptyDataError:
        raise RunUnreadableError("accuracy.csv is empty") from None
    except (OSError, ValueError) as e:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise RunUnreadableError(f"accuracy.csv unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                 ) from None
    missing = [c for c in ACCURACY_FIELDS if c not in a.columns]
    if missing or a.empty:
        raise RunUnreadableError("accuracy.csv has no rows" if not missing else f"accuracy.csv lacks {missing[0]!r}")
    try:
        log_df = pd.read_csv(run / "train_log.csv")
    except (OSError, ValueError):
        log_df = pd.DataFrame(columns=TRAIN_LOG_FIELDS)
    labels = {"run": str(run), **(meta.get("labels") if isinstance(meta.get("labels"), dict) else {})}
    if "strategy" not in labels or "scenario" not in labels:
        raise RunUnreadableError("metrics.json lacks the run's labels (strategy, scenario)")
    labels["method"] = _method(run, labels["strategy"])
    a["seen"] = _seen(a, run)
    for k, v in labels.items():
        a[k] = v
        log_df[k] = v
    rows = [{**labels, "setting": s, **meta[s], **meta["cost"]} for s in ("class_il", "task_il")]
    return a, log_df, rows


def load(paths: str | Path | Iterable[str | Path], dropped: list[tuple[Path, str]] | None = None) -> dict[str, Any]:
    """DataFrames over one or many run folders: ``accuracy`` (tidy, with ``seen``: the evaluated experience
    had been trained by that row), ``metrics`` (one row per run and setting), ``train_log``. Each row carries
    the run's labels (experiment, strategy, scenario, seed) and ``method``, the strategy's registry name.

    A finished run whose files cannot be read raises RunUnreadableError naming it; with a ``dropped`` list,
    such runs, and run folders that never finished (diverged, failed, interrupted), are left out and listed
    there as (folder, reason) instead."""
    import pandas as pd

    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    acc, met, log = [], [], []
    if dropped is not None:
        dropped.extend(unfinished_runs(paths))
    for run in sorted(find_runs(paths), key=_start_time):  # run order = config order in tables and legends
        try:
            a, log_df, rows = _read_run(run)
        except RunUnreadableError as e:
            if dropped is None:
                raise RunUnreadableError(f"{run}: {e}") from None
            dropped.append((run, str(e)))
            continue
        acc.append(a)
        log.append(log_df)
        met.extend(rows)
    if not acc:
        raise ResultsNotFoundError(
            f"runs: no finished run folder (with DONE) under {', '.join(map(str, paths))}; "
            "pass run folders or the --out folder of `cltoolbox run`")
    return {
        "accuracy": pd.concat(acc, ignore_index=True),
        "metrics": pd.DataFrame(met).astype({"seed": int}, errors="ignore"),
        "train_log": pd.concat(log, ignore_index=True),
    }
