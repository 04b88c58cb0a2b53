"""Tests for cltoolbox.metrics against hand-computed accuracy matrices."""

import math
import warnings

import numpy as np
import pytest

from cltoolbox import metrics as M

NAN = np.nan

# T = 3. Row 0 = init model, row i = after experience i; column c = experience c+1.
# Just-learned accuracies a_{k,k} = R[k, k-1]: 0.8, 0.7, 0.9.
R3 = np.array(
    [
        [0.1, 0.2, 0.3],  # init: b = (0.1, 0.2, 0.3)
        [0.8, 0.3, 0.4],  # after exp 1
        [0.9, 0.7, 0.5],  # after exp 2 (exp 1 improves to 0.9)
        [0.6, 0.4, 0.9],  # after exp 3 (final)
    ]
)
N3 = np.array([100, 200, 100])
JOINT3 = np.array([0.85, 0.8, 0.9])


@pytest.fixture(autouse=True)
def _no_runtime_warnings():
    # NaN handling must not emit "Mean of empty slice" and the like.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def test_acc():
    # (0.6 + 0.4 + 0.9) / 3 = 1.9 / 3
    assert M.acc(R3) == pytest.approx(1.9 / 3)


def test_acc_weighted():
    # (100*0.6 + 200*0.4 + 100*0.9) / 400 = (60 + 80 + 90) / 400 = 0.575
    assert M.acc_weighted(R3, N3) == pytest.approx(0.575)
    # equal weights reduce to acc
    assert M.acc_weighted(R3, [5, 5, 5]) == pytest.approx(M.acc(R3))


def test_aia():
    # sample-weighted (N3 = 100, 200, 100): row1: 0.8; row2: (90 + 140) / 300; row3: 230 / 400 = 0.575
    assert M.aia(R3, N3) == pytest.approx((0.8 + 230 / 300 + 0.575) / 3)
    assert M.aia(R3, [7, 7, 7]) == pytest.approx(M.aia_unweighted(R3))  # equal sizes: the plain mean


def test_aia_unweighted():
    # row1: 0.8; row2: (0.9 + 0.7)/2 = 0.8; row3: 1.9/3  ->  (0.8 + 0.8 + 19/30) / 3 = 67/90
    assert M.aia_unweighted(R3) == pytest.approx(67 / 90)


def test_bwt():
    # j=1: R[3,0] - R[1,0] = 0.6 - 0.8 = -0.2; j=2: R[3,1] - R[2,1] = 0.4 - 0.7 = -0.3  -> -0.25
    assert M.bwt(R3) == pytest.approx(-0.25)


def test_fwt():
    # j=2: R[1,1] - b_2 = 0.3 - 0.2 = 0.1; j=3: R[2,2] - b_3 = 0.5 - 0.3 = 0.2  -> 0.15
    assert M.fwt(R3) == pytest.approx(0.15)


def test_forgetting():
    # j=1: max(R[1,0], R[2,0]) - R[3,0] = 0.9 - 0.6 = 0.3; j=2: R[2,1] - R[3,1] = 0.7 - 0.4 = 0.3  -> 0.3
    assert M.forgetting(R3) == pytest.approx(0.3)


def test_forgetting_last():
    # j=1: 0.8 - 0.6 = 0.2; j=2: 0.7 - 0.4 = 0.3  -> 0.25 (= -bwt)
    assert M.forgetting_last(R3) == pytest.approx(0.25)
    assert M.forgetting_last(R3) == pytest.approx(-M.bwt(R3))


def test_intransigence():
    # k=1: 0.85 - 0.8 = 0.05; k=2: 0.8 - 0.7 = 0.1; k=3: 0.9 - 0.9 = 0  -> 0.05
    assert M.intransigence(R3, JOINT3) == pytest.approx(0.05)


def test_forgetting_matrix():
    # exp 1 (col 0, learned row 1): F[2,0] = 0.8 - 0.9 = -0.1; F[3,0] = max(0.8, 0.9) - 0.6 = 0.3
    # exp 2 (col 1, learned row 2): F[3,1] = 0.7 - 0.4 = 0.3;  exp 3 (col 2): never defined
    expected = np.array(
        [
            [NAN, NAN, NAN],
            [NAN, NAN, NAN],
            [-0.1, NAN, NAN],
            [0.3, 0.3, NAN],
        ]
    )
    np.testing.assert_allclose(M.forgetting_matrix(R3), expected, equal_nan=True)


def test_transfer_matrix():
    # row 0: R[0] - R[0] = 0; row 1: cols 1,2: 0.3-0.2 = 0.1, 0.4-0.3 = 0.1; row 2: col 2: 0.5-0.3 = 0.2
    expected = np.array(
        [
            [0.0, 0.0, 0.0],
            [NAN, 0.1, 0.1],
            [NAN, NAN, 0.2],
            [NAN, NAN, NAN],
        ]
    )
    np.testing.assert_allclose(M.transfer_matrix(R3), expected, equal_nan=True, atol=1e-12)


def test_summary():
    s = M.summary(R3, n_samples=N3, joint_acc=JOINT3)
    assert set(s) == {
        "acc",
        "acc_weighted",
        "aia",
        "aia_unweighted",
        "bwt",
        "fwt",
        "forgetting",
        "forgetting_last",
        "intransigence",
    }
    assert all(type(v) is float for v in s.values())
    assert s["acc"] == pytest.approx(1.9 / 3)
    assert s["acc_weighted"] == pytest.approx(0.575)
    assert s["aia"] == pytest.approx((0.8 + 230 / 300 + 0.575) / 3)
    assert s["aia_unweighted"] == pytest.approx(67 / 90)
    assert s["bwt"] == pytest.approx(-0.25)
    assert s["fwt"] == pytest.approx(0.15)
    assert s["forgetting"] == pytest.approx(0.3)
    assert s["forgetting_last"] == pytest.approx(0.25)
    assert s["intransigence"] == pytest.approx(0.05)
    # optional keys are absent without their inputs
    # without test-set sizes there is no sample-weighted metric (never the unweighted one under its name)
    assert set(M.summary(R3)) == {"acc", "aia_unweighted", "bwt", "fwt", "forgetting", "forgetting_last"}


def test_accepts_lists():
    assert M.bwt(R3.tolist()) == pytest.approx(-0.25)


# --- T = 1 ---------------------------------------------------------------------------

R1 = np.array([[0.1], [0.7]])  # init 0.1, after the only experience 0.7


def test_single_experience():
    assert M.acc(R1) == pytest.approx(0.7)
    assert M.acc_weighted(R1, [10]) == pytest.approx(0.7)
    assert M.aia(R1, [10]) == pytest.approx(0.7)
    assert M.aia_unweighted(R1) == pytest.approx(0.7)
    for f in (M.bwt, M.fwt, M.forgetting, M.forgetting_last):
        assert math.isnan(f(R1))
    # 0.8 - 0.7
    assert M.intransigence(R1, [0.8]) == pytest.approx(0.1)
    assert np.isnan(M.forgetting_matrix(R1)).all()
    np.testing.assert_allclose(M.transfer_matrix(R1), [[0.0], [NAN]], equal_nan=True)
    s = M.summary(R1)
    assert s["acc"] == pytest.approx(0.7)
    assert math.isnan(s["bwt"]) and math.isnan(s["fwt"]) and math.isnan(s["forgetting"])


# --- NaN entries (not evaluated) -------------------------------------------------------


def test_nan_final_entry_is_dropped():
    R = R3.copy()
    R[3, 1] = NAN  # final accuracy on exp 2 missing
    # acc: (0.6 + 0.9) / 2 = 0.75; weighted: (60 + 90) / 200 = 0.75
    assert M.acc(R) == pytest.approx(0.75)
    assert M.acc_weighted(R, N3) == pytest.approx(0.75)
    # aia_unweighted: (0.8 + 0.8 + 0.75) / 3 = 2.35 / 3; aia: row 3 = (60 + 90) / 200, its weight dropped too
    assert M.aia_unweighted(R) == pytest.approx(2.35 / 3)
    assert M.aia(R, N3) == pytest.approx((0.8 + 230 / 300 + 0.75) / 3)
    # only j=1 remains: bwt = -0.2, forgetting_last = 0.2, forgetting = 0.9 - 0.6 = 0.3
    assert M.bwt(R) == pytest.approx(-0.2)
    assert M.forgetting_last(R) == pytest.approx(0.2)
    assert M.forgetting(R) == pytest.approx(0.3)
    assert math.isnan(M.forgetting_matrix(R)[3, 1])


def test_nan_inside_max_is_skipped():
    R = R3.copy()
    R[1, 0] = NAN  # exp 1 not evaluated right after training on it
    # forgetting j=1: max(0.9) - 0.6 = 0.3; j=2: 0.3  -> 0.3
    assert M.forgetting(R) == pytest.approx(0.3)
    # forgetting_last/bwt lose j=1: only j=2 (0.3)
    assert M.forgetting_last(R) == pytest.approx(0.3)
    assert M.bwt(R) == pytest.approx(-0.3)
    # intransigence loses k=1: (0.1 + 0) / 2 = 0.05
    assert M.intransigence(R, JOINT3) == pytest.approx(0.05)
    # F[2,0] has no earlier defined row -> NaN; F[3,0] = 0.9 - 0.6
    F = M.forgetting_matrix(R)
    assert math.isnan(F[2, 0])
    assert F[3, 0] == pytest.approx(0.3)


def test_nan_init_row():
    R = R3.copy()
    R[0, 1] = NAN  # b_2 unknown -> only j=3 contributes to fwt: 0.2
    assert M.fwt(R) == pytest.approx(0.2)
    R[0, 2] = NAN
    assert math.isnan(M.fwt(R))


def test_all_nan_is_nan_without_warning():
    R = np.full((4, 3), NAN)
    for f in (M.acc, M.aia_unweighted, M.bwt, M.fwt, M.forgetting, M.forgetting_last):
        assert math.isnan(f(R))
    assert math.isnan(M.acc_weighted(R, N3))
    assert math.isnan(M.aia(R, N3))
    assert math.isnan(M.intransigence(R, JOINT3))


def test_zero_weights_give_nan():
    assert math.isnan(M.acc_weighted(R3, [0, 0, 0]))


# --- consistency -----------------------------------------------------------------------


def _random_matrices():
    rng = np.random.default_rng(0)
    mats = [R3]
    for T in range(1, 7):
        for _ in range(5):
            R = rng.uniform(size=(T + 1, T))
            R[rng.uniform(size=R.shape) < 0.15] = NAN
            mats.append(R)
    return mats


def _nanmean_or_nan(x):
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


@pytest.mark.parametrize("R", _random_matrices())
def test_forgetting_matches_last_row_of_matrix(R):
    T = R.shape[1]
    got, want = M.forgetting(R), _nanmean_or_nan(M.forgetting_matrix(R)[T])
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


@pytest.mark.parametrize("R", _random_matrices())
def test_fwt_matches_transfer_matrix(R):
    T = R.shape[1]
    X = M.transfer_matrix(R)
    c = np.arange(1, T)
    got, want = M.fwt(R), _nanmean_or_nan(X[c, c])  # X[j-1, j] in 1-based terms
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 3), (2, 3), (4,), (1, 0), (2, 2, 1), (0, 0)])
def test_bad_shape_raises(shape):
    with pytest.raises(ValueError, match=r"\(T\+1, T\)"):
        M.acc(np.zeros(shape))


def test_bad_vectors_raise():
    with pytest.raises(ValueError, match="n_samples"):
        M.acc_weighted(R3, [1, 2])
    with pytest.raises(ValueError, match="n_samples"):
        M.acc_weighted(R3, [1, -2, 3])
    with pytest.raises(ValueError, match="joint_acc"):
        M.intransigence(R3, [0.5])
    with pytest.raises(ValueError, match="joint_acc"):
        M.summary(R3, joint_acc=[0.5, 0.5])


def test_recurring_stream_with_first_seen():
    # 3 training experiences over 2 distinct tasks with schedule A, B, A: first_seen = (1, 2)
    R = np.array([
        [0.10, 0.20],  # init
        [0.90, 0.30],  # after A
        [0.50, 0.80],  # after B
        [0.95, 0.60],  # after A again
    ])
    fs = [1, 2]
    assert M.acc(R, fs) == pytest.approx(0.775)
    assert M.aia_unweighted(R, fs) == pytest.approx((0.9 + 0.65 + 0.775) / 3)
    assert M.aia(R, [300, 100], fs) == pytest.approx((0.9 + (150 + 80) / 400 + (285 + 60) / 400) / 3)
    assert M.bwt(R, fs) == pytest.approx(((0.95 - 0.9) + (0.6 - 0.8)) / 2)
    assert M.fwt(R, fs) == pytest.approx(0.3 - 0.2)  # only B has a row before its first training
    assert M.forgetting(R, fs) == pytest.approx(((0.9 - 0.95) + (0.8 - 0.6)) / 2)
    assert M.forgetting_last(R, fs) == pytest.approx(-M.bwt(R, fs))
    F = M.forgetting_matrix(R, fs)
    assert F[2, 0] == pytest.approx(0.4) and F[3, 0] == pytest.approx(-0.05) and F[3, 1] == pytest.approx(0.2)
    assert np.isnan(F[:2]).all() and np.isnan(F[2, 1])
    X = M.transfer_matrix(R, fs)
    assert X[0, 0] == 0 and X[1, 1] == pytest.approx(0.1) and np.isnan(X[1:, 0]).all() and np.isnan(X[2:, 1]).all()
    assert M.summary(R, first_seen=fs)["forgetting"] == pytest.approx(0.075)


def test_first_seen_default_is_the_standard_definition():
    rng = np.random.default_rng(0)
    R = rng.uniform(size=(5, 4))
    fs = [1, 2, 3, 4]
    for name in ("acc", "aia_unweighted", "bwt", "fwt", "forgetting", "forgetting_last"):
        assert getattr(M, name)(R, fs) == pytest.approx(getattr(M, name)(R))
    assert M.aia(R, [1, 2, 3, 4], fs) == pytest.approx(M.aia(R, [1, 2, 3, 4]))
    np.testing.assert_allclose(M.forgetting_matrix(R, fs), M.forgetting_matrix(R))


def test_never_trained_task_counts_as_future_everywhere():
    R = np.array([[0.1, 0.2], [0.9, 0.25], [0.8, 0.3]])
    fs = [1, 0]  # task 1 never trained
    assert M.bwt(R, fs) == pytest.approx(0.8 - 0.9)
    assert np.isnan(M.fwt(R, fs))
    np.testing.assert_allclose(M.transfer_matrix(R, fs)[:, 1], [0.0, 0.05, 0.1])
    with pytest.raises(ValueError, match="first_seen"):
        M.acc(R, [1, 3])


# --- a hand-made stream with unequal experience sizes: every metric against its source ---------------
# 6 base classes, then one class per step (T = 5); 100 test samples per class, so the experiences' test sets
# hold 600, 100, 100, 100, 100 samples. CORRECT[i][c]: correct test samples of class c after step i (row 0:
# the untrained model; classes not trained yet are never predicted in class-IL).
SIZES = [600, 100, 100, 100, 100]
CLASSES = [[0, 1, 2, 3, 4, 5], [6], [7], [8], [9]]
CORRECT = np.array([
    [10, 9, 11, 8, 10, 12, 0, 0, 0, 0],
    [95, 92, 90, 97, 93, 91, 0, 0, 0, 0],
    [80, 75, 82, 70, 78, 74, 88, 0, 0, 0],
    [71, 66, 75, 60, 70, 65, 52, 90, 0, 0],
    [65, 60, 70, 55, 62, 60, 40, 55, 93, 0],
    [60, 52, 66, 50, 58, 55, 35, 45, 60, 96],
])
JOINT_UNEQUAL = np.array([0.97, 0.9, 0.93, 0.95, 0.96])


def _unequal_matrix() -> np.ndarray:
    return np.array([[CORRECT[i, cs].sum() / (100 * len(cs)) for cs in CLASSES] for i in range(6)])


def test_every_metric_matches_its_source_on_a_stream_with_unequal_experiences():
    R, T, n = _unequal_matrix(), 5, np.array(SIZES)
    a = lambda i, j: R[i, j - 1]  # noqa: E731  (the papers' 1-based a_{i,j}; row 0 = b)
    # Rebuffi et al. 2017: after each step, accuracy on all test samples of the classes seen so far
    per_step = [CORRECT[i, :sum(len(c) for c in CLASSES[:i])].sum() / (100 * sum(len(c) for c in CLASSES[:i]))
                for i in range(1, T + 1)]
    assert M.aia(R, n) == pytest.approx(np.mean(per_step))
    # e.g. step 2: (80 + 75 + 82 + 70 + 78 + 74 + 88) / 700 = 0.781, where the per-experience mean is
    # (479 / 600 + 0.88) / 2 = 0.839
    assert per_step[1] == pytest.approx(547 / 700)
    assert M.aia(R, n) == pytest.approx(0.71938, abs=1e-5)
    assert M.aia_unweighted(R) == pytest.approx(0.73252, abs=1e-5)  # per-experience averaging: another number
    # accuracy on every test sample after the last step (sample-weighted)
    assert M.acc_weighted(R, n) == pytest.approx(CORRECT[T].sum() / 1000)
    # GEM (Lopez-Paz & Ranzato 2017): ACC = 1/T sum_i R_{T,i}; BWT = 1/(T-1) sum_{i<T} R_{T,i} - R_{i,i};
    # FWT = 1/(T-1) sum_{i>=2} R_{i-1,i} - b_i: sums over tasks, each task once
    assert M.acc(R) == pytest.approx(sum(a(T, i) for i in range(1, T + 1)) / T)
    assert M.bwt(R) == pytest.approx(sum(a(T, i) - a(i, i) for i in range(1, T)) / (T - 1))
    assert M.fwt(R) == pytest.approx(sum(a(i - 1, i) - a(0, i) for i in range(2, T + 1)) / (T - 1))
    # RWalk (Chaudhry et al. 2018): f_j = max over the rows since j was learned of a_{l,j} - a_{T,j}, mean
    # over j < T; I_k = a*_k - a_{k,k}, mean over k
    f = [max(a(row, j) for row in range(j, T)) - a(T, j) for j in range(1, T)]
    assert M.forgetting(R) == pytest.approx(np.mean(f))
    assert M.forgetting_last(R) == pytest.approx(np.mean([a(j, j) - a(T, j) for j in range(1, T)]))
    assert M.intransigence(R, JOINT_UNEQUAL) == pytest.approx(np.mean([JOINT_UNEQUAL[k - 1] - a(k, k)
                                                                        for k in range(1, T + 1)]))
    s = M.summary(R, n_samples=n)
    assert s["aia"] == M.aia(R, n) and s["aia_unweighted"] == M.aia_unweighted(R)


def test_forgetting_runs_over_the_rows_since_the_experience_was_learned():
    # class-IL: before an experience is trained its classes are never predicted (rows l < j are ~0)
    R_class = np.array([
        [0.00, 0.00, 0.00],
        [0.95, 0.00, 0.00],
        [0.70, 0.96, 0.00],
        [0.60, 0.80, 0.97],
    ])
    assert M.forgetting(R_class) == pytest.approx(((0.95 - 0.60) + (0.96 - 0.80)) / 2)
    # domain-IL (e.g. permuted digits, same classes every experience): the model classifies experience j well
    # before training on it: init row 0.6, and experience 2 at 0.98 after experience 1 (zero-shot), above its
    # 0.93 once learned. Those rows are not knowledge gained about j: they stay out of the max.
    R_domain = np.array([
        [0.60, 0.60, 0.60],
        [0.95, 0.98, 0.70],
        [0.90, 0.93, 0.75],
        [0.85, 0.90, 0.97],
    ])
    assert M.forgetting(R_domain) == pytest.approx(((0.95 - 0.85) + (0.93 - 0.90)) / 2)
    literal = np.mean([max(R_domain[:3, j]) - R_domain[3, j] for j in range(2)])  # over every row l < T
    assert M.forgetting(R_domain) != pytest.approx(literal)
    F = M.forgetting_matrix(R_domain)
    assert F[3, 1] == pytest.approx(0.03) and np.isnan(F[1, 1])  # row 1 is before experience 2 was learned
