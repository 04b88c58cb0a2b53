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

Entries may be NaN (not evaluated). Every metric averages only its defined terms;
a term whose inputs are NaN is dropped, and a metric with no defined term is NaN
(no warnings). Metrics that need a second experience (``bwt``, ``fwt``,
``forgetting``, ``forgetting_last``) are NaN when ``T == 1``.

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
    "bwt",
    "forgetting",
    "forgetting_last",
    "forgetting_matrix",
    "fwt",
    "intransigence",
    "summary",
    "transfer_matrix",
]


def _check(R: np.ndarray) -> tuple[np.ndarray, int]:
    """Return ``R`` as a float array and ``T``; raise ValueError unless shape is (T+1, T), T >= 1."""
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[1] < 1 or R.shape[0] != R.shape[1] + 1:
        raise ValueError(
            f"R must have shape (T+1, T) with T >= 1 (row 0 = init model, row i = after "
            f"experience i; one column per experience), got shape {R.shape}"
        )
    return R, R.shape[1]


def _check_vec(v: np.ndarray, T: int, name: str) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    if v.shape != (T,):
        raise ValueError(f"{name} must be a length-T vector with T={T}, got shape {v.shape}")
    return v


def _mean(x: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
    x = np.asarray(x, dtype=float).ravel()
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _diag(R: np.ndarray) -> np.ndarray:
    """Just-learned accuracies a_{k,k} = R[k, k-1] for k = 1..T (length T)."""
    T = R.shape[1]
    return R[np.arange(1, T + 1), np.arange(T)]


def acc(R: np.ndarray) -> float:
    """Final average accuracy (GEM ACC): mean over columns of the last row ``R[T, :]``."""
    R, T = _check(R)
    return _mean(R[T])


def acc_weighted(R: np.ndarray, n_samples: np.ndarray) -> float:
    """Final accuracy weighted by test-set size: sum_j n_j R[T, j] / sum_j n_j.

    ``n_samples`` is a length-T vector of non-negative test-set sizes (column order).
    NaN entries of ``R[T]`` are dropped together with their weights.
    """
    R, T = _check(R)
    w = _check_vec(n_samples, T, "n_samples")
    if np.any(w < 0) or np.any(np.isnan(w)):
        raise ValueError("n_samples must be non-negative numbers")
    ok = ~np.isnan(R[T])
    total = w[ok].sum()
    return float((w[ok] * R[T, ok]).sum() / total) if total > 0 else float("nan")


def aia(R: np.ndarray) -> float:
    """Average incremental accuracy (iCaRL): mean_{i=1..T} of mean_{j<=i} R[i, j-1].

    Row ``i`` is averaged over the seen columns ``0..i-1`` only; the init row is not used.
    """
    R, T = _check(R)
    return _mean([_mean(R[i, :i]) for i in range(1, T + 1)])


def bwt(R: np.ndarray) -> float:
    """Backward transfer (GEM): mean_{j=1..T-1} (R[T, j-1] - R[j, j-1]).

    Negative values mean forgetting. NaN when T == 1.
    """
    R, T = _check(R)
    return _mean(R[T, : T - 1] - _diag(R)[: T - 1])


def fwt(R: np.ndarray) -> float:
    """Forward transfer (GEM): mean_{j=2..T} (a_{j-1,j} - b_j) = mean_{c=1..T-1} (R[c, c] - R[0, c]).

    Accuracy on experience j just before training on it, minus the init model's
    accuracy on it. NaN when T == 1.
    """
    R, T = _check(R)
    c = np.arange(1, T)
    return _mean(R[c, c] - R[0, c])


def forgetting(R: np.ndarray) -> float:
    """Average forgetting (RWalk): mean_{j=1..T-1} f_j.

    f_j = max_{l=j..T-1} R[l, j-1] - R[T, j-1]: best accuracy on experience j from the
    row it was learned up to the row before the last, minus the final accuracy.
    NaN rows in the max are skipped. NaN when T == 1. Equals the mean of the
    defined entries of ``forgetting_matrix(R)[T]``.
    """
    R, T = _check(R)
    terms = []
    for c in range(T - 1):
        past = R[c + 1 : T, c]  # rows l = j..T-1 for experience j = c+1
        past = past[~np.isnan(past)]
        terms.append(past.max() - R[T, c] if past.size else np.nan)
    return _mean(terms)


def forgetting_last(R: np.ndarray) -> float:
    """First-minus-last forgetting (Avalanche's "forgetting"): mean_{j=1..T-1} (R[j, j-1] - R[T, j-1]).

    This is ``-bwt(R)``. NaN when T == 1.
    """
    R, T = _check(R)
    return _mean(_diag(R)[: T - 1] - R[T, : T - 1])


def intransigence(R: np.ndarray, joint_acc: np.ndarray) -> float:
    """Average intransigence (RWalk): mean_{k=1..T} (a*_k - R[k, k-1]).

    ``joint_acc[k-1]`` = a*_k is the accuracy on experience k of a reference model
    trained jointly on experiences 1..k (column order, length T). Positive values mean
    the continual learner could not learn experience k as well as joint training.
    """
    R, T = _check(R)
    ref = _check_vec(joint_acc, T, "joint_acc")
    return _mean(ref - _diag(R))


def forgetting_matrix(R: np.ndarray) -> np.ndarray:
    """Forgetting at every row, shape (T+1, T).

    F[i, c] = max_{l=c+1..i-1} R[l, c] - R[i, c] for experience j = c+1 learned at row
    c+1 strictly before row i (i.e. c + 1 < i); NaN elsewhere. NaN rows in the max are
    skipped. ``F[T, :T-1]`` are the RWalk f_j terms used by ``forgetting``.
    """
    R, T = _check(R)
    F = np.full_like(R, np.nan)
    for c in range(T):
        for i in range(c + 2, T + 1):
            past = R[c + 1 : i, c]
            past = past[~np.isnan(past)]
            if past.size:
                F[i, c] = past.max() - R[i, c]
    return F


def transfer_matrix(R: np.ndarray) -> np.ndarray:
    """Zero-shot transfer at every row, shape (T+1, T).

    X[i, c] = R[i, c] - R[0, c] for experiences not yet trained at row i (c >= i, i.e.
    j = c+1 > i); NaN elsewhere. Row 0 is R[0] - R[0] (zeros where evaluated).
    ``fwt(R)`` is the mean of the defined entries X[c, c] for c = 1..T-1.
    """
    R, T = _check(R)
    X = np.full_like(R, np.nan)
    for i in range(T + 1):
        X[i, i:] = R[i, i:] - R[0, i:]
    return X


def summary(
    R: np.ndarray,
    n_samples: np.ndarray | None = None,
    joint_acc: np.ndarray | None = None,
) -> dict[str, float]:
    """All scalar metrics as plain floats (NaN allowed).

    Keys: acc, acc_weighted (only if ``n_samples`` given), aia, bwt, fwt, forgetting,
    forgetting_last, intransigence (only if ``joint_acc`` given).
    """
    R, _ = _check(R)
    out = {"acc": acc(R)}
    if n_samples is not None:
        out["acc_weighted"] = acc_weighted(R, n_samples)
    out.update(
        aia=aia(R),
        bwt=bwt(R),
        fwt=fwt(R),
        forgetting=forgetting(R),
        forgetting_last=forgetting_last(R),
    )
    if joint_acc is not None:
        out["intransigence"] = intransigence(R, joint_acc)
    return out
