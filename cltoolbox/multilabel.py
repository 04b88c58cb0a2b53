"""Multi-label streams: the sigmoid/BCE training loss and the evaluator (mAP, CF1, OF1).

**Loss.** On a multi-label stream (``Stream.multi_label``) the loop's default loss is binary cross-entropy on
the sigmoid of each logit, summed over the classes seen so far (the current experience's included) and
averaged over the batch (the convention of the multi-label losses KRT and MULTI-LANE train with). Classes of
later experiences are left out: nothing is known about them yet. A label the sample does not carry is a
negative, so under the MLCIL protocol an old class present in a new image is trained as absent: that is the
protocol's difficulty (Dong et al. 2023), not an accident of this loss.

**Metrics** (threshold 0.5 on the sigmoid, i.e. logit > 0, for the F1 scores):

- AP of a class (non-interpolated average precision, as ``sklearn.metrics.average_precision_score``):
  ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds in decreasing order; mAP = the mean AP
  over classes (Everingham et al. 2010 without the 11-point interpolation; the mAP of KRT and MULTI-LANE).
  A class without a positive test image has no AP (NaN, left out of means).
- CP, CR = per-class precision and recall averaged over classes (a class with no predicted positive has
  precision 0); CF1 = 2 CP CR / (CP + CR) (Chen et al. 2019, ML-GCN; the CF1 of KRT).
  ``macro_f1`` = the mean of per-class F1 (sklearn's ``average="macro"``) is reported beside it.
- OP, OR = precision and recall over all (image, class) decisions pooled; OF1 = 2 OP OR / (OP + OR)
  (= sklearn's ``average="micro"`` F1).

**Per step.** Row r of a matrix is the model after training experiences 1..r (row 0: before training); column
j holds the metric over the classes of experience j, computed on the test images that hold a class of
experiences 1..max(r, j+1), i.e. for a seen column the images holding any class seen so far, annotated with
every class (the MLCIL test protocol), and for a future column the pool of the step that first trains it (so
the transfer matrix compares like with like). The "seen" value of row r (``multilabel.csv``, metrics.json's
``multi_label``) is the metric over all classes seen so far on that pool. For a multi-label stream the
``accuracy`` column of accuracy.csv (both settings) holds the per-experience mAP, so ACC, forgetting and the
report's figures read mAP; ACC then equals the final seen mAP when experiences have equal class counts.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from cltoolbox.errors import ConfigError

if TYPE_CHECKING:
    from cltoolbox.evaluate import History
    from cltoolbox.loop import Learner
    from cltoolbox.stream import Stream

METRICS = ("map", "cf1", "of1", "macro_f1")


# -- loss ------------------------------------------------------------------------------------------------
def check_plugins(plugins: list[Any], stream: Stream, field: str) -> None:
    """One line when a strategy's plugin has not been checked on multi-label streams (``supports_multi_label``)."""
    if not stream.multi_label:
        return
    bad = [type(p).__name__ for p in plugins if not vars(type(p)).get("supports_multi_label", False)]
    if bad:
        raise ConfigError(f"{field}: {bad[0]} does not support multi-label streams (it assumes one label per "
                          "sample); use naive, er (reservoir), l2p or multi_lane on this scenario")


def bce_loss(logits: torch.Tensor, y: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """BCE on the sigmoid of ``logits[:, classes]`` against the multi-hot ``y``: summed over those classes,
    averaged over the batch."""
    lg = logits.index_select(1, classes).float()
    return F.binary_cross_entropy_with_logits(lg, y.index_select(1, classes).to(lg.dtype),
                                              reduction="sum") / max(1, lg.shape[0])


def seen_classes(learner: Learner) -> torch.Tensor:
    """Class ids of the stream's experiences up to the current one (all classes outside an experience)."""
    stream, exp = learner.stream, learner.experience
    last = len(stream.experiences) if exp is None else exp.index + 1
    ids = sorted({c for e in stream.experiences[:last] for c in e.classes})
    return torch.tensor(ids, dtype=torch.long, device=learner.device)


# -- metrics ---------------------------------------------------------------------------------------------
def average_precision(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per column of ``scores`` (N, K) and binary ``y`` (N, K): AP as sklearn computes it (ties share one
    threshold); NaN for a column without positives. float64 (K,)."""
    s, t = scores.double(), y.double()
    order = torch.argsort(s, dim=0, descending=True, stable=True)
    s, t = s.gather(0, order), t.gather(0, order)
    tp = t.cumsum(0)
    fp = (1 - t).cumsum(0)
    last = torch.ones_like(s, dtype=torch.bool)  # the last position of each distinct score: one threshold
    last[:-1] = s[:-1] != s[1:]
    pos = tp[-1] if len(tp) else torch.zeros(s.shape[1], dtype=torch.float64)
    precision = tp / (tp + fp).clamp_min(1)
    recall = tp / pos.clamp_min(1)
    ap = torch.zeros(s.shape[1], dtype=torch.float64)
    for k in range(s.shape[1]):  # per class, over its distinct thresholds: recall steps times precision
        r, p = recall[last[:, k], k], precision[last[:, k], k]
        ap[k] = ((r - torch.cat((r.new_zeros(1), r[:-1]))) * p).sum()
    return torch.where(pos > 0, ap, torch.full_like(ap, float("nan")))


def f1_scores(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """CF1, OF1 and macro F1 of the decisions ``logits > 0`` (sigmoid > 0.5) against binary ``y`` (N, K)."""
    pred, t = logits > 0, y > 0
    tp = (pred & t).sum(0).double()
    fp = (pred & ~t).sum(0).double()
    fn = (~pred & t).sum(0).double()
    cp = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp)).mean()
    cr = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp)).mean()
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.zeros_like(tp))
    otp, ofp, ofn = tp.sum(), fp.sum(), fn.sum()
    return {
        "cf1": float(2 * cp * cr / (cp + cr)) if cp + cr > 0 else 0.0,
        "of1": float(2 * otp / (2 * otp + ofp + ofn)) if 2 * otp + ofp + ofn > 0 else 0.0,
        "macro_f1": float(f1.mean()) if len(f1) else float("nan"),
    }


def scores(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """mAP, CF1, OF1 and macro F1 of ``logits`` (N, K) against multi-hot ``y`` (N, K)."""
    ap = average_precision(logits, y)
    m = float(torch.nanmean(ap)) if bool((~ap.isnan()).any()) else float("nan")
    return {"map": m, **f1_scores(logits, y)}


# -- evaluation pass -------------------------------------------------------------------------------------
class _Pool:
    """The distinct test images of a multi-label stream (keys, full labels) and, per experience, which of them
    hold one of its classes."""

    def __init__(self, stream: Stream, device: torch.device) -> None:
        tests = stream.eval_experiences
        keys = torch.cat([stream.keys(e.test) for e in tests])
        ys = torch.cat([e.test.y for e in tests])
        self.keys, first = _unique_rows(keys)
        self.y = ys[first.to(ys.device)].to(device)
        self.classes = [torch.tensor(e.classes, dtype=torch.long, device=device) for e in tests]
        self.holds = torch.stack([self.y.index_select(1, c).sum(1) > 0 for c in self.classes])  # (K, N)


def _unique_rows(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct keys (sorted) and the position of the first occurrence of each."""
    uniq, inv = torch.unique(keys, return_inverse=True)
    first = torch.full((len(uniq),), len(keys), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inv, torch.arange(len(keys), device=keys.device), reduce="amin")
    return uniq, first


def ensure_tensors(history: History, T: int, K: int) -> None:
    """Multi-label results kept on the History (so they are checkpointed with it): per (row, column, metric)
    and per (row, seen metric + pool size)."""
    if getattr(history, "ml_matrix", None) is None:
        history.ml_matrix = torch.full((T + 1, K, len(METRICS)), float("nan"), dtype=torch.float64)
        history.ml_seen = torch.full((T + 1, len(METRICS) + 1), float("nan"), dtype=torch.float64)


@torch.inference_mode()
def evaluate_multi_label(learner: Learner, stream: Stream, trained_exp: int, history: History) -> None:
    """Fill row ``trained_exp + 1`` of ``history`` for a multi-label stream (see the module docstring)."""
    row, K, T = trained_exp + 1, len(stream.eval_experiences), history.accuracy.shape[0] - 1
    ensure_tensors(history, T, K)
    cached = getattr(learner, "_ml_pool", None)
    if cached is None or cached[0] is not stream:
        cached = (stream, _Pool(stream, learner.device))
        learner._ml_pool = cached
    pool = cached[1]
    logits = learner.logits(pool.keys, torch.zeros(len(pool.keys), dtype=torch.long, device=pool.keys.device))
    logits = logits.float()
    first_seen = stream.first_seen()
    seen_exps = [j for j, f in enumerate(first_seen) if 0 < f <= row]
    for j in range(K):
        upto = [i for i in range(K) if i in seen_exps or i <= j] if j not in seen_exps else seen_exps
        members = pool.holds[upto].any(0)
        lg, y = logits[members].index_select(1, pool.classes[j]), pool.y[members].index_select(1, pool.classes[j])
        s = scores(lg, y)
        history.ml_matrix[row, j] = torch.tensor([s[m] for m in METRICS], dtype=torch.float64)
        history.accuracy[row, j] = s["map"]
        history.loss[row, j] = float(F.binary_cross_entropy_with_logits(lg, y.float(), reduction="sum")
                                     / max(1, lg.shape[0]))
    history.n_samples.copy_(pool.holds.sum(1).cpu())
    if seen_exps:
        classes = torch.cat([pool.classes[j] for j in seen_exps])
        members = pool.holds[seen_exps].any(0)
        s = scores(logits[members].index_select(1, classes), pool.y[members].index_select(1, classes))
        history.ml_seen[row] = torch.tensor([*(s[m] for m in METRICS), int(members.sum())], dtype=torch.float64)
    history.rows_done[row] = True


# -- results ---------------------------------------------------------------------------------------------
def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def write_results(run_dir: Path, history: History, summary: dict[str, Any]) -> None:
    """matrices/{map,cf1,of1,macro_f1}.csv, multilabel.csv (per row: the seen-class metrics) and the
    ``multi_label`` section of metrics.json (final and average-over-steps values, the per-step lists)."""
    from cltoolbox.results import write_csv, write_matrix

    if getattr(history, "ml_matrix", None) is None:
        return
    for i, m in enumerate(METRICS):
        write_matrix(Path(run_dir) / "matrices" / f"{m}.csv", history.ml_matrix[:, :, i].numpy())
    done = torch.nonzero(history.rows_done).flatten().tolist()
    seen = history.ml_seen.numpy()
    rows = [{"trained_exp": r - 1, **{m: float(seen[r, i]) for i, m in enumerate(METRICS)},
             "n_test": int(seen[r, -1]) if not np.isnan(seen[r, -1]) else 0} for r in done]
    write_csv(Path(run_dir) / "multilabel.csv", rows, ["trained_exp", *METRICS, "n_test"])
    trained = [r for r in done if r > 0]
    section: dict[str, Any] = {"columns": "seen classes so far (see cltoolbox.multilabel)", "threshold": 0.5}
    if trained:
        last = trained[-1]
        for i, m in enumerate(METRICS):
            section[m] = _nan_to_none(float(seen[last, i]))
            section[f"avg_{m}"] = _nan_to_none(float(np.nanmean(seen[trained, i])))
        section["per_step"] = {m: [_nan_to_none(float(seen[r, i])) for r in trained] for i, m in enumerate(METRICS)}
    summary["multi_label"] = section


def read_per_step(run_dir: Path) -> list[dict[str, float]]:
    """multilabel.csv of a run folder as dicts of floats."""
    with open(Path(run_dir) / "multilabel.csv", newline="") as f:
        return [{k: float(v) if v not in ("", "nan") else float("nan") for k, v in r.items()}
                for r in csv.DictReader(f)]
