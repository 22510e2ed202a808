"""``wsi-pipeline evaluate``: trained fold models + bags -> metrics, predictions, figures, heatmaps.

Honest by default (docs/DESIGN.md, "Honest evaluation"): per fold (and seed) the model in
``best.pt`` (selected on validation by the trainer) scores that fold's VALIDATION and TEST slides
from ``splits.csv``; the binary decision threshold is Youden's J on the validation predictions and
is applied unchanged to the test predictions; survival risk groups split at the median
VALIDATION risk. ``--protocol paper`` reproduces the MHIM-MIL CAMELYON16 setup, where the test
fold doubles as validation (threshold chosen on the evaluated slides): its outputs go to a folder
of their own and every one of them says ``"paper (optimistic: ...)"``.

Outputs (``<ws>/experiments/<name>/``):

    evaluation/                      default protocol
    evaluation_paper/                --protocol paper (never overwrites the honest results)
    evaluation[_paper]/external_<manifest stem>/    an external test set (--manifest + --features)
        metrics.json     per-fold metrics with bootstrap 95% CIs, mean, std, protocol, task
        predictions.csv  one row per (seed, fold, split, slide); external: + ensemble rows
        roc.png          binary: per-fold ROC curves and their mean
        km.png           survival: Kaplan-Meier of high/low predicted risk with log-rank p
        heatmaps/<slide_id>.png, heatmaps/<slide_id>_gallery.png
        evaluate_config.yaml   the resolved settings of this run

The metric computations are pure functions of a predictions table
(:func:`evaluate_predictions`), so every number in metrics.json can be recomputed from
predictions.csv.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from extract.errors import BagError, CheckpointError, ConfigError, ManifestError, PipelineError

from .previews import save_png
from .workspace import Workspace

log = logging.getLogger(__name__)

__all__ = [
    "EvaluateConfig",
    "PROTOCOLS",
    "run_evaluation",
    "evaluate_command",
    "evaluate_predictions",
    "ensemble_predictions",
    "format_table",
    "parse_heatmaps",
    "load_experiment",
    "evaluation_dir",
    "binary_threshold",
]

PROTOCOLS = {
    "default": "default (model selection and threshold on validation)",
    "paper": "paper (optimistic: threshold and model selection on the test fold)",
}
#: Binary metrics reported per fold, each with a bootstrap interval ``<name>_ci``.
BINARY_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity")
MULTICLASS_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1_macro", "kappa")
SURVIVAL_METRICS = ("c_index",)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate:`` section of the YAML config (flags override what they set)."""

    experiment: str | None = None
    features: str | None = None
    heatmaps: str | None = None  # a number of slides, or "all"
    protocol: str = "default"
    device: str = "auto"
    n_boot: int = 1000
    gallery_k: int = 8
    cmap: str = "viridis"
    threshold: str = "auto"  # binary decision rule: auto | youden | argmax (mil.evaluation)
    heatmap_mode: str = "absolute"  # absolute | rank (pipeline.heatmaps)

    def __post_init__(self):
        from mil.evaluation import THRESHOLD_RULES

        from .heatmaps import MODES

        if self.heatmap_mode not in MODES:
            raise ConfigError(f"The 'heatmap_mode' parameter must be one of {', '.join(MODES)}. "
                              f"Got {self.heatmap_mode!r} instead.")
        if self.threshold not in THRESHOLD_RULES:
            raise ConfigError(f"The 'threshold' parameter must be one of {', '.join(THRESHOLD_RULES)}. "
                              f"Got {self.threshold!r} instead.")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"The 'protocol' parameter must be one of {', '.join(PROTOCOLS)}. Got {self.protocol!r} instead."
            )
        if self.n_boot < 1:
            raise ConfigError(f"The 'n_boot' parameter must be >= 1. Got {self.n_boot} instead.")
        if self.gallery_k < 1:
            raise ConfigError(f"The 'gallery_k' parameter must be >= 1. Got {self.gallery_k} instead.")
        parse_heatmaps(self.heatmaps)


def parse_heatmaps(value: Any) -> int | None:
    """``--heatmaps`` as a count: ``None``/0 -> 0, a number -> that many, ``'all'`` -> None (all)."""
    if value is None:
        return 0
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"The 'heatmaps' parameter must be a number >= 0 or 'all'. Got {value!r} instead.")
    return n


# ---------------------------------------------------------------------------------------------
# pure: metrics from a predictions table
# ---------------------------------------------------------------------------------------------

def _finite_or_none(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, recursively."""
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _prob_columns(classes: Sequence[str]) -> list[str]:
    return [f"prob_{c}" for c in classes]


def _seed_value(seed: Any) -> int | None:
    if seed is None or (isinstance(seed, float) and math.isnan(seed)) or seed == "":
        return None
    return int(seed)


def _units(pred: pd.DataFrame) -> list[tuple[int | None, Any]]:
    """Distinct (seed, fold) pairs in order."""
    seen: dict[tuple, None] = {}
    for s, f in zip(pred["seed"], pred["fold"]):
        seen.setdefault((_seed_value(s), f), None)
    return sorted(seen, key=lambda sf: (-1 if sf[0] is None else sf[0], str(sf[1]).zfill(8)))


def _unit_rows(pred: pd.DataFrame, seed: int | None, fold: Any) -> pd.DataFrame:
    seeds = pred["seed"].map(_seed_value)
    same_seed = seeds.isna() if seed is None else seeds == seed
    return pred[same_seed & (pred["fold"].astype(str) == str(fold))]


def _threshold_rows(rows: pd.DataFrame, protocol: str) -> tuple[pd.DataFrame, str]:
    """The rows a threshold is chosen on: validation (default) or the test fold (paper)."""
    if protocol == "paper":
        return rows[rows["split"] == "test"], "test fold (paper protocol)"
    return rows[rows["split"] == "val"], "validation"


def binary_threshold(y_val: np.ndarray, p_val: np.ndarray, rule: str = "auto"):
    """The fold's decision threshold from its threshold-set predictions (``mil.evaluation``)."""
    from mil.evaluation import choose_threshold

    return choose_threshold(y_val, p_val, rule)


def _binary_fold(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int, seed: int) -> dict:
    from mil.metrics import binary_metrics, bootstrap_ci

    m = binary_metrics(y, p, threshold)
    ci = bootstrap_ci(lambda yy, pp: binary_metrics(yy, pp, threshold), y, p, n_boot=n_boot, seed=seed)
    out = {}
    for k in BINARY_METRICS:
        out[k] = m[k]
        out[f"{k}_ci"] = list(ci[k])
    out.update(n_test=m["n"], n_pos=m["n_pos"], n_neg=m["n_neg"])
    return out


def _multiclass_fold(y: np.ndarray, prob: np.ndarray, n_boot: int, seed: int) -> dict:
    from mil.metrics import bootstrap_ci, multiclass_metrics

    m = multiclass_metrics(y, prob)
    ci = bootstrap_ci(multiclass_metrics, y, prob, n_boot=n_boot, seed=seed)
    out = {}
    for k in MULTICLASS_METRICS:
        out[k] = m[k]
        out[f"{k}_ci"] = list(ci[k])
    out.update(n_test=m["n"], class_counts=m["class_counts"], auc_per_class=m["auc_per_class"])
    return out


def _survival_fold(time: np.ndarray, event: np.ndarray, risk: np.ndarray, n_boot: int, seed: int) -> dict:
    from mil.metrics import bootstrap_ci, concordance_index

    c = concordance_index(time, event, risk)
    lo, hi = bootstrap_ci(concordance_index, time, event, risk, n_boot=n_boot, seed=seed, strata=event)
    return {"c_index": c, "c_index_ci": [lo, hi], "n_test": int(len(time)), "n_events": int(np.sum(event))}


def _labels_index(pred: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    lookup = {str(c): i for i, c in enumerate(classes)}
    return np.array([lookup[str(v)] for v in pred["label"]], dtype=np.int64)


def evaluate_predictions(
    pred: pd.DataFrame,
    task: str,
    classes: Sequence[str] | None,
    protocol: str = "default",
    n_boot: int = 1000,
    seed: int = 0,
    threshold: str = "auto",
) -> tuple[dict, pd.DataFrame]:
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
    threshold : binary decision rule, 'auto', 'youden' or 'argmax' (:mod:`mil.evaluation`);
        the metrics at both cuts are reported whatever the rule.

    Returns
    -------
    metrics : ``{"folds": [...], "mean": {...}, "std": {...}, "protocol", "task", ...}``
    pred : a copy with ``prediction`` (classification) or ``risk_group`` (survival) and the
        per-fold ``threshold``.
    """
    from mil.evaluation import describe_rule, family_names, threshold_families
    from mil.metrics import logrank_test, summarize_folds

    if protocol not in PROTOCOLS:
        raise ConfigError(f"The 'protocol' parameter must be one of {', '.join(PROTOCOLS)}. Got {protocol!r} instead.")
    pred = pred.copy()
    folds = []
    kind = task
    if task == "classification":
        if classes is None or len(classes) < 2:
            raise ConfigError(f"classification needs at least two classes; got {classes!r}")
        kind = "binary" if len(classes) == 2 else "multiclass"
        cols = _prob_columns(classes)
        pred["prediction"] = ""
    pred["threshold"] = np.nan
    for s, f in _units(pred):
        rows = _unit_rows(pred, s, f)
        test = rows[rows["split"] == "test"]
        if test.empty:
            raise ConfigError(f"fold {f} (seed {s}) has no test predictions")
        thr_rows, source = _threshold_rows(rows, protocol)
        record: dict[str, Any] = {"fold": f, "seed": s}
        if kind == "binary":
            pos = cols[1]
            if thr_rows.empty:
                raise CheckpointError(
                    f"fold {f} (seed {s}) has no validation slides in splits.csv, so no threshold can be "
                    "chosen honestly; retrain with a validation split or use --protocol paper"
                )
            # the paper protocol reproduces the official code: Youden's cut on the test fold
            rule = "youden" if protocol == "paper" and threshold == "auto" else threshold
            choice = binary_threshold(_labels_index(thr_rows, classes), thr_rows[pos].to_numpy(float), rule)
            thr = choice.value
            if choice.youden is None:
                log.warning("fold %s seed %s: %s", f, s, choice.reason)
            elif choice.rule != rule:
                log.info("fold %s seed %s: %s", f, s, choice.reason)
            y = _labels_index(test, classes)
            p_test = test[pos].to_numpy(float)
            record.update(_binary_fold(y, p_test, thr, n_boot, seed))
            record.update(threshold_families(y, p_test, choice))
            record["threshold"] = thr
            record["threshold_rule"] = choice.rule
            record["threshold_from"] = f"{source}: {choice.reason}"
            if not math.isfinite(thr):
                record["threshold_from"] += (": no cut beats chance (Youden's J <= 0), so nothing is called "
                                             "positive (threshold +inf, written as null)")
                log.warning("fold %s seed %s: the %s scores separate no better than chance; no slide is "
                            "called positive", f, s, source)
            record["n_threshold_set"] = int(len(thr_rows))
            record["n_threshold_set_pos"], record["n_threshold_set_neg"] = choice.n_pos, choice.n_neg
            idx = rows.index
            pred.loc[idx, "threshold"] = thr
            pred.loc[idx, "prediction"] = np.where(pred.loc[idx, pos].to_numpy(float) >= thr, classes[1], classes[0])
        elif kind == "multiclass":
            y = _labels_index(test, classes)
            record.update(_multiclass_fold(y, test[cols].to_numpy(float), n_boot, seed))
            idx = rows.index
            pred.loc[idx, "prediction"] = [classes[i] for i in np.argmax(pred.loc[idx, cols].to_numpy(float), 1)]
        elif task == "survival":
            if thr_rows.empty:
                raise CheckpointError(
                    f"fold {f} (seed {s}) has no validation slides in splits.csv, so the risk groups cannot "
                    "be split honestly; retrain with a validation split or use --protocol paper"
                )
            thr = float(np.median(thr_rows["risk"].to_numpy(float)))
            t, e, r = (test[c].to_numpy(float) for c in ("time", "event", "risk"))
            record.update(_survival_fold(t, e.astype(np.int64), r, n_boot, seed))
            high = r > thr
            stat, p = logrank_test(t[high], e[high].astype(int), t[~high], e[~high].astype(int))
            record.update(risk_threshold=thr, threshold_from=source, logrank_p=p,
                          n_high=int(high.sum()), n_low=int((~high).sum()))
            idx = rows.index
            pred.loc[idx, "threshold"] = thr
            pred.loc[idx, "risk_group"] = np.where(pred.loc[idx, "risk"].to_numpy(float) > thr, "high", "low")
        else:
            raise ConfigError(f"The 'task' parameter must be classification or survival. Got {task!r} instead.")
        folds.append(record)

    names = {"binary": BINARY_METRICS + ("threshold",) + family_names(), "multiclass": MULTICLASS_METRICS,
             "survival": SURVIVAL_METRICS + ("logrank_p",)}[kind]
    mean, std = summarize_folds([{k: r[k] for k in names if k in r} for r in folds])
    metrics: dict[str, Any] = {
        "folds": folds,
        "mean": mean,
        "std": std,
        "protocol": PROTOCOLS[protocol],
        "task": task,
        "kind": kind,
        "n_boot": n_boot,
        "ci": "95% percentile bootstrap over the test slides of each fold (stratified)",
    }
    if kind != "survival":
        metrics["classes"] = list(classes)
    if kind == "binary":
        metrics["positive_class"] = classes[1]
        metrics["threshold_setting"] = threshold
        metrics["threshold_rule"] = describe_rule() if threshold == "auto" else threshold
        metrics["threshold_families"] = ("accuracy, balanced_accuracy, f1, sensitivity, specificity also at "
                                         "argmax (<name>_at_argmax, p >= 0.5) and at the Youden cut of the "
                                         "threshold set (<name>_at_youden)")
    if task == "survival":
        metrics["km"] = km_summary(pred)
    return metrics, pred


def km_summary(pred: pd.DataFrame) -> dict:
    """Log-rank test of the pooled test slides of the first seed, by their fold's risk group."""
    from mil.metrics import logrank_test

    test = _first_seed(pred[pred["split"] == "test"])
    high = (test["risk_group"] == "high").to_numpy()
    t, e = test["time"].to_numpy(float), test["event"].to_numpy(float).astype(int)
    stat, p = logrank_test(t[high], e[high], t[~high], e[~high])
    seed = _seed_value(test["seed"].iloc[0]) if len(test) else None
    return {"seed": seed, "logrank_statistic": stat, "logrank_p": p, "n_high": int(high.sum()),
            "n_low": int((~high).sum()),
            "split": "test slides of every fold, each split at its fold's median validation risk"}


def _first_seed(rows: pd.DataFrame) -> pd.DataFrame:
    if rows.empty:
        return rows
    seeds = rows["seed"].map(_seed_value)
    if seeds.isna().all():
        return rows
    return rows[seeds == seeds.dropna().min()]


def ensemble_predictions(
    pred: pd.DataFrame,
    task: str,
    classes: Sequence[str] | None,
    thresholds: Sequence[float],
) -> pd.DataFrame:
    """Mean over fold models of each slide's probabilities (or risk), one row per slide.

    ``thresholds``: the folds' own thresholds (binary: Youden on validation; survival: median
    validation risk); the ensemble's threshold is their mean.
    """
    thr = float(np.mean(thresholds)) if len(thresholds) else float("nan")
    if task == "classification":
        value_cols = _prob_columns(classes)
    else:
        value_cols = ["risk"] + [c for c in pred.columns if c.startswith("surv_bin_")]
    keep = [c for c in ("label", "time", "event") if c in pred.columns]
    grouped = pred.groupby("slide_id", sort=False)
    ens = grouped[value_cols].mean()
    for c in keep:
        ens[c] = grouped[c].first()
    ens = ens.reset_index()
    ens.insert(1, "seed", "")
    ens.insert(2, "fold", "ensemble")
    ens.insert(3, "split", pred["split"].iloc[0] if len(pred) else "external")
    ens["n_models"] = grouped.size().to_numpy()
    ens["threshold"] = thr
    if task == "classification":
        if len(classes) == 2:
            ens["prediction"] = np.where(ens[value_cols[1]].to_numpy(float) >= thr, classes[1], classes[0])
        else:
            ens["prediction"] = [classes[i] for i in np.argmax(ens[value_cols].to_numpy(float), 1)]
    else:
        ens["risk_group"] = np.where(ens["risk"].to_numpy(float) > thr, "high", "low")
    return ens


def format_table(metrics: dict) -> str:
    """Fold rows and a mean ± std row of the headline metrics, as plain text."""
    kind = metrics.get("kind", metrics.get("task"))
    names = {"binary": ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "threshold"),
             "multiclass": MULTICLASS_METRICS, "survival": ("c_index", "logrank_p")}.get(kind, ())
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


# ---------------------------------------------------------------------------------------------
# the experiment on disk
# ---------------------------------------------------------------------------------------------

@dataclass
class FoldUnit:
    """One trained model: a fold of a seed, with its slides."""

    seed: int | None
    fold: int
    dir: Path
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    @property
    def checkpoint(self) -> Path:
        return self.dir / "best.pt"

    @property
    def name(self) -> str:
        return f"fold {self.fold}" if self.seed is None else f"seed {self.seed} fold {self.fold}"


@dataclass
class Experiment:
    dir: Path
    config: dict
    units: list[FoldUnit]
    features_dir: Path | None
    manifest_path: Path | None
    classes: list[str] | None
    task: str | None


def _find_key(config: dict, names: Sequence[str]) -> Any:
    """The first of ``names`` at the top level of ``config`` or one section down."""
    for name in names:
        if config.get(name) not in (None, ""):
            return config[name]
    for value in config.values():
        if isinstance(value, dict):
            for name in names:
                if value.get(name) not in (None, ""):
                    return value[name]
    return None


def _resolve(path: Any, base: Path) -> Path | None:
    if path in (None, ""):
        return None
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def load_experiment(ws: Workspace, name: str) -> Experiment:
    """Read an experiment folder: config.yaml, labels.json, splits.csv and the fold folders.

    Raises
    ------
    CheckpointError
        The experiment does not exist, has no splits.csv, or a fold listed in splits.csv has no
        ``best.pt`` (the message names the fold and says to resume training).
    """
    import yaml

    exp_dir = ws.experiment_dir(name)
    if not exp_dir.is_dir():
        found = sorted(p.name for p in exp_dir.parent.iterdir() if p.is_dir()) if exp_dir.parent.is_dir() else []
        if found:
            hint = f"pick one of {', '.join(found)}, or train it first with `wsi-pipeline train --experiment {name}`"
        else:
            hint = (f"there are no experiments under {exp_dir.parent}; check --workspace, or train it first "
                    f"with `wsi-pipeline train --experiment {name}`")
        raise CheckpointError(f"{exp_dir}: no such experiment; {hint}")
    config: dict = {}
    if (exp_dir / "config.yaml").is_file():
        config = yaml.safe_load((exp_dir / "config.yaml").read_text()) or {}
    splits_path = exp_dir / "splits.csv"
    if not splits_path.is_file():
        raise CheckpointError(
            f"{splits_path}: missing; the experiment was not trained to the point of writing its splits. "
            f"Run `wsi-pipeline train --experiment {name} --resume`"
        )
    splits = pd.read_csv(splits_path, dtype={"slide_id": str, "split": str})
    missing_cols = {"slide_id", "fold", "split"} - set(splits.columns)
    if missing_cols:
        raise CheckpointError(f"{splits_path}: missing column(s) {sorted(missing_cols)}; expected slide_id, seed, fold, split")
    if "seed" not in splits.columns:
        splits["seed"] = None

    units: list[FoldUnit] = []
    missing: list[str] = []
    seeds = splits["seed"].map(_seed_value)
    multi_seed = seeds.nunique(dropna=True) > 1  # the trainer's layout: seed_<s>/ only with several seeds
    for (seed, fold), rows in splits.groupby([seeds.fillna(-1).astype(int), splits["fold"].astype(int)], sort=True):
        seed = None if seed == -1 else int(seed)
        sub = f"seed_{seed}/fold_{fold}" if multi_seed and seed is not None else f"fold_{fold}"
        unit = FoldUnit(seed, int(fold), exp_dir / sub,
                        val=rows.loc[rows["split"] == "val", "slide_id"].tolist(),
                        test=rows.loc[rows["split"] == "test", "slide_id"].tolist())
        if not unit.checkpoint.is_file():
            missing.append(f"{unit.name} ({unit.checkpoint} not found)")
        elif not (unit.dir / "done.json").is_file():
            # best.pt is written during training: without done.json the fold was interrupted
            missing.append(f"{unit.name} (unfinished: {unit.dir / 'done.json'} not found)")
        units.append(unit)
    if missing:
        raise CheckpointError(
            f"experiment {name!r}: {len(missing)} fold(s) listed in splits.csv have no trained model: "
            + "; ".join(missing)
            + f". Finish training with `wsi-pipeline train --experiment {name} --resume` and evaluate again"
        )
    if not units:
        raise CheckpointError(f"{splits_path}: no folds listed")

    classes = task = None
    labels_path = exp_dir / "labels.json"
    if labels_path.is_file():
        labels = json.loads(labels_path.read_text())
        task = labels.get("task")
        if labels.get("classes") is not None:
            classes = [str(c) for c in labels["classes"]]
        elif isinstance(labels.get("mapping"), dict):
            classes = [str(c) for c, _ in sorted(labels["mapping"].items(), key=lambda kv: kv[1])]
    task = task or _find_key(config, ("task",))
    features = _resolve(_find_key(config, ("features_dir", "features")), exp_dir)
    manifest = _resolve(_find_key(config, ("manifest", "manifest_path")), exp_dir)
    return Experiment(exp_dir, config, units, features, manifest, classes, task)


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------

def _checkpoint_meta(path: Path) -> dict:
    """Task, classes, bins and sizes recorded in a checkpoint (weights not built)."""
    from mil.trainer import read_checkpoint

    ckpt = read_checkpoint(path)
    return {k: ckpt.get(k) for k in ("task", "n_classes", "classes", "bin_edges", "in_dim", "model",
                                     "seed", "fold", "val_threshold", "protocol", "mhim")}


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _score(unit: FoldUnit, bags, ids: Sequence[str], device, task: str, which: str = "student") -> list[dict]:
    """Predictions of one fold model (its student, or its MHIM teacher) on ``ids``: dicts with prob
    or risk, survival and instance scores."""
    from mil.trainer import load_student, predict_bags

    ids = [s for s in ids if s in bags]
    if not ids:
        return []
    model = load_student(unit.checkpoint, device, which=which)
    meta = getattr(model, "wsi_meta", {}) or {}
    if meta.get("task") not in (None, task):
        raise CheckpointError(f"{unit.checkpoint}: a {meta['task']} model in a {task} experiment; "
                              "the fold folders come from different experiments")
    outputs = predict_bags(model, bags.subset(ids), device, task=task)
    rows = []
    for out in outputs:
        row = {"slide_id": out["slide_id"], "instance_scores": _as_array(out.get("instance_scores", [])).reshape(-1)}
        if task == "survival":
            row["risk"] = float(out["risk"])
            row["surv"] = _as_array(out["survival"]).reshape(-1)
        else:
            row["prob"] = _as_array(out["prob"]).reshape(-1)
        rows.append(row)
    del model
    return rows


def _teacher_metrics(units, bags, protocol: str, device, task: str, classes, truth: dict, n_boot: int,
                     threshold: str) -> dict | None:
    """The MHIM teacher (EMA model) of every fold, scored and summarised like the student, as the
    official code logs it; None for a baseline experiment."""
    from mil.trainer import read_checkpoint

    if not all(read_checkpoint(u.checkpoint).get("teacher") is not None for u in units):
        return None
    records: list[dict] = []
    for unit in units:
        splits = (("test", unit.test),) if protocol == "paper" else (("val", unit.val), ("test", unit.test))
        for split, ids in splits:
            records += _table_rows(_score(unit, bags, ids, device, task, which="teacher"), unit, split, task,
                                   classes, truth)
    t_metrics, _ = evaluate_predictions(pd.DataFrame(records), task, classes, protocol, n_boot, threshold=threshold)
    return {"folds": t_metrics["folds"], "mean": t_metrics["mean"], "std": t_metrics["std"],
            "note": "the MHIM teacher (EMA of the student) saved with each fold's selected epoch, scored on "
                    "the same slides with the same threshold rule"}


def _table_rows(scored: list[dict], unit: FoldUnit | None, split: str, task: str,
                classes: Sequence[str] | None, truth: dict[str, dict]) -> list[dict]:
    out = []
    for r in scored:
        row: dict[str, Any] = {"slide_id": r["slide_id"],
                               "seed": "" if unit is None or unit.seed is None else unit.seed,
                               "fold": "" if unit is None else unit.fold, "split": split}
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
                raise CheckpointError(
                    f"{unit.checkpoint if unit else 'model'} outputs {len(prob)} classes but the experiment "
                    f"has {len(classes)} ({', '.join(classes)}); it belongs to another experiment"
                )
            for c, p in zip(classes, prob):
                row[f"prob_{c}"] = float(p)
        out.append(row)
    return out


def _truth(manifest, task: str, classes: Sequence[str] | None, require: bool) -> dict[str, dict]:
    """Ground truth per slide from manifest rows: class name (canonical) or time/event."""
    truth: dict[str, dict] = {}
    problems = []
    for row in manifest.rows:
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
            f"{manifest.path}: {len(problems)} slide(s) cannot be scored against the experiment's "
            f"{'time/event' if task == 'survival' else 'classes'}: " + "; ".join(problems[:30])
        )
    return truth


def _canonical_label(label: str, classes: Sequence[str]) -> str | None:
    label = str(label).strip()
    if label in classes:
        return label
    if re.fullmatch(r"[0-9]+", label) and all(re.fullmatch(r"[0-9]+", c) for c in classes):
        value = int(label)
        if 0 <= value < len(classes):
            return classes[value]
    return None


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------

def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_outputs(out_dir: Path, metrics: dict, pred: pd.DataFrame, protocol: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pred.copy()
    table["protocol"] = protocol
    _write_text(out_dir / "predictions.csv", table.to_csv(index=False, float_format="%.8g"))
    _write_text(out_dir / "metrics.json", json.dumps(_finite_or_none(metrics), indent=2) + "\n")


def _figures(out_dir: Path, metrics: dict, pred: pd.DataFrame, classes, title: str,
             ensemble: pd.DataFrame | None = None) -> None:
    from .plots import km_plot, roc_plot

    subtitle = f"protocol: {metrics['protocol']}"
    kind = metrics["kind"]
    if kind == "binary":
        pos = f"prob_{classes[1]}"
        curves = {}
        several_seeds = len({f["seed"] for f in metrics["folds"]}) > 1
        for f in metrics["folds"]:
            rows = _unit_rows(pred, f["seed"], f["fold"])
            rows = rows[(rows["split"] == "test") | (rows["split"] == "external")]
            name = f"seed {f['seed']} fold {f['fold']}" if several_seeds else f"fold {f['fold']}"
            curves[name] = (_labels_index(rows, classes) == 1, rows[pos].to_numpy(float))
        extra = None
        if ensemble is not None and "label" in ensemble:
            extra = (ensemble["label"].astype(str) == classes[1], ensemble[pos].to_numpy(float))
        save_png(out_dir / "roc.png", roc_plot(curves, title=f"{title}: ROC ({classes[1]} positive)",
                                                 subtitle=subtitle, ensemble=extra))
    elif kind == "survival":
        rows = ensemble if ensemble is not None else _first_seed(pred[pred["split"] == "test"])
        km = metrics.get("km") or {}
        if ensemble is not None:
            how = "ensemble risk split at the mean of the folds' median validation risks"
        else:
            how = "test slides split at the median validation risk of their fold"
            if len({f["seed"] for f in metrics["folds"]}) > 1:
                how += f" (seed {km.get('seed')})"
        high = (rows["risk_group"] == "high").to_numpy()
        t, e = rows["time"].to_numpy(float), rows["event"].to_numpy(float).astype(int)
        save_png(out_dir / "km.png", km_plot(
            {"high predicted risk": (t[high], e[high]), "low predicted risk": (t[~high], e[~high])},
            p_value=km.get("logrank_p"), title=f"{title}: Kaplan-Meier",
            subtitle=subtitle + "\n" + how))


def _instance_outputs(ws: Workspace, out_dir: Path, rows: pd.DataFrame, chosen_from: pd.DataFrame, instance: dict,
                      bags, features_dir: Path, manifest, *, spans, ensemble_of, group_of: dict, task: str, classes,
                      model: str, n_heat: int | None, mode: str, cmap: str, k: int, tag: str) -> None:
    """Per-slide instance-score HDF5 (every slide of ``rows``), QuPath GeoJSON, and heatmaps of the
    ``n_heat`` slides of ``chosen_from`` ranked first (:mod:`pipeline.instance_outputs`)."""
    from mil.data import find_bag

    from . import instance_outputs as io

    slides = io.collect_slides(rows, instance, bags.coords, task, classes, spans, ensemble_of)
    cache: dict[str, dict] = {}

    def geometry(sid: str, coords: np.ndarray) -> dict:
        if sid not in cache:
            cache[sid] = io.patch_geometry(find_bag(features_dir, sid), ws.coords_path(features_dir.name, sid),
                                           sid, coords)
        return cache[sid]

    for sid, slide in slides.items():
        if slide.coords is None or not len(slide.coords):
            log.warning("instance scores of %s not written: the bag has no patch coordinates", sid)
            continue
        try:
            io.write_instance_file(out_dir / "instance_scores" / f"{sid}.h5", slide, geometry(sid, slide.coords),
                                   group_of, task, classes)
        except PipelineError as exc:
            log.warning("instance scores of %s not written: %s", sid, str(exc).splitlines()[0])
    io.write_geojson_files(slides, out_dir, geometry)
    if n_heat != 0:
        io.draw_heatmaps(slides, io.heatmap_rows(chosen_from, n_heat, task, classes), out_dir, manifest, geometry,
                         task=task, classes=classes, model=model, mode=mode, cmap=cmap, k=k, tag=tag)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------

def evaluation_dir(ws: Workspace, experiment: str, protocol: str) -> Path:
    """``evaluation/`` (default protocol) or ``evaluation_paper/`` (kept apart on purpose)."""
    base = ws.evaluation_dir(experiment)
    return base if protocol == "default" else base.with_name("evaluation_paper")


def run_evaluation(
    workspace: str | Path,
    experiment: str,
    protocol: str = "default",
    heatmaps: int | str | None = 0,
    manifest: str | Path | None = None,
    features: str | Path | None = None,
    device: str = "auto",
    n_boot: int = 1000,
    gallery_k: int = 8,
    cmap: str = "viridis",
    threshold: str = "auto",
    heatmap_mode: str = "absolute",
) -> Path:
    """Evaluate a trained experiment; returns the folder holding metrics.json.

    Parameters
    ----------
    workspace, experiment : the workspace folder and the experiment name under ``experiments/``.
    protocol : 'default' (thresholds from validation) or 'paper' (from the test fold; optimistic,
        written to ``evaluation_paper/``).
    heatmaps : number of slides to draw (the test slides with the highest positive probability or
        risk first), or 'all'.
    manifest, features : an external test set (both given, manifest other than the experiment's):
        every fold model scores every slide and the mean is reported. ``features`` alone replaces
        the experiment's feature folder; ``manifest`` alone replaces its manifest (moved slides).
    device : auto | cpu | cuda | cuda:N.
    n_boot : bootstrap replicates for the 95% intervals.
    gallery_k : patches per gallery row.
    cmap : heatmap colormap.
    heatmap_mode : 'absolute' (bag probability x relative attention, one colour range for every
        slide) or 'rank' (percentile within each slide); the instance-score files hold both.
    """
    from .manifest import load_manifest

    if protocol not in PROTOCOLS:
        raise ConfigError(f"The 'protocol' parameter must be one of {', '.join(PROTOCOLS)}. Got {protocol!r} instead.")
    n_heat = parse_heatmaps(heatmaps)
    ws = Workspace(workspace)
    exp = load_experiment(ws, experiment)
    from mil.data import load_bags  # torch: only once the experiment is known to exist

    trained_on_test = [u.name for u in exp.units if set(u.val) & set(u.test)]
    if protocol == "default" and (trained_on_test or (exp.config.get("train") or {}).get("protocol") == "paper"):
        # the models were selected on their test folds: no threshold choice can make that honest
        log.warning("experiment %s was trained with protocol 'paper' (validation = test fold%s): its evaluation "
                    "is labelled paper (optimistic) and written to evaluation_paper/", experiment,
                    f" in {', '.join(trained_on_test[:4])}" if trained_on_test else "")
        protocol = "paper"
    meta = _checkpoint_meta(exp.units[0].checkpoint)
    task = meta.get("task") or exp.task or "classification"
    classes = [str(c) for c in meta["classes"]] if meta.get("classes") else exp.classes
    if task == "classification" and not classes:
        n = int(meta.get("n_classes") or 0)
        if n < 2:
            raise CheckpointError(
                f"{exp.dir}: cannot tell the class names (no labels.json, none in {exp.units[0].checkpoint}); "
                "retrain the experiment with this version of wsi-pipeline"
            )
        classes = [str(i) for i in range(n)]
    from mil.trainer import resolve_device

    dev = resolve_device(device or "auto")

    manifest_path = Path(manifest).resolve() if manifest is not None else None
    if manifest_path is not None and not manifest_path.is_file():
        raise ManifestError(f"{manifest}: manifest not found; pass an existing CSV with --manifest")
    features_dir = Path(features).resolve() if features is not None else None
    external = (manifest_path is not None and features_dir is not None
                and (exp.manifest_path is None or manifest_path != exp.manifest_path.resolve()))
    own_features = exp.features_dir if (external or features_dir is None) else features_dir
    own_manifest_path = exp.manifest_path if (external or manifest_path is None) else manifest_path
    if own_features is None:
        raise ConfigError(f"{exp.dir}/config.yaml records no feature folder; pass --features DIR")
    if own_manifest_path is None or not own_manifest_path.is_file():
        raise ConfigError(
            f"the experiment's manifest {own_manifest_path or '(not recorded)'} is not there; pass --manifest "
            "with the manifest the experiment was trained on"
        )
    own_manifest = load_manifest(own_manifest_path, check_files=False)
    by_case = _find_key(exp.config, ("bag",)) == "case"  # bag: case: predictions are per case
    truth_source = own_manifest
    if by_case:
        if external:
            raise ConfigError(f"experiment {experiment!r} has one bag per case (bag: case); scoring an external "
                              "set is per slide only: evaluate it with a bag: slide experiment")
        from types import SimpleNamespace

        from mil.cases import group_cases

        case_rows, members = group_cases(own_manifest.rows, task)
        truth_source = SimpleNamespace(rows=case_rows, path=own_manifest.path)
    own_truth = _truth(truth_source, task, classes, require=False)

    base = evaluation_dir(ws, experiment, protocol)
    out_dir = base / f"external_{re.sub(r'[^A-Za-z0-9._-]+', '_', manifest_path.stem)}" if external else base
    title = f"{experiment}" + (f" on {manifest_path.stem}" if external else "")
    tag = "  [paper protocol: optimistic]" if protocol == "paper" else ""
    model = str(meta.get("model")) + (" (MHIM student)" if meta.get("mhim") else "")
    heat = dict(group_of={(u.seed, u.fold): u.dir.relative_to(exp.dir).as_posix() for u in exp.units},
                model=model, mode=heatmap_mode, cmap=cmap, k=gallery_k, tag=tag)

    # 1. each fold model on its own validation and test slides
    need = sorted({s for u in exp.units for s in (u.test + ([] if protocol == "paper" else u.val))})
    qc_filter = exp.config.get("qc_filter")  # the patches training saw
    if by_case:
        from mil.cases import case_bags

        slide_bags = load_bags(own_features, [s for c in need for s in members.get(c, [])], allow_missing=True,
                               qc_filter=qc_filter)
        bags, spans = case_bags(slide_bags, {c: members[c] for c in need if c in members})
    else:
        bags = load_bags(own_features, need, allow_missing=True, qc_filter=qc_filter)
    missing = [s for s in need if s not in bags]
    if missing:
        log.warning("%d slide(s) of the splits have no bag and are left out: %s", len(missing), ", ".join(missing[:20]))
    unlabelled = [s for s in need if s in bags and s not in own_truth]
    if unlabelled:
        hint = ("pass the manifest the experiment was trained on, or add --features for an external test set"
                if manifest_path is not None and not external else "add their labels to the manifest")
        raise ManifestError(f"{own_manifest_path}: no ground truth for {len(unlabelled)} slide(s) of the experiment's "
                            f"splits ({', '.join(unlabelled[:20])}); {hint}")
    records: list[dict] = []
    instance: dict[tuple, np.ndarray] = {}
    for unit in exp.units:
        log.info("%s: scoring %d validation and %d test slides", unit.name, len(unit.val), len(unit.test))
        splits = (("test", unit.test),) if protocol == "paper" else (("val", unit.val), ("test", unit.test))
        for split, ids in splits:
            scored = _score(unit, bags, ids, dev, task)
            records += _table_rows(scored, unit, split, task, classes, own_truth)
            if split == "test":
                for r in scored:
                    instance[(unit.seed, unit.fold, r["slide_id"])] = r["instance_scores"]
    pred = pd.DataFrame(records)
    metrics, pred = evaluate_predictions(pred, task, classes, protocol, n_boot, threshold=threshold)
    teacher = _teacher_metrics(exp.units, bags, protocol, dev, task, classes, own_truth, n_boot, threshold)
    if teacher is not None:
        metrics["teacher"] = teacher
    metrics["experiment"] = experiment
    metrics["format_version"] = FORMAT_VERSION
    if missing:
        metrics["missing_bags"] = missing

    if not external:
        metrics["features"] = str(own_features)
        _write_outputs(out_dir, metrics, pred, PROTOCOLS[protocol])
        _figures(out_dir, metrics, pred, classes, title)
        _write_run_config(out_dir, _run_record(experiment, protocol, n_heat, own_manifest_path,
                                                     own_features, device, n_boot, gallery_k, cmap, threshold,
                                                     heatmap_mode))
        test_rows = pred[pred["split"] == "test"]
        _instance_outputs(ws, out_dir, test_rows, _first_seed(test_rows), instance, bags, own_features, own_manifest,
                          spans=spans if by_case else None, ensemble_of=None, task=task, classes=classes,
                          n_heat=n_heat, **heat)
        log.debug("\n%s", format_table(metrics))
        return out_dir

    # 2. external: every fold model scores every slide; the ensemble is their mean
    all_thresholds = [f.get("threshold", f.get("risk_threshold")) for f in metrics["folds"]]
    # a fold whose validation scores beat chance nowhere has threshold +inf: left out of the mean
    thresholds = [t for t in all_thresholds if t is not None and math.isfinite(t)]
    ext_manifest = load_manifest(manifest_path, check_files=False)
    has_truth = ("time" in ext_manifest.columns and "event" in ext_manifest.columns) if task == "survival" \
        else "label" in ext_manifest.columns
    ext_truth = _truth(ext_manifest, task, classes, require=False) if has_truth else {}
    ext_bags = load_bags(features_dir, ext_manifest.slide_ids, allow_missing=True, qc_filter=qc_filter)
    ext_missing = [s for s in ext_manifest.slide_ids if s not in ext_bags]
    ext_records: list[dict] = []
    ext_instance: dict[str, list[np.ndarray]] = {}
    for unit in exp.units:
        log.info("%s: scoring %d external slides", unit.name, len(ext_bags))
        scored = _score(unit, ext_bags, ext_bags.slide_ids, dev, task)
        ext_records += _table_rows(scored, unit, "external", task, classes, ext_truth)
        for r in scored:
            ext_instance.setdefault(r["slide_id"], []).append(r["instance_scores"])
    ext_pred = pd.DataFrame(ext_records)
    ens = ensemble_predictions(ext_pred, task, classes, thresholds)
    fold_thr = {(f["seed"], f["fold"]): f.get("threshold", f.get("risk_threshold")) for f in metrics["folds"]}
    ext_metrics = _external_metrics(ext_pred, ens, task, classes, fold_thr, n_boot,
                                    labelled=bool(ext_truth) and all(s in ext_truth for s in ens["slide_id"]))
    ext_metrics.update(protocol=PROTOCOLS[protocol], task=task, experiment=experiment,
                       manifest=str(manifest_path), features=str(features_dir),
                       ensemble_threshold=float(np.mean(thresholds)) if thresholds else None,
                       fold_thresholds=all_thresholds, format_version=FORMAT_VERSION,
                       threshold_from="mean of the folds' thresholds chosen on "
                       + ("their test folds (paper protocol)" if protocol == "paper" else "their validation sets"))
    if task == "classification":
        ext_metrics["classes"] = list(classes)
    if ext_missing:
        ext_metrics["missing_bags"] = ext_missing
        log.warning("%d external slide(s) have no bag and are left out: %s", len(ext_missing), ", ".join(ext_missing[:20]))
    table = pd.concat([_external_decisions(ext_pred, task, classes, fold_thr), ens], ignore_index=True)
    _write_outputs(out_dir, ext_metrics, table, PROTOCOLS[protocol])
    if ext_metrics.get("labelled"):
        _figures(out_dir, ext_metrics, ext_pred, classes, title, ensemble=ens)
    _write_run_config(out_dir, _run_record(experiment, protocol, n_heat, manifest_path, features_dir,
                                                 device, n_boot, gallery_k, cmap, threshold, heatmap_mode))
    ext_instance = {(u.seed, u.fold, sid): scores[i] for sid, scores in ext_instance.items()
                    for i, u in enumerate(exp.units) if i < len(scores)}
    ensemble_of = {sid: [(u.seed, u.fold) for u in exp.units] for sid in ens["slide_id"]}
    _instance_outputs(ws, out_dir, pd.concat([ext_pred, ens], ignore_index=True), ens, ext_instance, ext_bags,
                      features_dir, ext_manifest, spans=None, ensemble_of=ensemble_of, task=task, classes=classes,
                      n_heat=n_heat, **heat)
    log.debug("\n%s", format_table(ext_metrics))
    return out_dir


def _run_record(experiment, protocol, heatmaps, manifest, features, device, n_boot, gallery_k, cmap,
                threshold="auto", heatmap_mode="absolute") -> dict:
    return {"threshold": threshold, "experiment": experiment, "protocol": protocol, "protocol_label": PROTOCOLS[protocol],
            "heatmaps": "all" if heatmaps is None else heatmaps, "manifest": str(manifest) if manifest else None,
            "features": str(features) if features else None, "device": device, "n_boot": n_boot,
            "gallery_k": gallery_k, "cmap": cmap, "heatmap_mode": heatmap_mode}


def _write_run_config(out_dir: Path, record: dict) -> None:
    import yaml

    _write_text(out_dir / "evaluate_config.yaml", yaml.safe_dump(record, sort_keys=False))


def _external_decisions(pred: pd.DataFrame, task: str, classes, fold_thr: dict) -> pd.DataFrame:
    """Per-model external rows with each model's own decision (its fold's threshold)."""
    pred = pred.copy()
    pred["threshold"] = np.nan
    if task == "classification":
        pred["prediction"] = ""
    for (s, f), thr in fold_thr.items():
        idx = _unit_rows(pred, s, f).index
        if task == "classification":
            cols = _prob_columns(classes)
            if len(classes) == 2:
                pred.loc[idx, "threshold"] = thr
                pred.loc[idx, "prediction"] = np.where(pred.loc[idx, cols[1]].to_numpy(float) >= thr, classes[1], classes[0])
            else:
                pred.loc[idx, "prediction"] = [classes[i] for i in np.argmax(pred.loc[idx, cols].to_numpy(float), 1)]
        else:
            pred.loc[idx, "threshold"] = thr
            pred.loc[idx, "risk_group"] = np.where(pred.loc[idx, "risk"].to_numpy(float) > thr, "high", "low")
    return pred


def _external_metrics(pred: pd.DataFrame, ens: pd.DataFrame, task: str, classes, fold_thr: dict,
                      n_boot: int, labelled: bool) -> dict:
    """Per-model and ensemble metrics on an external set (empty when it has no labels)."""
    from mil.metrics import logrank_test, summarize_folds

    out: dict[str, Any] = {"labelled": labelled, "n_slides": int(len(ens)), "n_models": len(fold_thr)}
    if not labelled:
        out.update(folds=[], mean={}, std={}, ensemble=None,
                   note="the external manifest has no labels: predictions only")
        out["kind"] = "survival" if task == "survival" else ("binary" if len(classes) == 2 else "multiclass")
        return out
    folds = []
    if task == "survival":
        kind = "survival"
        for (s, f), thr in fold_thr.items():
            rows = _unit_rows(pred, s, f)
            t, e, r = (rows[c].to_numpy(float) for c in ("time", "event", "risk"))
            folds.append({"fold": f, "seed": s, **_survival_fold(t, e.astype(int), r, n_boot, 0), "risk_threshold": thr})
        t, e, r = (ens[c].to_numpy(float) for c in ("time", "event", "risk"))
        ensemble = _survival_fold(t, e.astype(int), r, n_boot, 0)
        high = (ens["risk_group"] == "high").to_numpy()
        stat, p = logrank_test(t[high], e[high].astype(int), t[~high], e[~high].astype(int))
        ensemble.update(logrank_p=p, n_high=int(high.sum()), n_low=int((~high).sum()))
        out["km"] = {"seed": None, "logrank_statistic": stat, "logrank_p": p, "n_high": int(high.sum()),
                     "n_low": int((~high).sum()), "split": "ensemble risk at the mean of the folds' median validation risks"}
        names = SURVIVAL_METRICS
    elif len(classes) == 2:
        kind = "binary"
        pos = f"prob_{classes[1]}"
        for (s, f), thr in fold_thr.items():
            rows = _unit_rows(pred, s, f)
            folds.append({"fold": f, "seed": s, **_binary_fold(_labels_index(rows, classes), rows[pos].to_numpy(float), thr, n_boot, 0),
                          "threshold": thr})
        thr = float(ens["threshold"].iloc[0])
        ensemble = {**_binary_fold(_labels_index(ens, classes), ens[pos].to_numpy(float), thr, n_boot, 0), "threshold": thr}
        names = BINARY_METRICS + ("threshold",)
    else:
        kind = "multiclass"
        cols = _prob_columns(classes)
        for (s, f), _ in fold_thr.items():
            rows = _unit_rows(pred, s, f)
            folds.append({"fold": f, "seed": s, **_multiclass_fold(_labels_index(rows, classes), rows[cols].to_numpy(float), n_boot, 0)})
        ensemble = _multiclass_fold(_labels_index(ens, classes), ens[cols].to_numpy(float), n_boot, 0)
        names = MULTICLASS_METRICS
    mean, std = summarize_folds([{k: r[k] for k in names if k in r} for r in folds])
    out.update(folds=folds, mean=mean, std=std, ensemble=ensemble, kind=kind)
    if kind == "binary":
        out["positive_class"] = classes[1]
    return out


def evaluate_command(args) -> int:
    """The ``evaluate`` subcommand: resolve config and flags, run, print the table."""
    from .config import resolve_stage
    from .logging_setup import attach_run_log

    inputs = resolve_stage(args, "evaluate", EvaluateConfig,
                           ("experiment", "features", "heatmaps", "protocol", "device", "threshold", "heatmap_mode"))
    attach_run_log(inputs.workspace, "evaluate", create_workspace=False)
    cfg = inputs.section
    experiment = cfg.experiment
    if experiment is None and inputs.raw:  # the same rule as train: train.experiment, name, recipe, model
        from .train_stage import config_experiment_name

        experiment = config_experiment_name(inputs.raw, Path(args.config).resolve().parent)
    if not experiment:
        raise ConfigError("no experiment: pass --experiment NAME (a folder under <workspace>/experiments)")
    features = cfg.features
    if features is not None and getattr(args, "features", None) is None and getattr(args, "config", None) is not None:
        features = Path(args.config).resolve().parent / features
    out_dir = run_evaluation(inputs.workspace, experiment, protocol=cfg.protocol, heatmaps=cfg.heatmaps,
                             manifest=inputs.manifest, features=features, device=cfg.device, n_boot=cfg.n_boot,
                             gallery_k=cfg.gallery_k, cmap=cfg.cmap, threshold=cfg.threshold,
                             heatmap_mode=cfg.heatmap_mode)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    print(format_table(metrics))
    print(f"metrics:     {out_dir / 'metrics.json'}\npredictions: {out_dir / 'predictions.csv'}")
    if (out_dir / "heatmaps").is_dir():
        print(f"heatmaps:    {out_dir / 'heatmaps'}")
    return 0
