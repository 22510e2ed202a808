"""Evaluation, pure: protocols, tasks, decision rules, per-fold metrics, ensembles and tables.

Everything here works on arrays and prediction tables (one row per seed, fold, split and slide;
``pipeline.evaluate_stage`` writes them to predictions.csv), so every number of metrics.json can
be recomputed from that file. No files, no models.

- Protocols (:data:`PROTOCOLS`) and tasks (:data:`TASKS`): the one list of each, checked by
  :func:`check_protocol` and :func:`check_task` wherever a config or a function takes one.
- Tasks (:class:`TaskSpec`): binary, multi-class and survival differ in how a fold's decision is
  made and scored; that difference lives in one place, used by the per-fold evaluation, the
  ensemble and the external set alike.
- Threshold rules (below): which binary threshold a fold uses, and the metrics at each.

The threshold is always chosen on the fold's validation predictions and applied unchanged to its
test predictions; only the ``paper`` protocol passes test predictions here (the official
MHIM-MIL CAMELYON16 setup, where the test fold doubles as validation).

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

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from extract.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

__all__ = [
    "PROTOCOLS",
    "TASKS",
    "check_protocol",
    "check_task",
    "TaskSpec",
    "evaluate_predictions",
    "ensemble_predictions",
    "external_decisions",
    "external_metrics",
    "km_summary",
    "format_table",
    "ground_truth",
    "prediction_rows",
    "json_safe",
    "THRESHOLD_RULES",
    "MIN_PER_CLASS_FOR_YOUDEN",
    "ARGMAX_THRESHOLD",
    "ThresholdChoice",
    "choose_threshold",
    "thresholded_metrics",
    "threshold_families",
]

#: Evaluation protocols and how every output labels them.
PROTOCOLS = {
    "default": "default (model selection and threshold on validation)",
    "paper": "paper (optimistic: threshold and model selection on the test fold)",
}
#: Learning tasks of a model and an experiment.
TASKS = ("classification", "survival")
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


def check_protocol(protocol: str, owner: str = "") -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`, else a :class:`ConfigError` naming them."""
    if protocol not in PROTOCOLS:
        where = f" of {owner}" if owner else ""
        raise ConfigError(f"The 'protocol' parameter{where} must be one of {', '.join(PROTOCOLS)}. "
                          f"Got {protocol!r} instead.")
    return protocol


def check_task(task: str, owner: str = "") -> str:
    """``task`` if it is one of :data:`TASKS`, else a :class:`ConfigError` naming them."""
    if task not in TASKS:
        where = f" of {owner}" if owner else ""
        raise ConfigError(f"The 'task' parameter{where} must be one of {', '.join(TASKS)}. Got {task!r} instead.")
    return task


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


# -- tables: seeds, folds, labels --------------------------------------------------------------

#: Metrics reported per fold, each with a bootstrap interval ``<name>_ci``.
BINARY_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity")
MULTICLASS_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1_macro", "kappa")
SURVIVAL_METRICS = ("c_index",)


def json_safe(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, recursively."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def seed_value(seed: Any) -> int | None:
    """A table's seed cell as an int, or None where the experiment has no seeds."""
    if seed is None or (isinstance(seed, float) and math.isnan(seed)) or seed == "":
        return None
    return int(seed)


def fold_units(pred: "pd.DataFrame") -> list[tuple[int | None, Any]]:
    """Distinct (seed, fold) pairs of a predictions table, in order."""
    seen: dict[tuple, None] = {}
    for s, f in zip(pred["seed"], pred["fold"]):
        seen.setdefault((seed_value(s), f), None)
    return sorted(seen, key=lambda sf: (-1 if sf[0] is None else sf[0], str(sf[1]).zfill(8)))


def unit_rows(pred: "pd.DataFrame", seed: int | None, fold: Any) -> "pd.DataFrame":
    """The rows of one fold model."""
    seeds = pred["seed"].map(seed_value)
    same_seed = seeds.isna() if seed is None else seeds == seed
    return pred[same_seed & (pred["fold"].astype(str) == str(fold))]


def first_seed(rows: "pd.DataFrame") -> "pd.DataFrame":
    """The rows of the lowest seed (all rows when there are no seeds)."""
    if rows.empty:
        return rows
    seeds = rows["seed"].map(seed_value)
    if seeds.isna().all():
        return rows
    return rows[seeds == seeds.dropna().min()]


def threshold_rows(rows: "pd.DataFrame", protocol: str) -> tuple["pd.DataFrame", str]:
    """The rows a threshold is chosen on: validation (default) or the test fold (paper)."""
    if protocol == "paper":
        return rows[rows["split"] == "test"], "test fold (paper protocol)"
    return rows[rows["split"] == "val"], "validation"


def _canonical_label(label: str, classes: Sequence[str]) -> str | None:
    label = str(label).strip()
    if label in classes:
        return label
    if re.fullmatch(r"[0-9]+", label) and all(re.fullmatch(r"[0-9]+", c) for c in classes):
        value = int(label)
        if 0 <= value < len(classes):
            return classes[value]
    return None


def ground_truth(rows: Sequence[Any], task: str, classes: Sequence[str] | None, require: bool,
                 source: Any = "manifest") -> dict[str, dict]:
    """Ground truth per slide from manifest rows (``slide_id``, ``label`` or ``time``/``event``):
    the canonical class name, or time and event.

    Raises :class:`ManifestError` naming ``source`` and the slides whose label is not a class
    of the experiment (or, with ``require``, that have none).
    """
    from extract.errors import ManifestError

    truth: dict[str, dict] = {}
    problems = []
    for row in rows:
        if task == "survival":
            if row.time is not None and row.event is not None:
                truth[row.slide_id] = {"time": float(row.time), "event": int(row.event)}
            elif require:
                problems.append(f"{row.slide_id} (no time/event)")
            continue
        if row.label is None:
            if require:
                problems.append(f"{row.slide_id} (no label)")
            continue
        name = _canonical_label(row.label, classes)
        if name is None:
            problems.append(f"{row.slide_id} (label {row.label!r} is not one of {', '.join(classes)})")
            continue
        truth[row.slide_id] = {"label": name}
    if problems:
        raise ManifestError(
            f"{source}: {len(problems)} slide(s) cannot be scored against the experiment's "
            f"{'time/event' if task == 'survival' else 'classes'}: " + "; ".join(problems[:30])
        )
    return truth


def prediction_rows(scored: Sequence[Mapping[str, Any]], seed: int | None, fold: Any, split: str, task: str,
                    classes: Sequence[str] | None, truth: Mapping[str, dict], source: Any = "model") -> list[dict]:
    """Rows of the predictions table from one model's outputs.

    ``scored``: dicts with ``slide_id`` and ``prob`` [C] or ``risk`` and ``surv`` [K]; ``seed``
    and ``fold`` of the model ('' where not applicable); ``source`` names the model in errors.
    """
    from extract.errors import CheckpointError

    out = []
    for r in scored:
        row: dict[str, Any] = {"slide_id": r["slide_id"], "seed": "" if seed is None else seed, "fold": fold,
                               "split": split}
        t = truth.get(r["slide_id"], {})
        if task == "survival":
            row["risk"] = r["risk"]
            for k, v in enumerate(r["surv"]):
                row[f"surv_bin_{k}"] = float(v)
            row["time"] = t.get("time")
            row["event"] = t.get("event")
        else:
            row["label"] = t.get("label")
            prob = r["prob"]
            if len(prob) != len(classes):
                raise CheckpointError(f"{source} outputs {len(prob)} classes but the experiment has {len(classes)} "
                                      f"({', '.join(classes)}); it belongs to another experiment")
            for c, p in zip(classes, prob):
                row[f"prob_{c}"] = float(p)
        out.append(row)
    return out


# -- tasks: one dispatch -----------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    """How a task decides and scores: ``kind`` is 'binary', 'multiclass' or 'survival'.

    Binary: positive (the second class) when ``p >= threshold``; multi-class: the argmax;
    survival: the 'high' risk group when ``risk > threshold``.
    """

    task: str
    kind: str
    classes: tuple[str, ...] | None

    @classmethod
    def of(cls, task: str, classes: Sequence[str] | None) -> "TaskSpec":
        check_task(task)
        if task == "survival":
            return cls(task, "survival", None)
        if classes is None or len(classes) < 2:
            raise ConfigError(f"classification needs at least two classes; got {classes!r}")
        return cls(task, "binary" if len(classes) == 2 else "multiclass", tuple(str(c) for c in classes))

    @property
    def prob_columns(self) -> list[str]:
        return [f"prob_{c}" for c in self.classes or ()]

    @property
    def positive(self) -> str:
        """The positive probability column (binary)."""
        return f"prob_{self.classes[1]}"

    @property
    def summary_names(self) -> tuple[str, ...]:
        """The per-fold numbers averaged over folds (those a fold lacks are skipped)."""
        return {"binary": BINARY_METRICS + ("threshold",) + family_names(), "multiclass": MULTICLASS_METRICS,
                "survival": SURVIVAL_METRICS + ("logrank_p",)}[self.kind]

    def labels(self, rows: "pd.DataFrame") -> np.ndarray:
        """Class indices [n] of the rows' ``label`` column."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        return np.array([lookup[str(v)] for v in rows["label"]], dtype=np.int64)

    def prepare(self, table: "pd.DataFrame") -> "pd.DataFrame":
        """A copy with an empty decision column and NaN thresholds."""
        table = table.copy()
        table["threshold"] = np.nan
        if self.kind != "survival":
            table["prediction"] = ""
        return table

    def decide(self, table: "pd.DataFrame", idx: Any, threshold: float | None) -> None:
        """Fill ``prediction`` (or ``risk_group``) and ``threshold`` of rows ``idx``, in place."""
        if self.kind == "multiclass":
            table.loc[idx, "prediction"] = [self.classes[i] for i in
                                            np.argmax(table.loc[idx, self.prob_columns].to_numpy(float), 1)]
            return
        table.loc[idx, "threshold"] = threshold
        if self.kind == "binary":
            p = table.loc[idx, self.positive].to_numpy(float)
            table.loc[idx, "prediction"] = np.where(p >= threshold, self.classes[1], self.classes[0])
        else:
            table.loc[idx, "risk_group"] = np.where(table.loc[idx, "risk"].to_numpy(float) > threshold, "high", "low")

    def fold_metrics(self, rows: "pd.DataFrame", threshold: float | None, n_boot: int, seed: int) -> dict:
        """The metrics of one model on ``rows`` with bootstrap 95% intervals (``<name>_ci``)."""
        from mil.metrics import binary_metrics, bootstrap_ci, concordance_index, multiclass_metrics

        if self.kind == "survival":
            t, e, r = (rows[c].to_numpy(float) for c in ("time", "event", "risk"))
            e = e.astype(np.int64)
            lo, hi = bootstrap_ci(concordance_index, t, e, r, n_boot=n_boot, seed=seed, strata=e)
            return {"c_index": concordance_index(t, e, r), "c_index_ci": [lo, hi], "n_test": int(len(t)),
                    "n_events": int(np.sum(e))}
        y = self.labels(rows)
        if self.kind == "binary":
            p = rows[self.positive].to_numpy(float)

            def fn(yy, pp):
                return binary_metrics(yy, pp, threshold)

            names, m, ci = BINARY_METRICS, fn(y, p), bootstrap_ci(fn, y, p, n_boot=n_boot, seed=seed)
            extra = {"n_test": m["n"], "n_pos": m["n_pos"], "n_neg": m["n_neg"]}
        else:
            prob = rows[self.prob_columns].to_numpy(float)
            m, ci = multiclass_metrics(y, prob), bootstrap_ci(multiclass_metrics, y, prob, n_boot=n_boot, seed=seed)
            names = MULTICLASS_METRICS
            extra = {"n_test": m["n"], "class_counts": m["class_counts"], "auc_per_class": m["auc_per_class"]}
        out: dict[str, Any] = {}
        for k in names:
            out[k] = m[k]
            out[f"{k}_ci"] = list(ci[k])
        out.update(extra)
        return out

    def risk_groups(self, rows: "pd.DataFrame", threshold: float) -> dict:
        """Log-rank test of the rows above vs at or below ``threshold`` (survival)."""
        from mil.metrics import logrank_test

        t, e, r = (rows[c].to_numpy(float) for c in ("time", "event", "risk"))
        high = r > threshold
        stat, p = logrank_test(t[high], e[high].astype(int), t[~high], e[~high].astype(int))
        return {"logrank_statistic": stat, "logrank_p": p, "n_high": int(high.sum()), "n_low": int((~high).sum())}


# -- per-fold evaluation, ensembles, external sets ---------------------------------------------

def _binary_threshold(spec: TaskSpec, thr_rows: "pd.DataFrame", test: "pd.DataFrame", rule: str,
                      source: str, name: str) -> tuple[float, dict]:
    """The fold's binary threshold and what metrics.json records about it."""
    choice = choose_threshold(spec.labels(thr_rows), thr_rows[spec.positive].to_numpy(float), rule)
    if choice.youden is None:
        log.warning("%s: %s", name, choice.reason)
    elif choice.rule != rule:
        log.info("%s: %s", name, choice.reason)
    thr = choice.value
    record = threshold_families(spec.labels(test), test[spec.positive].to_numpy(float), choice)
    record.update(threshold=thr, threshold_rule=choice.rule, threshold_from=f"{source}: {choice.reason}")
    if not math.isfinite(thr):
        record["threshold_from"] += (": no cut beats chance (Youden's J <= 0), so nothing is called "
                                     "positive (threshold +inf, written as null)")
        log.warning("%s: the %s scores separate no better than chance; no slide is called positive", name, source)
    record.update(n_threshold_set=int(len(thr_rows)), n_threshold_set_pos=choice.n_pos,
                  n_threshold_set_neg=choice.n_neg)
    return thr, record


def evaluate_predictions(
    pred: "pd.DataFrame",
    task: str,
    classes: Sequence[str] | None,
    protocol: str = "default",
    n_boot: int = 1000,
    seed: int = 0,
    threshold: str = "auto",
) -> tuple[dict, "pd.DataFrame"]:
    """Per-fold metrics from a predictions table, and the table with decisions filled in.

    Parameters
    ----------
    pred : one row per (seed, fold, split, slide) with ``slide_id, seed, fold, split`` and
        classification: ``label`` (class name) and ``prob_<class>`` for each class;
        survival: ``risk, time, event``. ``split`` is ``val`` or ``test``.
    task : 'classification' or 'survival'.
    classes : class names in index order (classification); binary = two classes, the second
        is the positive one.
    protocol : 'default' (thresholds from each fold's validation rows) or 'paper' (from its
        test rows).
    n_boot : bootstrap replicates of the 95% intervals (stratified by class, or by event).
    seed : bootstrap randomness.
    threshold : binary decision rule, 'auto', 'youden' or 'argmax' (module docstring); the
        metrics at both cuts are reported whatever the rule.

    Returns
    -------
    metrics : ``{"folds": [...], "mean": {...}, "std": {...}, "protocol", "task", ...}``
    pred : a copy with ``prediction`` (classification) or ``risk_group`` (survival) and the
        per-fold ``threshold``.
    """
    from extract.errors import CheckpointError
    from mil.metrics import summarize_folds

    check_protocol(protocol)
    spec = TaskSpec.of(task, classes)
    _check_rule(threshold)
    pred = spec.prepare(pred)
    folds = []
    for s, f in fold_units(pred):
        rows = unit_rows(pred, s, f)
        test = rows[rows["split"] == "test"]
        if test.empty:
            raise ConfigError(f"fold {f} (seed {s}) has no test predictions")
        thr_rows, source = threshold_rows(rows, protocol)
        if spec.kind != "multiclass" and thr_rows.empty:
            what = "no threshold can be chosen" if spec.kind == "binary" else "the risk groups cannot be split"
            raise CheckpointError(f"fold {f} (seed {s}) has no validation slides in splits.csv, so {what} "
                                  "honestly; retrain with a validation split or use --protocol paper")
        thr, extra = None, {}
        if spec.kind == "binary":
            # the paper protocol reproduces the official code: Youden's cut on the test fold
            rule = "youden" if protocol == "paper" and threshold == "auto" else threshold
            thr, extra = _binary_threshold(spec, thr_rows, test, rule, source, f"fold {f} seed {s}")
        elif spec.kind == "survival":
            thr = float(np.median(thr_rows["risk"].to_numpy(float)))
            groups = spec.risk_groups(test, thr)
            extra = {"risk_threshold": thr, "threshold_from": source, "logrank_p": groups["logrank_p"],
                     "n_high": groups["n_high"], "n_low": groups["n_low"]}
        folds.append({"fold": f, "seed": s, **spec.fold_metrics(test, thr, n_boot, seed), **extra})
        spec.decide(pred, rows.index, thr)

    mean, std = summarize_folds([{k: r[k] for k in spec.summary_names if k in r} for r in folds])
    metrics: dict[str, Any] = {
        "folds": folds, "mean": mean, "std": std, "protocol": PROTOCOLS[protocol], "task": task,
        "kind": spec.kind, "n_boot": n_boot,
        "ci": "95% percentile bootstrap over the test slides of each fold (stratified)",
    }
    if spec.kind != "survival":
        metrics["classes"] = list(spec.classes)
    if spec.kind == "binary":
        metrics["positive_class"] = spec.classes[1]
        metrics["threshold_setting"] = threshold
        metrics["threshold_rule"] = describe_rule() if threshold == "auto" else threshold
        metrics["threshold_families"] = ("accuracy, balanced_accuracy, f1, sensitivity, specificity also at "
                                         "argmax (<name>_at_argmax, p >= 0.5) and at the Youden cut of the "
                                         "threshold set (<name>_at_youden)")
    if spec.kind == "survival":
        metrics["km"] = km_summary(pred)
    return metrics, pred


def km_summary(pred: "pd.DataFrame") -> dict:
    """Log-rank test of the pooled test slides of the first seed, by their fold's risk group."""
    from mil.metrics import logrank_test

    test = first_seed(pred[pred["split"] == "test"])
    high = (test["risk_group"] == "high").to_numpy()
    t, e = test["time"].to_numpy(float), test["event"].to_numpy(float).astype(int)
    stat, p = logrank_test(t[high], e[high], t[~high], e[~high])
    seed = seed_value(test["seed"].iloc[0]) if len(test) else None
    return {"seed": seed, "logrank_statistic": stat, "logrank_p": p, "n_high": int(high.sum()),
            "n_low": int((~high).sum()),
            "split": "test slides of every fold, each split at its fold's median validation risk"}


def ensemble_predictions(
    pred: "pd.DataFrame",
    task: str,
    classes: Sequence[str] | None,
    thresholds: Sequence[float],
) -> "pd.DataFrame":
    """Mean over fold models of each slide's probabilities (or risk), one row per slide.

    ``thresholds``: the folds' own thresholds (binary: Youden on validation; survival: median
    validation risk); the ensemble's threshold is their mean.
    """
    spec = TaskSpec.of(task, classes)
    thr = float(np.mean(thresholds)) if len(thresholds) else float("nan")
    value_cols = spec.prob_columns if spec.kind != "survival" else (
        ["risk"] + [c for c in pred.columns if c.startswith("surv_bin_")])
    grouped = pred.groupby("slide_id", sort=False)
    ens = grouped[value_cols].mean()
    for c in (c for c in ("label", "time", "event") if c in pred.columns):
        ens[c] = grouped[c].first()
    ens = ens.reset_index()
    ens.insert(1, "seed", "")
    ens.insert(2, "fold", "ensemble")
    ens.insert(3, "split", pred["split"].iloc[0] if len(pred) else "external")
    ens["n_models"] = grouped.size().to_numpy()
    ens["threshold"] = thr
    spec.decide(ens, ens.index, thr)
    return ens


def external_decisions(pred: "pd.DataFrame", task: str, classes: Sequence[str] | None,
                       fold_thr: Mapping[tuple, float]) -> "pd.DataFrame":
    """Per-model external rows with each model's own decision (its fold's threshold)."""
    spec = TaskSpec.of(task, classes)
    pred = spec.prepare(pred)
    for (s, f), thr in fold_thr.items():
        spec.decide(pred, unit_rows(pred, s, f).index, thr)
    return pred


def external_metrics(pred: "pd.DataFrame", ens: "pd.DataFrame", task: str, classes: Sequence[str] | None,
                     fold_thr: Mapping[tuple, float], n_boot: int, labelled: bool) -> dict:
    """Per-model and ensemble metrics on an external set (none when it has no labels)."""
    from mil.metrics import summarize_folds

    spec = TaskSpec.of(task, classes)
    out: dict[str, Any] = {"labelled": labelled, "n_slides": int(len(ens)), "n_models": len(fold_thr)}
    if not labelled:
        out.update(folds=[], mean={}, std={}, ensemble=None, note="the external manifest has no labels: predictions only")
        out["kind"] = spec.kind
        return out
    thr_key = "risk_threshold" if spec.kind == "survival" else "threshold"
    folds = []
    for (s, f), thr in fold_thr.items():
        record = {"fold": f, "seed": s, **spec.fold_metrics(unit_rows(pred, s, f), thr, n_boot, 0)}
        if spec.kind != "multiclass":
            record[thr_key] = thr
        folds.append(record)
    thr = float(ens["threshold"].iloc[0]) if spec.kind == "binary" else None
    ensemble = spec.fold_metrics(ens, thr, n_boot, 0)
    if spec.kind == "binary":
        ensemble["threshold"] = thr
    if spec.kind == "survival":
        groups = spec.risk_groups(ens, float(ens["threshold"].iloc[0]))
        ensemble.update(logrank_p=groups["logrank_p"], n_high=groups["n_high"], n_low=groups["n_low"])
        out["km"] = {"seed": None, **groups,
                     "split": "ensemble risk at the mean of the folds' median validation risks"}
    mean, std = summarize_folds([{k: r[k] for k in spec.summary_names if k in r} for r in folds])
    out.update(folds=folds, mean=mean, std=std, ensemble=ensemble, kind=spec.kind)
    if spec.kind == "binary":
        out["positive_class"] = spec.classes[1]
    return out


def format_table(metrics: Mapping[str, Any]) -> str:
    """Fold rows and a mean ± std row of the headline metrics, as plain text."""
    kind = metrics.get("kind", metrics.get("task"))
    names = {"binary": BINARY_METRICS + ("threshold",), "multiclass": MULTICLASS_METRICS,
             "survival": ("c_index", "logrank_p")}.get(kind, ())
    short = {"balanced_accuracy": "bal_acc", "sensitivity": "sens", "specificity": "spec",
             "threshold": "thresh", "accuracy": "acc"}
    head = ["seed", "fold", "n"] + [short.get(n, n) for n in names]

    def fmt(v):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "n/a"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [[fmt(r.get("seed")), str(r.get("fold")), fmt(r.get("n_test"))] + [fmt(r.get(n)) for n in names]
            for r in metrics.get("folds", [])]
    if metrics.get("folds"):
        rows.append(["", "mean±std", ""] + [
            f"{fmt(metrics['mean'].get(n))}±{fmt(metrics['std'].get(n))}" if n in metrics["mean"] else ""
            for n in names])
    if metrics.get("ensemble"):
        e = metrics["ensemble"]
        rows.append(["", "ensemble", fmt(e.get("n_test"))] + [fmt(e.get(n)) for n in names])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    task = metrics.get("task")
    lines = [f"protocol: {metrics.get('protocol')}   task: {task}" + (f" ({kind})" if kind != task else "")]
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
