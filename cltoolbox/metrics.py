"""Continual-learning metrics over an accuracy matrix (pure numpy).

Indexing
--------
``R`` has shape ``(T+1, T)`` for ``T >= 1`` experiences.

* Row 0 is the model before any training (the "init" row, ``trained_exp = -1``);
  ``b_j = R[0, j-1]`` is the init model's accuracy on experience ``j``.
* Row ``i`` (``1..T``) is the model after training on experiences ``1..i``.
* Column ``c`` (0-based, ``0..T-1``) is test experience ``j = c + 1``.

So in the papers' 1-based notation ``a_{i,j} = R[i, j-1]``: experience ``j`` is
learned at row ``j`` and its "just learned" accuracy ``a_{j,j}`` is ``R[j, j-1]``
(the sub-diagonal, not ``R[j, j]``). Experience ``j`` is *seen* at row ``i`` iff
``j <= i``, i.e. column ``c < i``; it is *future* iff ``c >= i``.

Recurring and task-free streams
-------------------------------
When training experiences revisit tasks (or many small experiences come from one task), ``R`` has one
column per *distinct* test task and ``T`` training rows, so its shape is ``(T+1, K)``. Every metric then
takes ``first_seen``: for each column, the row at which that task was first trained (1..T; 0 or NaN if
never). "Just learned" becomes ``R[first_seen_j, j]`` and "future" means rows before ``first_seen_j``.
With the default ``first_seen = (1, ..., T)`` the formulas are exactly the papers' ones above.

Entries may be NaN (not evaluated). Every metric averages only its defined terms;
a term whose inputs are NaN is dropped, and a metric with no defined term is NaN
(no warnings). Metrics that need a second experience (``bwt``, ``fwt``,
``forgetting``, ``forgetting_last``) are NaN when ``T == 1``.

Sample weighting
----------------
``aia`` and ``acc_weighted`` weigh experiences by their test-set sizes (``n_samples``): they are accuracies
over all test samples seen so far, as Rebuffi et al. define the average incremental accuracy. ``acc``,
``aia_unweighted``, ``bwt``, ``fwt``, ``forgetting``, ``forgetting_last`` and ``intransigence`` average
per-experience values, each experience counting once, as the GEM and RWalk papers define them (their sums
run over tasks). They differ on streams whose experiences have unequal test sets (a base session then small
increments, few-shot streams).

Sources
-------
* Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning"
  (GEM): ACC, BWT, FWT.
* Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning: Understanding
  Forgetting and Intransigence" (RWalk): forgetting, intransigence.
* Rebuffi et al. 2017, "iCaRL: Incremental Classifier and Representation
  Learning": average incremental accuracy.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "acc",
    "acc_weighted",
    "aia",
    "aia_unweighted",
    "bwt",
    "forgetting",
    "forgetting_last",
    "forgetting_matrix",
    "fwt",
    "intransigence",
    "summary",
    "transfer_matrix",
]


def _check(R: np.ndarray, first_seen: np.ndarray | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """``R`` as floats, ``T`` (training rows) and the first-seen row of every column (0 = never seen).

    Without ``first_seen``, R must be (T+1, T) and experience j is first trained at row j.
    """
    R = np.asarray(R, dtype=float)
    if first_seen is None:
        if R.ndim != 2 or R.shape[1] < 1 or R.shape[0] != R.shape[1] + 1:
            raise ValueError(
                f"R must have shape (T+1, T) with T >= 1 (row 0 = init model, row i = after "
                f"experience i; one column per experience), got shape {R.shape}"
            )
        return R, R.shape[1], np.arange(1, R.shape[1] + 1)
    if R.ndim != 2 or R.shape[0] < 2 or R.shape[1] < 1:
        raise ValueError(f"R must have shape (T+1, K) with T, K >= 1, got shape {R.shape}")
    fs = np.nan_to_num(np.asarray(first_seen, dtype=float), nan=0.0)
    if fs.shape != (R.shape[1],) or np.any(fs < 0) or np.any(fs > R.shape[0] - 1) or np.any(fs != np.round(fs)):
        raise ValueError(f"first_seen must hold one row index in 0..{R.shape[0] - 1} per column, got {first_seen}")
    return R, R.shape[0] - 1, fs.astype(int)


def _check_vec(v: np.ndarray, K: int, name: str) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    if v.shape != (K,):
        raise ValueError(f"{name} must be a length-T vector with T={K}, got shape {v.shape}")
    return v


def _mean(x) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
    x = np.asarray(x, dtype=float).ravel()
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _just_learned(R: np.ndarray, fs: np.ndarray) -> np.ndarray:
    """a_{j,j}: accuracy on each column at the row it was first trained (NaN if never trained)."""
    out = np.full(R.shape[1], np.nan)
    seen = fs > 0
    out[seen] = R[fs[seen], np.flatnonzero(seen)]
    return out


def acc(R: np.ndarray, first_seen: np.ndarray | None = None) -> float:
    """Final average accuracy (GEM ACC): mean over columns of the last row ``R[T, :]``."""
    R, T, _ = _check(R, first_seen)
    return _mean(R[T])


def acc_weighted(R: np.ndarray, n_samples: np.ndarray, first_seen: np.ndarray | None = None) -> float:
    """Final accuracy weighted by test-set size: sum_j n_j R[T, j] / sum_j n_j.

    ``n_samples`` holds the non-negative test-set size of every column. NaN entries of ``R[T]`` are
    dropped together with their weights.
    """
    R, T, _ = _check(R, first_seen)
    w = _check_vec(n_samples, R.shape[1], "n_samples")
    if np.any(w < 0) or np.any(np.isnan(w)):
        raise ValueError("n_samples must be non-negative numbers")
    ok = ~np.isnan(R[T])
    total = w[ok].sum()
    return float((w[ok] * R[T, ok]).sum() / total) if total > 0 else float("nan")


def seen_mask(first_seen, n_rows: int) -> np.ndarray:
    """(n_rows, K) bool: row i has trained column j (0 < first_seen_j <= i; row 0 is the init row)."""
    fs = np.nan_to_num(np.asarray(first_seen, dtype=float), nan=0.0)
    return (fs > 0)[None, :] & (fs[None, :] <= np.arange(n_rows)[:, None])


def aia(R: np.ndarray, n_samples: np.ndarray, first_seen: np.ndarray | None = None) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017, iCaRL, Sec. 4.1): after each training step i = 1..T,
    the accuracy on *all test samples* of the experiences trained by then (columns with first_seen <= i), then
    the mean over steps. Sample-weighted: step i's accuracy is sum_j n_j R[i, j] / sum_j n_j over the seen
    columns, ``n_samples`` holding each column's test-set size. The init row is not used.

    With equal test-set sizes this equals :func:`aia_unweighted`; on base-session or few-shot streams (a large
    first experience, then small ones) the two differ, and only this one is the paper's number. NaN entries
    are dropped together with their weights; a step with no defined seen entry is skipped.
    """
    R, T, fs = _check(R, first_seen)
    w = _check_vec(n_samples, R.shape[1], "n_samples")
    if np.any(w < 0) or np.any(np.isnan(w)):
        raise ValueError("n_samples must be non-negative numbers")
    seen = seen_mask(fs, T + 1)
    steps = []
    for i in range(1, T + 1):
        ok = seen[i] & ~np.isnan(R[i])
        total = w[ok].sum()
        steps.append(float((w[ok] * R[i, ok]).sum() / total) if total > 0 else np.nan)
    return _mean(steps)


def aia_unweighted(R: np.ndarray, first_seen: np.ndarray | None = None) -> float:
    """Unweighted average incremental accuracy: mean_{i=1..T} of the plain mean of row i over the experiences
    trained by then. Every experience counts the same whatever its test-set size; it equals :func:`aia`
    only when the seen experiences' test sets have equal sizes. Not Rebuffi et al.'s definition (see
    :func:`aia`); kept for comparison with tools that average per-experience accuracies."""
    R, T, fs = _check(R, first_seen)
    seen = seen_mask(fs, T + 1)
    return _mean([_mean(R[i, seen[i]]) for i in range(1, T + 1)])


def bwt(R: np.ndarray, first_seen: np.ndarray | None = None) -> float:
    """Backward transfer (GEM): mean over experiences j learned before the last row of
    (R[T, j] - R[j, j]); negative values mean forgetting. NaN when T == 1."""
    R, T, fs = _check(R, first_seen)
    before_last = (fs > 0) & (fs < T)
    return _mean((R[T] - _just_learned(R, fs))[before_last])


def fwt(R: np.ndarray, first_seen: np.ndarray | None = None) -> float:
    """Forward transfer (GEM): mean over j = 2..T of (R[j-1, j] - b_j): accuracy on experience j just
    before training on it, minus the init model's accuracy on it. NaN when T == 1."""
    R, T, fs = _check(R, first_seen)
    cols = np.flatnonzero(fs >= 2)
    return _mean(R[fs[cols] - 1, cols] - R[0, cols])


def forgetting(R: np.ndarray, first_seen: np.ndarray | None = None) -> float:
    """Average forgetting (Chaudhry et al. 2018, RWalk, their "forgetting measure"): mean over experiences j
    learned before the last row of f_j = max_{l in [j, T-1]} R[l, j] - R[T, j]. NaN rows in the max are
    skipped; NaN when T == 1. Equals the mean of the defined entries of ``forgetting_matrix(R)[T]``.

    Range of l: the rows from the one where j was (first) trained, l = j, to the one before the last, T-1.
    Rows before j was trained (l < j, and the init row) never enter the max. RWalk writes the index set as
    l in {1, ..., k-1} for j < k, and defines forgetting of a task as the gap between the most knowledge
    gained about it during past learning and the knowledge the model has now; we read "knowledge gained" as
    rows at which j had been learned (l >= j). On class-IL streams the earlier rows are near 0
    (the classes have not been trained) and the two readings agree; on domain-IL streams (permuted, rotated,
    domain_incremental) the model classifies experience j before training on it, often well (R[0, j] and
    R[l < j, j] far above chance), and counting those rows would call lost zero-shot accuracy forgetting.
    f_j may be negative (backward transfer beyond every earlier row). Unweighted: every experience counts the
    same whatever its test-set size, as in the paper."""
    R, T, _ = _check(R, first_seen)
    return _mean(forgetting_matrix(R, first_seen)[T])


def forgetting_last(R: np.ndarray, first_seen: np.ndarray | None = None) -> float:
    """First-minus-last forgetting (Avalanche's "forgetting"): mean_j (R[j, j] - R[T, j]) = ``-bwt``."""
    R, T, fs = _check(R, first_seen)
    before_last = (fs > 0) & (fs < T)
    return _mean((_just_learned(R, fs) - R[T])[before_last])


def intransigence(R: np.ndarray, joint_acc: np.ndarray, first_seen: np.ndarray | None = None) -> float:
    """Average intransigence (RWalk): mean_k (a*_k - R[k, k]).

    ``joint_acc[k]`` = a*_k is the accuracy on experience k of a reference model trained jointly on
    experiences 1..k (column order). Positive values mean the continual learner could not learn
    experience k as well as joint training.
    """
    R, T, fs = _check(R, first_seen)
    ref = _check_vec(joint_acc, R.shape[1], "joint_acc")
    return _mean(ref - _just_learned(R, fs))


def forgetting_matrix(R: np.ndarray, first_seen: np.ndarray | None = None) -> np.ndarray:
    """Forgetting at every row, shape of R: F[i, j] = max_{j <= l < i} R[l, j] - R[i, j] for experiences
    j learned strictly before row i; NaN elsewhere (NaN rows in the max are skipped)."""
    R, T, fs = _check(R, first_seen)
    F = np.full_like(R, np.nan)
    for c in np.flatnonzero(fs > 0):
        best = np.nan
        for i in range(fs[c] + 1, T + 1):
            prev = R[i - 1, c]
            best = prev if np.isnan(best) else (best if np.isnan(prev) else max(best, prev))
            if not np.isnan(best):
                F[i, c] = best - R[i, c]
    return F


def transfer_matrix(R: np.ndarray, first_seen: np.ndarray | None = None) -> np.ndarray:
    """Zero-shot transfer at every row, shape of R: X[i, j] = R[i, j] - b_j for experiences j not yet
    trained at row i (i < first_seen_j; never-trained columns at every row); NaN elsewhere.
    ``fwt`` is the mean of the entries X[j-1, j]."""
    R, T, fs = _check(R, first_seen)
    X = np.full_like(R, np.nan)
    for c in range(R.shape[1]):
        until = fs[c] if fs[c] > 0 else T + 1
        X[:until, c] = R[:until, c] - R[0, c]
    return X


def summary(
    R: np.ndarray,
    n_samples: np.ndarray | None = None,
    joint_acc: np.ndarray | None = None,
    first_seen: np.ndarray | None = None,
) -> dict[str, float]:
    """All scalar metrics as plain floats (NaN allowed).

    Keys: acc, acc_weighted and aia (the sample-weighted ones, only if ``n_samples`` is given),
    aia_unweighted, bwt, fwt, forgetting, forgetting_last, intransigence (only if ``joint_acc`` is given).
    """
    _check(R, first_seen)
    out = {"acc": acc(R, first_seen)}
    if n_samples is not None:
        out["acc_weighted"] = acc_weighted(R, n_samples, first_seen)
        out["aia"] = aia(R, n_samples, first_seen)
    out.update(
        aia_unweighted=aia_unweighted(R, first_seen),
        bwt=bwt(R, first_seen),
        fwt=fwt(R, first_seen),
        forgetting=forgetting(R, first_seen),
        forgetting_last=forgetting_last(R, first_seen),
    )
    if joint_acc is not None:
        out["intransigence"] = intransigence(R, joint_acc, first_seen)
    return out
