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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from extract.errors import CheckpointError, ConfigError, ManifestError
from extract.runtime import atomic_write_text
from mil.evaluation import (
    PROTOCOLS,
    check_protocol,
    ensemble_predictions,
    evaluate_predictions,
    external_decisions,
    external_metrics,
    first_seed,
    format_table,
    ground_truth,
    json_safe,
    prediction_rows,
)

from .config import EvaluateConfig, parse_heatmaps
from .experiment import Experiment, FoldUnit, evaluation_dir, find_key, load_experiment
from .instance_outputs import write_instance_outputs
from .previews import save_png
from .workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["EvaluateConfig", "run_evaluation", "evaluate_command", "parse_heatmaps"]

FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# scoring: fold models on bags
# ---------------------------------------------------------------------------------------------

def _checkpoint_meta(path: Path) -> dict:
    """Task, classes, bins and sizes recorded in a checkpoint (weights not built)."""
    from mil.checkpoints import read_checkpoint

    ckpt = read_checkpoint(path)
    return {k: ckpt.get(k) for k in ("task", "n_classes", "classes", "bin_edges", "in_dim", "model",
                                     "seed", "fold", "val_threshold", "protocol", "mhim", "teacher")}


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _score(unit: FoldUnit, bags, ids: Sequence[str], device, task: str, which: str = "student") -> list[dict]:
    """Predictions of one fold model (its student, or its MHIM teacher) on ``ids``: dicts with prob
    or risk, survival and instance scores."""
    from mil.checkpoints import load_student
    from mil.inference import predict_bags

    ids = [s for s in ids if s in bags]
    if not ids:
        return []
    model = load_student(unit.checkpoint, device, which=which)
    meta = getattr(model, "wsi_meta", {}) or {}
    if meta.get("task") not in (None, task):
        raise CheckpointError(f"{unit.checkpoint}: a {meta['task']} model in a {task} experiment; "
                              "the fold folders come from different experiments")
    rows = []
    for out in predict_bags(model, bags.subset(ids), device, task=task):
        row = {"slide_id": out["slide_id"], "instance_scores": _as_array(out.get("instance_scores", [])).reshape(-1)}
        if task == "survival":
            row["risk"] = float(out["risk"])
            row["surv"] = _as_array(out["survival"]).reshape(-1)
        else:
            row["prob"] = _as_array(out["prob"]).reshape(-1)
        rows.append(row)
    del model
    return rows


def _score_units(run: "_Run", units: Sequence[FoldUnit], bags, truth: dict, external: bool = False,
                 which: str = "student") -> tuple[pd.DataFrame, dict[tuple, np.ndarray]]:
    """Every fold model on its validation and test slides (``paper``: test only), or on every
    external slide: the predictions table and the test instance scores by (seed, fold, slide)."""
    records: list[dict] = []
    instance: dict[tuple, np.ndarray] = {}
    for unit in units:
        if external:
            splits = (("external", bags.slide_ids),)
        else:
            splits = (("test", unit.test),) if run.protocol == "paper" else (("val", unit.val), ("test", unit.test))
        if which == "student":
            log.info("%s: scoring %s", unit.name, ", ".join(f"{len(ids)} {split}" for split, ids in splits))
        for split, ids in splits:
            scored = _score(unit, bags, ids, run.device, run.task, which=which)
            records += prediction_rows(scored, unit.seed, unit.fold, split, run.task, run.classes, truth,
                                       source=unit.checkpoint)
            if split != "val":
                instance.update({(unit.seed, unit.fold, r["slide_id"]): r["instance_scores"] for r in scored})
    return pd.DataFrame(records), instance


def _teacher_metrics(run: "_Run", bags, truth: dict) -> dict | None:
    """The MHIM teacher (EMA model) of every fold, scored and summarised like the student, as the
    official code logs it; None for a baseline experiment."""
    if not all(_checkpoint_meta(u.checkpoint).get("teacher") is not None for u in run.exp.units):
        return None
    pred, _ = _score_units(run, run.exp.units, bags, truth, which="teacher")
    t_metrics, _ = evaluate_predictions(pred, run.task, run.classes, run.protocol, run.n_boot, threshold=run.threshold)
    return {"folds": t_metrics["folds"], "mean": t_metrics["mean"], "std": t_metrics["std"],
            "note": "the MHIM teacher (EMA of the student) saved with each fold's selected epoch, scored on "
                    "the same slides with the same threshold rule"}


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------

def _write_outputs(run: "_Run", out_dir: Path, metrics: dict, pred: pd.DataFrame, record: dict) -> None:
    """predictions.csv, metrics.json and evaluate_config.yaml (the resolved settings)."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    table = pred.copy()
    table["protocol"] = PROTOCOLS[run.protocol]
    atomic_write_text(out_dir / "predictions.csv", table.to_csv(index=False, float_format="%.8g"))
    atomic_write_text(out_dir / "metrics.json", json.dumps(json_safe(metrics), indent=2) + "\n")
    atomic_write_text(out_dir / "evaluate_config.yaml", yaml.safe_dump(record, sort_keys=False))


def _write_figures(out_dir: Path, metrics: dict, pred: pd.DataFrame, classes, title: str,
                   ensemble: pd.DataFrame | None = None) -> None:
    from .plots import evaluation_figures

    for name, image in evaluation_figures(metrics, pred, classes, title, ensemble).items():
        save_png(out_dir / name, image)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------

@dataclass
class _Run:
    """What one evaluation settled before scoring: the experiment, task, device and settings."""

    ws: Workspace
    exp: Experiment
    name: str
    protocol: str
    task: str
    classes: list[str] | None
    device: Any
    n_boot: int
    threshold: str
    n_heat: int | None
    heat: dict
    record: dict


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

    check_protocol(protocol)
    n_heat = parse_heatmaps(heatmaps)
    ws = Workspace(workspace)
    exp = load_experiment(ws, experiment)
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
    from extract.runtime import resolve_device  # torch: only once the experiment is known to exist

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
    if external and find_key(exp.config, ("bag",)) == "case":
        raise ConfigError(f"experiment {experiment!r} has one bag per case (bag: case); scoring an external "
                          "set is per slide only: evaluate it with a bag: slide experiment")
    model = str(meta.get("model")) + (" (MHIM student)" if meta.get("mhim") else "")
    record = {"threshold": threshold, "experiment": experiment, "protocol": protocol,
              "protocol_label": PROTOCOLS[protocol], "heatmaps": "all" if n_heat is None else n_heat,
              "manifest": str(manifest_path if external else own_manifest_path),
              "features": str(features_dir if external else own_features), "device": device, "n_boot": n_boot,
              "gallery_k": gallery_k, "cmap": cmap, "heatmap_mode": heatmap_mode}
    run = _Run(ws, exp, experiment, protocol, task, classes, resolve_device(device or "auto"), n_boot, threshold,
               n_heat, dict(group_of={(u.seed, u.fold): u.dir.relative_to(exp.dir).as_posix() for u in exp.units},
                            model=model, mode=heatmap_mode, cmap=cmap, k=gallery_k,
                            tag="  [paper protocol: optimistic]" if protocol == "paper" else ""), record)
    own_manifest = load_manifest(own_manifest_path, check_files=False)
    metrics, bags, pred, instance, spans = _evaluate_own(run, own_manifest, own_features,
                                                         hint_external=manifest_path is not None and not external)
    base = evaluation_dir(ws, experiment, protocol)
    if not external:
        metrics["features"] = str(own_features)
        _write_outputs(run, base, metrics, pred, record)
        _write_figures(base, metrics, pred, classes, experiment)
        test_rows = pred[pred["split"] == "test"]
        write_instance_outputs(ws, base, test_rows, first_seed(test_rows), instance, bags, own_features, own_manifest,
                          spans=spans, ensemble_of=None, task=task, classes=classes, n_heat=n_heat, **run.heat)
        log.debug("\n%s", format_table(metrics))
        return base
    out_dir = base / f"external_{re.sub(r'[^A-Za-z0-9._-]+', '_', manifest_path.stem)}"
    return _evaluate_external(run, metrics, load_manifest(manifest_path, check_files=False), features_dir, out_dir)


def _evaluate_own(run: _Run, manifest, features_dir: Path, hint_external: bool):
    """Each fold model on its own validation and test slides: metrics (with the teacher's), the
    bags, the decided predictions table, the test instance scores and the case spans (or None)."""
    from mil.data import load_bags

    exp, task = run.exp, run.task
    by_case = find_key(exp.config, ("bag",)) == "case"  # bag: case: predictions are per case
    truth_rows = manifest.rows
    if by_case:
        from mil.cases import group_cases

        truth_rows, members = group_cases(manifest.rows, task)
    truth = ground_truth(truth_rows, task, run.classes, require=False, source=manifest.path)
    need = sorted({s for u in exp.units for s in (u.test + ([] if run.protocol == "paper" else u.val))})
    qc_filter = exp.config.get("qc_filter")  # the patches training saw
    spans = None
    if by_case:
        from mil.cases import case_bags

        slide_bags = load_bags(features_dir, [s for c in need for s in members.get(c, [])], allow_missing=True,
                               qc_filter=qc_filter)
        bags, spans = case_bags(slide_bags, {c: members[c] for c in need if c in members})
    else:
        bags = load_bags(features_dir, need, allow_missing=True, qc_filter=qc_filter)
    missing = [s for s in need if s not in bags]
    if missing:
        log.warning("%d slide(s) of the splits have no bag and are left out: %s", len(missing), ", ".join(missing[:20]))
    unlabelled = [s for s in need if s in bags and s not in truth]
    if unlabelled:
        hint = ("pass the manifest the experiment was trained on, or add --features for an external test set"
                if hint_external else "add their labels to the manifest")
        raise ManifestError(f"{manifest.path}: no ground truth for {len(unlabelled)} slide(s) of the experiment's "
                            f"splits ({', '.join(unlabelled[:20])}); {hint}")
    pred, instance = _score_units(run, exp.units, bags, truth)
    metrics, pred = evaluate_predictions(pred, task, run.classes, run.protocol, run.n_boot, threshold=run.threshold)
    teacher = _teacher_metrics(run, bags, truth)
    if teacher is not None:
        metrics["teacher"] = teacher
    metrics["experiment"] = run.name
    metrics["format_version"] = FORMAT_VERSION
    if missing:
        metrics["missing_bags"] = missing
    return metrics, bags, pred, instance, spans


def _evaluate_external(run: _Run, metrics: dict, manifest, features_dir: Path, out_dir: Path) -> Path:
    """Every fold model scores every slide of an external set; the ensemble is their mean."""
    from mil.data import load_bags

    task, classes = run.task, run.classes
    all_thresholds = [f.get("threshold", f.get("risk_threshold")) for f in metrics["folds"]]
    # a fold whose validation scores beat chance nowhere has threshold +inf: left out of the mean
    thresholds = [t for t in all_thresholds if t is not None and math.isfinite(t)]
    has_truth = ("time" in manifest.columns and "event" in manifest.columns) if task == "survival" \
        else "label" in manifest.columns
    truth = ground_truth(manifest.rows, task, classes, require=False, source=manifest.path) if has_truth else {}
    bags = load_bags(features_dir, manifest.slide_ids, allow_missing=True, qc_filter=run.exp.config.get("qc_filter"))
    missing = [s for s in manifest.slide_ids if s not in bags]
    pred, instance = _score_units(run, run.exp.units, bags, truth, external=True)
    ens = ensemble_predictions(pred, task, classes, thresholds)
    fold_thr = {(f["seed"], f["fold"]): f.get("threshold", f.get("risk_threshold")) for f in metrics["folds"]}
    ext = external_metrics(pred, ens, task, classes, fold_thr, run.n_boot,
                           labelled=bool(truth) and all(s in truth for s in ens["slide_id"]))
    ext.update(protocol=PROTOCOLS[run.protocol], task=task, experiment=run.name, manifest=str(manifest.path),
               features=str(features_dir), ensemble_threshold=float(np.mean(thresholds)) if thresholds else None,
               fold_thresholds=all_thresholds, format_version=FORMAT_VERSION,
               threshold_from="mean of the folds' thresholds chosen on "
               + ("their test folds (paper protocol)" if run.protocol == "paper" else "their validation sets"))
    if task == "classification":
        ext["classes"] = list(classes)
    if missing:
        ext["missing_bags"] = missing
        log.warning("%d external slide(s) have no bag and are left out: %s", len(missing), ", ".join(missing[:20]))
    table = pd.concat([external_decisions(pred, task, classes, fold_thr), ens], ignore_index=True)
    _write_outputs(run, out_dir, ext, table, run.record)
    if ext.get("labelled"):
        _write_figures(out_dir, ext, pred, classes, f"{run.name} on {Path(manifest.path).stem}", ensemble=ens)
    ensemble_of = {sid: [(u.seed, u.fold) for u in run.exp.units] for sid in ens["slide_id"]}
    write_instance_outputs(run.ws, out_dir, pd.concat([pred, ens], ignore_index=True), ens, instance, bags, features_dir,
                      manifest, spans=None, ensemble_of=ensemble_of, task=task, classes=classes, n_heat=run.n_heat,
                      **run.heat)
    log.debug("\n%s", format_table(ext))
    return out_dir


def evaluate_command(args) -> int:
    """The ``evaluate`` subcommand: resolve config and flags, run, print the table."""
    from .config import resolve_stage
    from .logging_setup import attach_run_log

    inputs = resolve_stage(args, "evaluate",
                           ("experiment", "features", "heatmaps", "protocol", "device", "threshold", "heatmap_mode"))
    attach_run_log(inputs.workspace, "evaluate", create_workspace=False)
    cfg = inputs.section
    experiment = cfg.experiment
    if experiment is None and inputs.raw:  # the same rule as train: train.experiment, name, recipe, model
        from .train_stage import config_experiment_name

        experiment = config_experiment_name(inputs.config)
    if not experiment:
        raise ConfigError("no experiment: pass --experiment NAME (a folder under <workspace>/experiments)")
    features = cfg.features
    if features is not None and getattr(args, "features", None) is None:
        features = inputs.config.base / features
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
