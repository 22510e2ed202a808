"""Evaluation metrics: classification, bootstrap intervals, fold summaries and survival.

Pure functions: arrays in, numbers out; no files, no prints. Every metric is written here so
that its conventions (ties, undefined cases) are ours, documented and tested; the ROC AUC is
scikit-learn's ``roc_auc_score`` (the reference the tests compare it with) computed as the
Mann-Whitney statistic, because a bootstrap calls it a thousand times per fold and sklearn's
input checks cost milliseconds per call.

Undefined values are NaN, never a crash and never a made-up number: AUC on a single class, F1
with no positive in truth or prediction, the C-index without comparable pairs. Fold summaries
and bootstrap intervals skip NaN. Invalid inputs (wrong shapes, labels outside the classes,
non-finite scores) raise :class:`~extract.errors.ConfigError` with the message
``"The 'x' parameter of f must be ... Got ... instead."``.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from extract.errors import ConfigError
from extract.runtime import is_number

__all__ = [
    "youden_threshold",
    "binary_metrics",
    "multiclass_metrics",
    "bootstrap_ci",
    "summarize_folds",
    "concordance_index",
    "kaplan_meier",
    "logrank_test",
]

logger = logging.getLogger(__name__)

#: Most groups a stratified bootstrap accepts before it decides that the array it stratifies on
#: holds times or scores rather than class labels.
MAX_STRATA = 50

#: Rows times columns of one block of the O(n^2) pair comparisons in :func:`concordance_index`.
_PAIR_BLOCK = 1 << 22


# --------------------------------------------------------------------------------------------
# input validation (sklearn-style messages)
# --------------------------------------------------------------------------------------------


def _fail(name: str, func: str, expected: str, got: str) -> ConfigError:
    return ConfigError(f"The '{name}' parameter of {func} must be {expected}. Got {got} instead.")


def _describe(a: np.ndarray) -> str:
    if a.ndim == 0:
        return repr(a.item())
    return f"an array of shape {a.shape} and dtype {a.dtype}"


def _numeric(x: Any, name: str, func: str, ndim: int, expected: str) -> np.ndarray:
    """``x`` as a finite float64 array with ``ndim`` dimensions, or ConfigError."""
    a = np.asarray(x)
    if a.ndim != ndim or a.dtype.kind not in "biuf":
        raise _fail(name, func, expected, _describe(a))
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise _fail(name, func, expected, f"{int(np.sum(~np.isfinite(a)))} non-finite values")
    return a


def _labels01(x: Any, name: str, func: str) -> np.ndarray:
    """``x`` as a 1-D int64 array of 0/1 labels (bools accepted)."""
    expected = "a 1-D array of 0/1 labels"
    a = _numeric(x, name, func, 1, expected)
    bad = (a != 0) & (a != 1)
    if bad.any():
        raise _fail(name, func, expected, f"values {np.unique(a[bad])[:5].tolist()}")
    return a.astype(np.int64)


def _same_length(func: str, **arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        names = ", ".join(f"'{k}'" for k in lengths)
        got = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise ConfigError(
            f"The {names} parameters of {func} must have the same length. Got {got} instead."
        )
    return next(iter(lengths.values()))


def _survival_inputs(
    time: Any, event: Any, func: str, time_name: str = "time", event_name: str = "event"
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(time float64 [n] >= 0, event int64 {0,1} [n])``."""
    t = _numeric(time, time_name, func, 1, "a 1-D array of finite times >= 0")
    if (t < 0).any():
        raise _fail(time_name, func, "a 1-D array of finite times >= 0", f"minimum {t.min()!r}")
    e = _labels01(event, event_name, func)
    _same_length(func, **{time_name: t, event_name: e})
    return t, e


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


def youden_threshold(y_true: Any, score: Any) -> float:
    """Decision threshold that maximises Youden's J = sensitivity + specificity - 1.

    Candidates are every distinct score plus ``+inf`` (predict nothing positive); a sample is
    predicted positive when ``score >= threshold``, the same rule as :func:`binary_metrics`.
    J is compared exactly (as the integer ``tp * n_neg - fp * n_pos``), so ties are real ties,
    and among tied candidates the HIGHEST threshold wins (fewest positive calls). In particular
    a score with no threshold better than chance (J <= 0 everywhere) gives ``+inf``.

    Parameters
    ----------
    y_true : array-like of {0, 1} or bool, shape [n]
        Ground truth; both classes must be present.
    score : array-like of float, shape [n]
        Positive-class probability or any score that increases with the positive class.

    Returns
    -------
    float
        The threshold, one of the observed scores or ``inf``.

    Raises
    ------
    ConfigError
        On bad shapes or values, or when ``y_true`` holds a single class (J is undefined:
        choose the threshold on a validation set with both classes).
    """
    func = "youden_threshold"
    y = _labels01(y_true, "y_true", func)
    s = _numeric(score, "score", func, 1, "a 1-D array of finite scores")
    _same_length(func, y_true=y, score=s)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise _fail(
            "y_true", func, "labels with both classes present (Youden's J needs sensitivity "
            "and specificity)", f"{len(y)} samples all of class {int(y[0]) if len(y) else 'none'}"
        )
    candidates = np.unique(s)[::-1]  # descending distinct scores
    pos_sorted = np.sort(s[y == 1])
    neg_sorted = np.sort(s[y == 0])
    # samples with score >= t, per candidate t
    tp = n_pos - np.searchsorted(pos_sorted, candidates, side="left")
    fp = n_neg - np.searchsorted(neg_sorted, candidates, side="left")
    j_scaled = np.concatenate([[0], tp * n_neg - fp * n_pos])  # candidate +inf first: tp=fp=0
    thresholds = np.concatenate([[np.inf], candidates])
    # argmax returns the first maximum = the highest threshold among ties
    return float(thresholds[int(np.argmax(j_scaled))])


def _binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of validated 0/1 labels ``y`` [n] (both classes present) and scores [n].

    The Mann-Whitney form: the share of (positive, negative) pairs that the score orders
    correctly, a tie counting one half; equal to the area under the ROC curve with ties
    interpolated (``sklearn.metrics.roc_auc_score``). Twice the tie-averaged ranks are integers,
    so the count is exact and the one division rounds once.
    """
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    # twice the average 1-based rank of each distinct score: 2 * (scores below) + count + 1
    rank2 = 2 * (np.cumsum(counts) - counts) + counts + 1
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    u2 = int(rank2[inverse[y == 1]].sum()) - n_pos * (n_pos + 1)
    return u2 / (2 * n_pos * n_neg)


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def binary_metrics(y_true: Any, prob_pos: Any, threshold: float) -> dict[str, Any]:
    """AUC and thresholded metrics of a binary classifier.

    Parameters
    ----------
    y_true : array-like of {0, 1} or bool, shape [n]
        Ground truth.
    prob_pos : array-like of float, shape [n]
        Positive-class probability (any score works; AUC only uses its order).
    threshold : float
        Predict positive when ``prob_pos >= threshold`` (``inf`` predicts nothing positive);
        choose it on validation data, e.g. with :func:`youden_threshold`.

    Returns
    -------
    dict
        ``auc`` (NaN when ``y_true`` holds one class; then ``auc_defined`` is False),
        ``auc_defined`` (bool), ``accuracy``, ``balanced_accuracy`` (mean recall over the classes
        present in ``y_true``, sklearn's definition), ``f1`` (of the positive class; NaN when
        there is no positive in truth nor prediction, where sklearn would return 0 with a
        warning), ``sensitivity`` (NaN without positives), ``specificity`` (NaN without
        negatives), ``threshold``, ``n``, ``n_pos``, ``n_neg``. Metrics are floats, counts ints.
    """
    func = "binary_metrics"
    y = _labels01(y_true, "y_true", func)
    p = _numeric(prob_pos, "prob_pos", func, 1, "a 1-D array of finite probabilities")
    n = _same_length(func, y_true=y, prob_pos=p)
    if n == 0:
        raise _fail("y_true", func, "a non-empty array", "0 samples")
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or np.isnan(threshold):
        raise _fail("threshold", func, "a real number (not NaN)", repr(threshold))
    pred = p >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    fn = int(np.sum(~pred & pos))
    tn = int(np.sum(~pred & ~pos))
    n_pos, n_neg = tp + fn, tn + fp
    sens = _safe_div(tp, n_pos)
    spec = _safe_div(tn, n_neg)
    recalls = [r for r in (sens, spec) if not np.isnan(r)]
    auc_defined = n_pos > 0 and n_neg > 0
    auc = _binary_auc(y, p) if auc_defined else float("nan")
    return {
        "auc": auc,
        "auc_defined": auc_defined,
        "accuracy": (tp + tn) / n,
        "balanced_accuracy": float(np.mean(recalls)),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "sensitivity": sens,
        "specificity": spec,
        "threshold": float(threshold),
        "n": n,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def _kappa(confusion: np.ndarray, weights: str | None) -> float:
    """Cohen's kappa from a C x C confusion matrix (rows truth, columns prediction)."""
    c = confusion.shape[0]
    if weights is None:
        w = 1.0 - np.eye(c)
    else:  # quadratic
        idx = np.arange(c)
        w = (idx[:, None] - idx[None, :]) ** 2 / max(c - 1, 1) ** 2
    observed = confusion / confusion.sum()
    expected = np.outer(observed.sum(1), observed.sum(0))
    den = float(np.sum(w * expected))
    return 1.0 - float(np.sum(w * observed)) / den if den > 0 else float("nan")


def multiclass_metrics(y_true: Any, prob: Any) -> dict[str, Any]:
    """Macro one-vs-rest AUC, accuracy, balanced accuracy, macro F1 and kappa.

    The prediction is ``argmax(prob, axis=1)`` (ties to the lower class index).

    Parameters
    ----------
    y_true : array-like of int, shape [n]
        Class indices in ``0 .. C-1``.
    prob : array-like of float, shape [n, C]
        Class probabilities (or scores), C >= 2.

    Returns
    -------
    dict
        ``auc`` macro mean of the one-vs-rest AUCs over the classes that have both positives and
        negatives in ``y_true`` (NaN when none has); ``auc_per_class`` list [C] with NaN for the
        skipped classes; ``auc_classes_skipped`` their indices; ``accuracy``;
        ``balanced_accuracy`` mean recall over the classes present in ``y_true``; ``f1_macro``
        mean F1 over the classes present in ``y_true`` or the prediction (sklearn's default
        labels); ``kappa`` Cohen's kappa and ``kappa_quadratic`` its quadratic-weighted form
        (for ordered classes; both NaN when chance agreement is total); ``n``; ``n_classes``;
        ``class_counts`` list [C].
    """
    func = "multiclass_metrics"
    expected_p = "a 2-D array [n, C] of finite probabilities with C >= 2"
    p = _numeric(prob, "prob", func, 2, expected_p)
    if p.shape[1] < 2:
        raise _fail("prob", func, expected_p, _describe(p))
    n_classes = p.shape[1]
    expected_y = f"a 1-D array of integer class indices in [0, {n_classes - 1}]"
    y = _numeric(y_true, "y_true", func, 1, expected_y)
    bad = (y != np.round(y)) | (y < 0) | (y >= n_classes)
    if bad.any():
        raise _fail("y_true", func, expected_y, f"values {np.unique(y[bad])[:5].tolist()}")
    y = y.astype(np.int64)
    n = _same_length(func, y_true=y, prob=p)
    if n == 0:
        raise _fail("y_true", func, "a non-empty array", "0 samples")

    pred = np.argmax(p, axis=1)
    counts = np.bincount(y, minlength=n_classes)
    auc_per_class = np.full(n_classes, np.nan)
    for c in range(n_classes):
        if 0 < counts[c] < n:
            auc_per_class[c] = _binary_auc((y == c).astype(np.int64), p[:, c])
    defined = ~np.isnan(auc_per_class)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    tp = np.diag(confusion)
    present = counts > 0
    f1_labels = present | (confusion.sum(0) > 0)
    f1 = 2 * tp / np.maximum(confusion.sum(0) + confusion.sum(1), 1)
    return {
        "auc": float(auc_per_class[defined].mean()) if defined.any() else float("nan"),
        "auc_per_class": auc_per_class.tolist(),
        "auc_classes_skipped": np.flatnonzero(~defined).tolist(),
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(np.mean(tp[present] / counts[present])),
        "f1_macro": float(np.mean(f1[f1_labels])),
        "kappa": _kappa(confusion, None),
        "kappa_quadratic": _kappa(confusion, "quadratic"),
        "n": n,
        "n_classes": n_classes,
        "class_counts": counts.tolist(),
    }


# --------------------------------------------------------------------------------------------
# bootstrap and fold summaries
# --------------------------------------------------------------------------------------------


def _strata_groups(labels: np.ndarray, n: int, name: str) -> list[np.ndarray]:
    func = "bootstrap_ci"
    expected = "a 1-D array of class labels (bool or integer), one per sample"
    if labels.ndim != 1 or len(labels) != n or labels.dtype.kind not in "biuf":
        raise _fail(name, func, expected, _describe(labels))
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise _fail(
            name, func, expected + " (for survival metrics pass strata=event, or "
            "stratified=False)", "non-integer values"
        )
    values, inverse = np.unique(labels, return_inverse=True)
    if len(values) > MAX_STRATA:
        raise _fail(
            name, func, f"class labels with at most {MAX_STRATA} classes (for survival metrics "
            "pass strata=event, or stratified=False)", f"{len(values)} distinct values"
        )
    return [np.flatnonzero(inverse == k) for k in range(len(values))]


def bootstrap_ci(
    metric_fn: Callable[..., Any],
    *arrays: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int | np.random.Generator | None = 0,
    stratified: bool = True,
    strata: Any = None,
) -> tuple[float, float] | dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence interval of a metric.

    Each replicate resamples the rows (axis 0) of every array with the same indices and calls
    ``metric_fn(*resampled)``. The resampling indices of all replicates are drawn at once.

    With ``stratified=True`` (default) each class is resampled within itself, so every replicate
    keeps the class counts of the data and never loses a class (AUC stays defined). Replicates
    whose metric is NaN (our metrics' answer to a degenerate sample, e.g. AUC on one class after
    an unstratified resample, or a C-index without comparable pairs) are skipped; how many were
    skipped is logged. Exceptions from ``metric_fn`` propagate.

    Parameters
    ----------
    metric_fn : callable
        ``metric_fn(*arrays) -> float``, or ``-> dict``: then every numeric (non-bool) entry gets
        its own interval from the same replicates (e.g. ``lambda y, p: binary_metrics(y, p, t)``
        gives intervals for AUC, accuracy, F1, ... in one pass).
    *arrays : array-like, each with the same length n along axis 0
        Usually ``y_true, prob`` or ``time, event, risk``.
    n_boot : int
        Number of replicates, >= 1.
    alpha : float in (0, 1)
        The interval covers ``1 - alpha``: the ``alpha/2`` and ``1 - alpha/2`` percentiles
        (numpy's linear interpolation).
    seed : int, numpy Generator or None
        Randomness; the default 0 makes intervals reproducible.
    stratified : bool
        Resample within the groups of ``strata``.
    strata : array-like [n] of class labels, optional
        Groups for ``stratified``; default the first array (``y_true``). It must hold bool or
        integer labels with at most :data:`MAX_STRATA` distinct values, which catches passing
        times by mistake: for survival metrics pass ``strata=event``.

    Returns
    -------
    (low, high) : tuple of float
        NaN, NaN when no replicate gave a finite value. A dict ``{key: (low, high)}`` when
        ``metric_fn`` returns a dict.
    """
    func = "bootstrap_ci"
    if not callable(metric_fn):
        raise _fail("metric_fn", func, "a callable", repr(metric_fn))
    if not arrays:
        raise _fail("arrays", func, "one or more arrays", "none")
    if not isinstance(n_boot, numbers.Integral) or isinstance(n_boot, bool) or n_boot < 1:
        raise _fail("n_boot", func, "an int >= 1", repr(n_boot))
    if not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise _fail("alpha", func, "a float in (0, 1)", repr(alpha))
    data = [np.asarray(a) for a in arrays]
    for k, a in enumerate(data):
        if a.ndim == 0:
            raise _fail(f"arrays[{k}]", func, "an array with at least 1 dimension", _describe(a))
    n = len(data[0])
    if any(len(a) != n for a in data):
        raise ConfigError(
            f"The 'arrays' parameters of {func} must have the same length along axis 0. "
            f"Got lengths {[len(a) for a in data]} instead."
        )
    if n == 0:
        raise _fail("arrays", func, "non-empty arrays", "0 samples")

    rng = np.random.default_rng(seed)
    if stratified:
        name = "arrays[0]" if strata is None else "strata"
        groups = _strata_groups(np.asarray(data[0] if strata is None else strata), n, name)
        idx = np.empty((n_boot, n), dtype=np.intp)
        for members in groups:
            idx[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
    else:
        idx = rng.integers(0, n, size=(n_boot, n))

    values = [metric_fn(*(a[row] for a in data)) for row in idx]
    if isinstance(values[0], Mapping):
        keys = [k for k, v in values[0].items() if is_number(v, finite=False)]
        return {k: _percentile_interval([v[k] for v in values], alpha, str(k)) for k in keys}
    return _percentile_interval(values, alpha, getattr(metric_fn, "__name__", "metric"))


def _percentile_interval(values: Sequence[Any], alpha: float, name: str) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if not ok.all():
        logger.info("bootstrap of %s: %d of %d replicates undefined, skipped", name, int((~ok).sum()), len(v))
    if not ok.any():
        return float("nan"), float("nan")
    low, high = np.percentile(v[ok], [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def summarize_folds(
    fold_metrics: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation of each numeric metric over folds, NaN-aware.

    Keys are the union over folds in first-seen order; only numeric values count (bools,
    strings, lists are left out); a key missing from a fold, or NaN there, is skipped for that
    fold. The std is the SAMPLE standard deviation (ddof=1, as pandas ``.std()``): folds are a
    sample of possible splits. A key with no finite value has mean NaN; with fewer than two its
    std is NaN.

    Parameters
    ----------
    fold_metrics : sequence of dict
        One dict per fold, e.g. from :func:`binary_metrics`.

    Returns
    -------
    (mean, std) : tuple of dict
        ``{key: float}`` each, same keys.
    """
    func = "summarize_folds"
    if isinstance(fold_metrics, Mapping) or not isinstance(fold_metrics, Sequence) or not fold_metrics:
        raise _fail("fold_metrics", func, "a non-empty list of dicts", repr(type(fold_metrics)))
    for k, fold in enumerate(fold_metrics):
        if not isinstance(fold, Mapping):
            raise _fail(f"fold_metrics[{k}]", func, "a dict of metrics", repr(type(fold)))
    keys: dict[str, None] = {}
    for fold in fold_metrics:
        keys.update((k, None) for k, v in fold.items() if is_number(v, finite=False))
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for key in keys:
        v = np.array(
            [float(f[key]) if is_number(f.get(key), finite=False) else np.nan for f in fold_metrics],
            dtype=np.float64,
        )
        v = v[np.isfinite(v)]
        mean[key] = float(v.mean()) if len(v) else float("nan")
        std[key] = float(v.std(ddof=1)) if len(v) >= 2 else float("nan")
    return mean, std


# --------------------------------------------------------------------------------------------
# survival
# --------------------------------------------------------------------------------------------


def concordance_index(time: Any, event: Any, risk: Any) -> float:
    """Harrell's concordance index of a risk score (higher risk = earlier event).

    Convention (that of lifelines and scikit-survival's ``concordance_index_censored``):

    - a pair (i, j) is comparable when ``event_i == 1`` and either ``time_i < time_j``, or
      ``time_i == time_j`` and ``event_j == 0`` (a subject censored at the time of i's event
      is taken to have outlived it);
    - two events at the same time are not comparable, nor is any pair whose earlier time is
      censored;
    - a comparable pair is concordant when ``risk_i > risk_j`` (counts 1), tied when
      ``risk_i == risk_j`` exactly (counts 0.5), discordant otherwise (0).

    C = (concordant + 0.5 * tied) / comparable. Computed by blocks of vectorised pair
    comparisons, O(n^2) time and O(n) memory; a few thousand subjects take milliseconds.

    Parameters
    ----------
    time : array-like of float, shape [n]
        Follow-up times, >= 0.
    event : array-like of {0, 1} or bool, shape [n]
        1 = event observed, 0 = censored.
    risk : array-like of float, shape [n]
        Predicted risk, e.g. :func:`mil.survival.risk_from_logits`.

    Returns
    -------
    float
        C in [0, 1]; NaN when there is no comparable pair (e.g. no events).
    """
    func = "concordance_index"
    t, e = _survival_inputs(time, event, func)
    r = _numeric(risk, "risk", func, 1, "a 1-D array of finite risk scores")
    _same_length(func, time=t, risk=r)
    events = np.flatnonzero(e == 1)
    censored = e == 0
    block = max(1, _PAIR_BLOCK // max(len(t), 1))
    comparable = concordant = tied = 0
    for start in range(0, len(events), block):
        i = events[start : start + block]
        ti, ri = t[i, None], r[i, None]
        comp = (t[None, :] > ti) | ((t[None, :] == ti) & censored[None, :])
        comparable += int(comp.sum())
        concordant += int(np.sum(comp & (r[None, :] < ri)))
        tied += int(np.sum(comp & (r[None, :] == ri)))
    if comparable == 0:
        return float("nan")
    return (concordant + 0.5 * tied) / comparable


def _event_table(
    t: np.ndarray, e: np.ndarray, at: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Numbers at risk (time >= t) and events (time == t, event 1) at each time of ``at``."""
    t_sorted = np.sort(t)
    at_risk = len(t) - np.searchsorted(t_sorted, at, side="left")
    ev_sorted = np.sort(t[e == 1])
    deaths = np.searchsorted(ev_sorted, at, side="right") - np.searchsorted(ev_sorted, at, side="left")
    return at_risk, deaths


def kaplan_meier(time: Any, event: Any) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate of the survival function.

    ``S(t) = prod_{t_k <= t} (1 - d_k / n_k)`` with ``d_k`` events at ``t_k`` and ``n_k``
    subjects with time >= ``t_k`` (subjects censored at ``t_k`` are still at risk at ``t_k``).

    Parameters
    ----------
    time, event : array-like, shape [n]
        Follow-up times (>= 0) and event flags (1 = observed), as in :func:`concordance_index`.

    Returns
    -------
    times : ndarray of float, shape [m]
        The distinct event times, increasing (m = 0 when there is no event).
    survival : ndarray of float, shape [m]
        ``S`` just after each of ``times``: a right-continuous step function equal to 1 before
        ``times[0]`` and to ``survival[k]`` on ``[times[k], times[k+1])``.
    """
    t, e = _survival_inputs(time, event, "kaplan_meier")
    times = np.unique(t[e == 1])
    at_risk, deaths = _event_table(t, e, times)
    return times, np.cumprod(1.0 - deaths / at_risk)


def logrank_test(
    time_a: Any, event_a: Any, time_b: Any, event_b: Any
) -> tuple[float, float]:
    """Two-sample log-rank test (Mantel-Cox), chi-square with 1 degree of freedom.

    At each distinct event time ``t_k`` of the pooled sample, with ``n_k`` at risk (``n_ak`` in
    group a), ``d_k`` events (``d_ak`` in a):
    ``E_ak = d_k n_ak / n_k`` and
    ``V_k = d_k (n_ak / n_k) (1 - n_ak / n_k) (n_k - d_k) / (n_k - 1)`` (0 when ``n_k = 1``);
    ``statistic = (sum d_ak - sum E_ak)^2 / sum V_k``, ``p = chi2.sf(statistic, 1)``.

    Parameters
    ----------
    time_a, event_a : array-like, shape [n_a]
        Times (>= 0) and events (1 = event, 0 = censored) of group a.
    time_b, event_b : array-like, shape [n_b]
        The same for group b.

    Returns
    -------
    (statistic, p_value) : tuple of float
        NaN, NaN when the variance is 0 (no events, or no informative event time).
    """
    from scipy.stats import chi2

    func = "logrank_test"
    ta, ea = _survival_inputs(time_a, event_a, func, "time_a", "event_a")
    tb, eb = _survival_inputs(time_b, event_b, func, "time_b", "event_b")
    t = np.concatenate([ta, tb])
    e = np.concatenate([ea, eb])
    times = np.unique(t[e == 1])
    n, d = _event_table(t, e, times)
    n_a, d_a = _event_table(ta, ea, times)
    n = n.astype(np.float64)
    frac = n_a / n
    expected_a = d * frac
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = np.where(n > 1, d * frac * (1 - frac) * (n - d) / (n - 1), 0.0)
    v = float(variance.sum())
    if v <= 0:
        return float("nan"), float("nan")
    stat = float((d_a.sum() - expected_a.sum()) ** 2 / v)
    return stat, float(chi2.sf(stat, 1))
