"""mil.metrics: hand-computed cases, brute-force references and scikit-learn / SciPy cross-checks."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
)

from extract.errors import ConfigError
from mil.metrics import (
    binary_metrics,
    bootstrap_ci,
    concordance_index,
    kaplan_meier,
    logrank_test,
    multiclass_metrics,
    summarize_folds,
    youden_threshold,
)

# ------------------------------------------------------------------------------------------
# Youden threshold
# ------------------------------------------------------------------------------------------


def _youden_brute(y, s):
    """Every candidate (distinct scores and +inf), J as exact fractions, highest on ties."""
    best_j, best_t = None, None
    for t in sorted(set(s.tolist()) | {math.inf}, reverse=True):
        pred = s >= t
        j = Fraction(int(np.sum(pred & (y == 1))), int(np.sum(y == 1))) - Fraction(
            int(np.sum(pred & (y == 0))), int(np.sum(y == 0))
        )
        if best_j is None or j > best_j:
            best_j, best_t = j, t
    return best_t


def test_youden_threshold_hand_example():
    y = np.array([0, 0, 1, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.65, 0.9])
    # t=0.65: tp=2/3, fp=1/3 -> J=1/3; t=0.35: tp=3/3, fp=2/3 -> J=1/3; t=0.9: 1/3 - 0 = 1/3;
    # all tie at 1/3 -> the highest threshold wins.
    assert youden_threshold(y, s) == 0.9
    # perfect separation: the lowest positive score
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.8]) == 0.7


def test_youden_threshold_matches_brute_force_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(4, 40))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.integers(0, 6, n) / 5.0  # heavy ties
        assert youden_threshold(y, s) == _youden_brute(y, s)


def test_youden_threshold_uninformative_score_gives_inf():
    assert youden_threshold([1, 1, 0, 0], [0.1, 0.2, 0.7, 0.8]) == math.inf
    assert youden_threshold([1, 0], [0.5, 0.5]) == math.inf


def test_youden_threshold_needs_both_classes():
    with pytest.raises(ConfigError, match="The 'y_true' parameter of youden_threshold must be"):
        youden_threshold([1, 1, 1], [0.1, 0.2, 0.3])


# ------------------------------------------------------------------------------------------
# binary metrics
# ------------------------------------------------------------------------------------------


def test_binary_metrics_hand_example():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.05])
    m = binary_metrics(y, p, 0.5)
    # pred positive: 0.9, 0.6, 0.7 -> tp=2 fn=1 fp=1 tn=3
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert (m["n"], m["n_pos"], m["n_neg"], m["threshold"], m["auc_defined"]) == (7, 3, 4, 0.5, True)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p >= 0.5))
    assert m["f1"] == pytest.approx(f1_score(y, p >= 0.5))


@pytest.mark.parametrize("tied", [False, True])
def test_auc_equals_sklearn_and_the_pair_count_with_ties(tied):
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(2, 40))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        p = rng.integers(0, 4, n) / 3 if tied else rng.random(n)
        pos, neg = p[y == 1], p[y == 0]
        pairs = Fraction(int(np.sum(pos[:, None] > neg[None, :])) * 2 + int(np.sum(pos[:, None] == neg[None, :])),
                         2 * len(pos) * len(neg))
        auc = binary_metrics(y, p, 0.5)["auc"]
        assert auc == float(pairs) and auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert binary_metrics([0, 1, 0, 1], [0.2, 0.2, 0.2, 0.2], 0.5)["auc"] == 0.5


def test_binary_metrics_threshold_is_inclusive():
    assert binary_metrics([1, 0], [0.5, 0.4], 0.5)["sensitivity"] == 1.0
    assert binary_metrics([1, 0], [0.5, 0.4], math.inf)["sensitivity"] == 0.0


def test_binary_metrics_single_class_flags_auc_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = binary_metrics([0, 0, 0], [0.1, 0.6, 0.3], 0.5)
    assert math.isnan(m["auc"]) and m["auc_defined"] is False
    assert math.isnan(m["sensitivity"]) and m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)  # mean recall over present classes
    m = binary_metrics([0, 0], [0.1, 0.2], 0.5)
    assert math.isnan(m["f1"])  # no positive in truth nor prediction: undefined, not 0


def test_binary_metrics_validation_messages():
    with pytest.raises(ConfigError, match=r"The 'y_true' parameter of binary_metrics must be a 1-D array of 0/1 labels\. Got values \[2\.0\] instead\."):
        binary_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ConfigError, match="must have the same length"):
        binary_metrics([0, 1], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(ConfigError, match="The 'prob_pos' parameter"):
        binary_metrics([0, 1], [0.1, np.nan], 0.5)
    with pytest.raises(ConfigError, match="The 'threshold' parameter"):
        binary_metrics([0, 1], [0.1, 0.2], float("nan"))


# ------------------------------------------------------------------------------------------
# multi-class metrics
# ------------------------------------------------------------------------------------------


def _softmax(z):
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 80)
    prob = _softmax(rng.normal(size=(80, 4)) + 1.5 * np.eye(4)[y])
    pred = prob.argmax(1)
    m = multiclass_metrics(y, prob)
    assert m["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["kappa_quadratic"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["auc_classes_skipped"] == [] and m["n"] == 80 and m["n_classes"] == 4
    assert sum(m["class_counts"]) == 80


def test_multiclass_metrics_absent_class_is_skipped_and_reported():
    y = np.array([0, 0, 1, 1, 0, 1])
    prob = np.array(
        [[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6], [0.6, 0.3, 0.1], [0.3, 0.5, 0.2]]
    )
    m = multiclass_metrics(y, prob)
    assert m["auc_classes_skipped"] == [2]
    assert math.isnan(m["auc_per_class"][2])
    expected = np.mean([roc_auc_score(y == 0, prob[:, 0]), roc_auc_score(y == 1, prob[:, 1])])
    assert m["auc"] == pytest.approx(expected)
    pred = prob.argmax(1)  # class 2 is predicted once: it counts in macro F1 (sklearn's labels)
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)  # recalls of classes 0, 1


def test_multiclass_metrics_validation():
    with pytest.raises(ConfigError, match=r"integer class indices in \[0, 2\]"):
        multiclass_metrics([0, 3], np.full((2, 3), 1 / 3))
    with pytest.raises(ConfigError, match="The 'prob' parameter of multiclass_metrics"):
        multiclass_metrics([0, 1], [0.2, 0.8])


# ------------------------------------------------------------------------------------------
# bootstrap and fold summaries
# ------------------------------------------------------------------------------------------


def _auc(y, p):
    return binary_metrics(y, p, 0.5)["auc"]


def test_bootstrap_ci_reproducible_and_brackets_estimate():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 60)
    p = np.clip(0.35 * y + rng.normal(0.3, 0.2, 120), 0, 1)
    low, high = bootstrap_ci(_auc, y, p, n_boot=200, seed=7)
    assert low < _auc(y, p) < high and 0 <= low and high <= 1
    assert bootstrap_ci(_auc, y, p, n_boot=200, seed=7) == (low, high)
    assert bootstrap_ci(_auc, y, p, n_boot=200, seed=8) != (low, high)


def test_bootstrap_ci_stratified_keeps_class_counts():
    y = np.array([0] * 9 + [1] * 3)
    p = np.linspace(0, 1, 12)
    assert bootstrap_ci(lambda yy, pp: float(yy.sum()), y, p, n_boot=50) == (3.0, 3.0)
    low, high = bootstrap_ci(lambda yy, pp: float(yy.sum()), y, p, n_boot=200, stratified=False)
    assert low < 3 < high


def test_bootstrap_ci_skips_degenerate_resamples():
    y = np.array([0, 0, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.9])
    # unstratified: many replicates lose the positive (AUC NaN) and are skipped, not fatal
    low, high = bootstrap_ci(_auc, y, p, n_boot=100, stratified=False)
    assert (low, high) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci(lambda a: float("nan"), y, n_boot=5))


def test_bootstrap_ci_dict_metric_gives_one_interval_per_key():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 30)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 60), 0, 1)
    ci = bootstrap_ci(lambda a, b: binary_metrics(a, b, 0.5), y, p, n_boot=100)
    assert {"auc", "accuracy", "f1", "balanced_accuracy"} <= set(ci)
    assert "auc_defined" not in ci
    assert ci["n_pos"] == (30.0, 30.0)
    assert ci["auc"] == bootstrap_ci(_auc, y, p, n_boot=100)


def test_bootstrap_ci_survival_strata():
    rng = np.random.default_rng(4)
    time = rng.uniform(1, 100, 50)
    event = rng.integers(0, 2, 50)
    risk = -time + rng.normal(0, 30, 50)
    with pytest.raises(ConfigError, match="strata=event"):
        bootstrap_ci(concordance_index, time, event, risk, n_boot=10)
    low, high = bootstrap_ci(concordance_index, time, event, risk, n_boot=100, strata=event)
    assert low < concordance_index(time, event, risk) < high


def test_bootstrap_ci_validation():
    with pytest.raises(ConfigError, match="The 'n_boot' parameter of bootstrap_ci must be an int >= 1"):
        bootstrap_ci(_auc, [0, 1], [0.1, 0.2], n_boot=0)
    with pytest.raises(ConfigError, match="The 'alpha' parameter"):
        bootstrap_ci(_auc, [0, 1], [0.1, 0.2], alpha=1.5)
    with pytest.raises(ConfigError, match="same length"):
        bootstrap_ci(_auc, [0, 1], [0.1, 0.2, 0.3])


def test_summarize_folds_nan_aware_sample_std():
    folds = [
        {"auc": 0.9, "f1": 0.8, "auc_defined": True, "note": "x"},
        {"auc": 0.8, "f1": float("nan"), "auc_defined": True},
        {"auc": 0.7, "f1": 0.6, "auc_defined": False, "extra": 1.0},
    ]
    mean, std = summarize_folds(folds)
    assert set(mean) == set(std) == {"auc", "f1", "extra"}
    assert mean["auc"] == pytest.approx(0.8) and std["auc"] == pytest.approx(0.1)  # ddof=1
    assert mean["f1"] == pytest.approx(0.7) and std["f1"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert mean["extra"] == 1.0 and math.isnan(std["extra"])
    with pytest.raises(ConfigError, match="fold_metrics"):
        summarize_folds([])


# ------------------------------------------------------------------------------------------
# concordance index
# ------------------------------------------------------------------------------------------


def _cindex_brute(time, event, risk):
    """Harrell's C by the definition: a double loop over ordered pairs (i, j)."""
    num = den = 0.0
    for i in range(len(time)):
        if not event[i]:
            continue
        for j in range(len(time)):
            if i == j:
                continue
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                den += 1
                if risk[i] > risk[j]:
                    num += 1
                elif risk[i] == risk[j]:
                    num += 0.5
    return num / den if den else float("nan")


def test_concordance_index_hand_example():
    time = [1, 2, 2, 3]
    event = [1, 1, 0, 1]
    risk = [4, 3, 3, 1]
    # comparable: (0,1) (0,2) (0,3) concordant; (1,2) same time, 2 censored: risk tie -> 0.5;
    # (1,3) concordant. C = 4.5 / 5
    assert concordance_index(time, event, risk) == pytest.approx(0.9)
    # two events at the same time are not comparable
    assert math.isnan(concordance_index([2, 2], [1, 1], [1, 2]))
    assert math.isnan(concordance_index([1, 2, 3], [0, 0, 0], [3, 2, 1]))


def test_concordance_index_matches_brute_force_with_ties():
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        time = rng.integers(0, 8, n).astype(float)  # many time ties
        event = rng.integers(0, 2, n)
        risk = rng.integers(0, 5, n).astype(float)  # many risk ties
        assert concordance_index(time, event, risk) == pytest.approx(_cindex_brute(time, event, risk))


def test_concordance_index_orientation_and_blocks(monkeypatch):
    rng = np.random.default_rng(6)
    time = rng.uniform(0, 10, 300)
    event = np.ones(300, dtype=int)
    assert concordance_index(time, event, -time) == 1.0
    assert concordance_index(time, event, time) == 0.0
    assert concordance_index(time, event, np.zeros(300)) == 0.5
    event = rng.integers(0, 2, 300)
    risk = rng.normal(size=300)
    whole = concordance_index(time, event, risk)
    import mil.metrics as metrics

    monkeypatch.setattr(metrics, "_PAIR_BLOCK", 1000)  # many small blocks, same answer
    assert concordance_index(time, event, risk) == whole


def test_concordance_index_validation():
    with pytest.raises(ConfigError, match="The 'event' parameter of concordance_index"):
        concordance_index([1, 2], [1, 2], [0.1, 0.2])
    with pytest.raises(ConfigError, match="The 'time' parameter of concordance_index must be a 1-D array of finite times >= 0"):
        concordance_index([-1, 2], [1, 0], [0.1, 0.2])


# ------------------------------------------------------------------------------------------
# Kaplan-Meier and log-rank
# ------------------------------------------------------------------------------------------

# group a: events at 3, 5, 8 and one censored at 5; group b: events at 4, 5, 9, censored 6, 10
TIME_A, EVENT_A = [3, 5, 5, 8], [1, 1, 0, 1]
TIME_B, EVENT_B = [4, 5, 6, 9, 10], [1, 1, 0, 1, 0]


def test_kaplan_meier_hand_example():
    times, surv = kaplan_meier(TIME_A, EVENT_A)
    # t=3: 4 at risk, 1 event -> 3/4; t=5: 3 at risk (the censored 5 still counts), 1 event
    # -> 3/4 * 2/3; t=8: 1 at risk, 1 event -> 0
    np.testing.assert_allclose(times, [3, 5, 8])
    np.testing.assert_allclose(surv, [0.75, 0.5, 0.0])
    times, surv = kaplan_meier(TIME_B, EVENT_B)
    np.testing.assert_allclose(times, [4, 5, 9])
    np.testing.assert_allclose(surv, [0.8, 0.6, 0.3])
    times, surv = kaplan_meier([1, 2], [0, 0])
    assert times.shape == surv.shape == (0,)


def test_kaplan_meier_matches_scipy():
    rng = np.random.default_rng(8)
    time = rng.integers(1, 15, 40).astype(float)
    event = rng.integers(0, 2, 40)
    times, surv = kaplan_meier(time, event)
    data = stats.CensoredData(uncensored=time[event == 1], right=time[event == 0])
    np.testing.assert_allclose(surv, stats.ecdf(data).sf.evaluate(times))


def test_logrank_hand_example():
    # pooled event times with (n at risk, n at risk in a, events, events in a), by hand:
    table = [
        (9, 4, 1, 1),  # t=3
        (8, 3, 1, 0),  # t=4
        (7, 3, 2, 1),  # t=5: events in both groups; a's censored 5 still at risk
        (3, 1, 1, 1),  # t=8
        (2, 0, 1, 0),  # t=9
    ]
    observed = sum(Fraction(da) for _, _, _, da in table)
    expected = sum(Fraction(d * na, n) for n, na, d, _ in table)
    variance = sum(
        Fraction(d * na * (n - na) * (n - d), n * n * (n - 1)) for n, na, d, _ in table
    )
    stat_hand = float((observed - expected) ** 2 / variance)  # = 0.8818...
    stat, p = logrank_test(TIME_A, EVENT_A, TIME_B, EVENT_B)
    assert stat == pytest.approx(stat_hand, rel=1e-12)
    assert stat == pytest.approx(0.88179, abs=1e-4)
    assert p == pytest.approx(stats.chi2.sf(stat_hand, 1))
    # symmetric in the groups
    assert logrank_test(TIME_B, EVENT_B, TIME_A, EVENT_A)[0] == pytest.approx(stat)


def test_logrank_matches_scipy_and_degenerate_case():
    rng = np.random.default_rng(9)
    ta, tb = rng.integers(1, 20, 30).astype(float), rng.integers(3, 25, 25).astype(float)
    ea, eb = rng.integers(0, 2, 30), rng.integers(0, 2, 25)
    stat, p = logrank_test(ta, ea, tb, eb)
    ref = stats.logrank(
        stats.CensoredData(uncensored=ta[ea == 1], right=ta[ea == 0]),
        stats.CensoredData(uncensored=tb[eb == 1], right=tb[eb == 0]),
    )
    assert stat == pytest.approx(ref.statistic**2)
    assert p == pytest.approx(ref.pvalue)
    assert all(math.isnan(v) for v in logrank_test([1, 2], [0, 0], [3], [0]))
