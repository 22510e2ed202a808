"""Decision rules of evaluation: which binary threshold a fold uses, and the metrics at each.

Pure functions (arrays in, numbers out). The threshold is always chosen on the fold's
validation predictions and applied unchanged to its test predictions; only the ``paper``
protocol of ``wsi-pipeline evaluate`` passes test predictions here (the official MHIM-MIL
CAMELYON16 setup, where the test fold doubles as validation).

Rules (``threshold:`` in the evaluate config, ``--threshold`` on the command line):

- ``argmax``: the class with the larger probability (positive when ``p >= 0.5``);
- ``youden``: the cut maximising Youden's J on the validation predictions;
- ``auto`` (default): Youden only when the validation split holds at least
  :data:`MIN_PER_CLASS_FOR_YOUDEN` positives AND as many negatives, else argmax.

Why the count: Youden's cut is one of the validation scores, so with a handful of bags per class
it lands wherever the one or two extreme bags happen to fall and the test accuracy pays for it.
``benchmarks/threshold_bench.py`` measures the test balanced accuracy of both rules against the
per-class validation count on simulated score distributions (well and badly calibrated models);
BENCHMARKS.md ("Decision threshold") records the result that fixes the number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from extract.errors import ConfigError

__all__ = [
    "THRESHOLD_RULES",
    "MIN_PER_CLASS_FOR_YOUDEN",
    "ARGMAX_THRESHOLD",
    "ThresholdChoice",
    "choose_threshold",
    "thresholded_metrics",
    "threshold_families",
]

THRESHOLD_RULES = ("auto", "youden", "argmax")
#: Fewest validation bags of EACH class for which ``auto`` trusts Youden's J (BENCHMARKS.md,
#: "Decision threshold": below this, Youden on validation loses test balanced accuracy to argmax
#: on average, in every simulated calibration scenario).
MIN_PER_CLASS_FOR_YOUDEN = 10
#: The argmax rule of a two-class softmax as a threshold on the positive probability.
ARGMAX_THRESHOLD = 0.5
#: The thresholded metrics reported at both cuts (``<name>_at_argmax``, ``<name>_at_youden``).
FAMILY_METRICS = ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity")


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold a fold applies and why.

    Attributes
    ----------
    value : predict positive when ``p_pos >= value`` (``inf`` = nothing positive).
    rule : the rule that produced it, ``'youden'`` or ``'argmax'``.
    youden : Youden's cut on the threshold set, or None where it is undefined (one class).
    reason : one sentence for metrics.json and the log.
    n_pos, n_neg : the class counts of the threshold set.
    """

    value: float
    rule: str
    youden: float | None
    reason: str
    n_pos: int
    n_neg: int


def _check_rule(rule: str) -> None:
    if rule not in THRESHOLD_RULES:
        raise ConfigError(
            f"The 'threshold' parameter must be one of {', '.join(THRESHOLD_RULES)}. Got {rule!r} instead."
        )


def choose_threshold(y_val: Any, p_val: Any, rule: str = "auto",
                     min_per_class: int = MIN_PER_CLASS_FOR_YOUDEN) -> ThresholdChoice:
    """The binary decision threshold of one fold from its validation predictions.

    Parameters
    ----------
    y_val : [n] 0/1 labels of the threshold set (validation; the test fold under ``paper``).
    p_val : [n] predicted probability of the positive class.
    rule : 'auto', 'youden' or 'argmax' (module docstring).
    min_per_class : the ``auto`` rule's minimum count of each class.

    Returns
    -------
    ThresholdChoice. ``youden`` is asked for but the set holds one class: argmax, and the
    reason says so.
    """
    from mil.metrics import youden_threshold

    _check_rule(rule)
    y = np.asarray(y_val, dtype=np.int64).reshape(-1)
    p = np.asarray(p_val, dtype=np.float64).reshape(-1)
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    youden = float(youden_threshold(y, p)) if n_pos and n_neg else None
    counts = f"{n_pos} positive / {n_neg} negative"
    if rule == "argmax":
        return ThresholdChoice(ARGMAX_THRESHOLD, "argmax", youden, "argmax (threshold: argmax)", n_pos, n_neg)
    if youden is None:
        return ThresholdChoice(ARGMAX_THRESHOLD, "argmax", None,
                               f"argmax: the threshold set holds one class ({counts}), Youden's J is undefined",
                               n_pos, n_neg)
    if rule == "youden":
        return ThresholdChoice(youden, "youden", youden, f"Youden's J ({counts}; threshold: youden)", n_pos, n_neg)
    if min(n_pos, n_neg) >= min_per_class:
        return ThresholdChoice(youden, "youden", youden,
                               f"Youden's J: {counts} >= {min_per_class} of each class (threshold: auto)",
                               n_pos, n_neg)
    return ThresholdChoice(ARGMAX_THRESHOLD, "argmax", youden,
                           f"argmax: {counts}, fewer than {min_per_class} of a class to estimate Youden's J "
                           "(threshold: auto)", n_pos, n_neg)


def thresholded_metrics(y: Any, p: Any, threshold: float) -> dict[str, float]:
    """Accuracy, balanced accuracy, F1, sensitivity and specificity at ``p >= threshold``."""
    from mil.metrics import binary_metrics

    m = binary_metrics(np.asarray(y, dtype=np.int64), np.asarray(p, dtype=np.float64), float(threshold))
    return {k: m[k] for k in FAMILY_METRICS}


def threshold_families(y_test: Any, p_test: Any, choice: ThresholdChoice) -> dict[str, Any]:
    """The test metrics at both cuts, as flat keys for metrics.json.

    Returns ``<metric>_at_argmax`` and ``<metric>_at_youden`` for each of
    :data:`FAMILY_METRICS`, plus ``youden_threshold``; the Youden values are NaN where the
    threshold set had one class.
    """
    out: dict[str, Any] = {}
    at_argmax = thresholded_metrics(y_test, p_test, ARGMAX_THRESHOLD)
    at_youden = (thresholded_metrics(y_test, p_test, choice.youden) if choice.youden is not None
                 else dict.fromkeys(FAMILY_METRICS, math.nan))
    for k in FAMILY_METRICS:
        out[f"{k}_at_argmax"] = at_argmax[k]
    for k in FAMILY_METRICS:
        out[f"{k}_at_youden"] = at_youden[k]
    out["youden_threshold"] = math.nan if choice.youden is None else choice.youden
    return out


def family_names() -> tuple[str, ...]:
    """Every key :func:`threshold_families` writes (for fold summaries)."""
    return tuple(f"{k}_at_{r}" for r in ("argmax", "youden") for k in FAMILY_METRICS) + ("youden_threshold",)


def describe_rule(settings: Mapping[str, Any] | None = None) -> str:
    """The auto rule in one sentence (metrics.json ``threshold_rule_text``)."""
    k = (settings or {}).get("min_per_class", MIN_PER_CLASS_FOR_YOUDEN)
    return (f"auto: Youden's J on validation when it holds >= {k} positive and >= {k} negative bags, "
            "else argmax (p >= 0.5)")
