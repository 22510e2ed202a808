"""``wsi-pipeline train``: bags + labels -> MIL models per seed and fold (baselines and MHIM-MIL).

Configuration: the YAML ``train:`` section holds a ``recipe:`` (``configs/train/<name>.yaml`` or a
path) and/or :class:`mil.train_config.TrainConfig` fields inline (inline wins over the recipe), plus
``experiment``, ``features`` and ``allow_missing``; command-line flags override both.

Outputs (``<ws>/experiments/<name>/``)::

    config.yaml     experiment, manifest, features, the resolved train config, software versions
    labels.json     task, class names and their indices (classification) / event counts (survival)
    splits.csv      slide_id, seed, fold, split (train / val / test) of every run
    summary.csv     seed, fold, status, best epoch, validation metric, s/epoch, folder
    train.log       this command's log
    fold_<k>/ or seed_<s>/fold_<k>/   (one seed / several seeds)
        last.pt, best.pt, history.csv, done.json, baseline/ (MHIM teacher_init: auto)

A rerun skips finished folds; ``--resume`` continues unfinished ones from ``last.pt``. An
experiment folder made with other settings, labels or splits is refused (never silently mixed).
Several processes may train one experiment at once (e.g. one per GPU): each fold is claimed with a
lock file and a fold held by a live process is left to it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from extract.errors import ConfigError, PipelineError

from .config import (
    CONFIG_DIR,
    TRAIN_STAGE_KEYS,
    PipelineConfig,
    from_dict,
    load_yaml,
    resolve_stage,
    train_section_class,
)
from .experiment import experiment_runs, run_dir
from .logging_setup import attach_run_log
from .workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["train_command", "run_training", "resolve_train_config", "find_features_dir",
           "experiment_runs", "RunOutcome", "TRAIN_FLAGS"]

#: Command-line flags that override TrainConfig fields.
TRAIN_FLAGS = ("folds", "seeds", "epochs", "device")
#: TrainConfig fields that may differ between runs of one experiment.
_RUNTIME_FIELDS = ("device",)


def _find_recipe(recipe: str, base: Path) -> Path:
    """A recipe by path (relative to the config file's folder or the current one) or by name."""
    p = Path(recipe).expanduser()
    candidates = [p] if p.is_absolute() else [base / p, Path.cwd() / p]
    names = [recipe, f"{recipe}.yaml"] if not recipe.endswith((".yaml", ".yml")) else [recipe]
    candidates += [CONFIG_DIR / "train" / Path(n).name for n in names]
    candidates += [CONFIG_DIR.parent / n for n in names]
    for c in candidates:
        if c.is_file():
            return c
    available = sorted(p.stem for p in (CONFIG_DIR / "train").glob("*.yaml"))
    raise ConfigError(
        f"train recipe {recipe!r} not found (looked in {base}, {Path.cwd()} and {CONFIG_DIR / 'train'}); "
        f"available recipes: {', '.join(available)}"
    )


def resolve_train_config(section: dict | None, base: Path, flags: dict | None = None):
    """TrainConfig from the YAML ``train:`` section: recipe, then inline keys, then flags.

    Mappings (``mhim``, ``model_kw``) set inline are merged key by key into the recipe's;
    ``mhim: null`` turns MHIM off.

    Parameters
    ----------
    section : the raw ``train:`` mapping (keys explicitly set, ``null`` included).
    base : folder that relative ``recipe`` paths resolve against.
    flags : TrainConfig fields from the command line; None values are ignored.

    Returns
    -------
    (TrainConfig, recipe path or None)
    """
    from mil.train_config import TrainConfig

    section = dict(section or {})
    from_dict(train_section_class(), section, where="train.")  # types and unknown keys, with key paths
    merged: dict[str, Any] = {}
    recipe_path = None
    if section.get("recipe"):
        recipe_path = _find_recipe(str(section["recipe"]), base)
        recipe = load_yaml(recipe_path)
        if "train" in recipe and isinstance(recipe["train"], dict) and len(recipe) == 1:
            recipe = recipe["train"]
        try:
            from_dict(TrainConfig, recipe, where=f"{recipe_path.name}: ")
        except ConfigError as exc:
            raise ConfigError(f"recipe {recipe_path}: {exc}") from exc
        merged.update(recipe)
    for key, value in section.items():
        if key in TRAIN_STAGE_KEYS:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}  # mhim / model_kw: inline keys refine the recipe's
        merged[key] = value
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    return from_dict(TrainConfig, merged, where="train."), recipe_path


def _parse_seeds(text: Any) -> tuple[int, ...] | None:
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        return tuple(int(s) for s in text)
    try:
        seeds = tuple(int(s) for s in str(text).replace(" ", "").split(",") if s)
    except ValueError:
        raise ConfigError(f"The '--seeds' parameter must be comma-separated whole numbers, e.g. 2021,2022. Got {text!r} instead.") from None
    if not seeds:
        raise ConfigError(f"The '--seeds' parameter must name at least one seed. Got {text!r} instead.")
    return seeds


def find_features_dir(workspace: Workspace) -> Path:
    """The only feature folder ``<ws>/features/<backbone_tag>/<seg_tag>``; ConfigError otherwise."""
    base = workspace.root / "features"
    found = sorted(p for p in base.glob("*/*") if p.is_dir()) if base.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(
            f"no feature folder under {base}; run `wsi-pipeline extract` first or pass --features DIR"
        )
    listing = ", ".join(str(p.relative_to(base)) for p in found)
    raise ConfigError(f"several feature folders under {base} ({listing}); pick one with --features DIR")


# ---------------------------------------------------------------------------------------------
# the experiment record
# ---------------------------------------------------------------------------------------------

def _write_text(path: Path, text: str) -> None:
    from .runner import commit, temp_path_for

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    tmp.write_text(text)
    commit(tmp, path)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _record_experiment(exp_dir: Path, name: str, manifest_path: Path, features_dir: Path, config,
                       targets, split_rows: list[dict], qc_filter: str | None = None) -> None:
    """Write (or check against) config.yaml, labels.json and splits.csv."""
    import yaml

    from mil.checkpoints import software_versions

    train = config.to_dict()
    cfg_path = exp_dir / "config.yaml"
    if cfg_path.is_file():
        old = yaml.safe_load(cfg_path.read_text()) or {}
        old_train = {k: v for k, v in (old.get("train") or {}).items() if k not in _RUNTIME_FIELDS}
        new_train = {k: v for k, v in train.items() if k not in _RUNTIME_FIELDS}
        problems = _diff(old_train, new_train, "train.")
        # the features' identity is <backbone_tag>/<seg_tag>; the workspace itself may have moved
        if Path(str(old.get("features"))).parts[-2:] != features_dir.parts[-2:]:
            problems.append(f"features: {old.get('features')} -> {features_dir}")
        if old.get("qc_filter") != qc_filter:
            problems.append(f"qc_filter: {old.get('qc_filter')} -> {qc_filter}")
        if problems:
            raise ConfigError(
                f"experiment {name!r} ({exp_dir}) was trained with other settings: "
                + "; ".join(problems[:12])
                + ". Use another --experiment name (or delete that folder to start over)"
            )
    record = {
        "experiment": name, "manifest": str(manifest_path), "features": str(features_dir),
        "train": train, "software": software_versions(), "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if qc_filter:  # evaluate drops the same patches
        record["qc_filter"] = qc_filter

    labels = targets.to_dict()
    labels_path = exp_dir / "labels.json"
    if labels_path.is_file():
        old = json.loads(labels_path.read_text())
        if old.get("task") != labels.get("task") or old.get("classes") != labels.get("classes"):
            raise ConfigError(
                f"experiment {name!r}: the labels changed (task/classes {old.get('task')}/{old.get('classes')} -> "
                f"{labels.get('task')}/{labels.get('classes')}); use another --experiment name"
            )

    splits_path = exp_dir / "splits.csv"
    new_rows = {(r["slide_id"], str(r["seed"]), str(r["fold"]), r["split"]) for r in split_rows}
    if splits_path.is_file():
        with open(splits_path, newline="") as f:
            old_rows = {(r["slide_id"], r["seed"], r["fold"], r["split"]) for r in csv.DictReader(f)}
        if old_rows != new_rows:
            moved = sorted({r[0] for r in old_rows ^ new_rows})
            raise ConfigError(
                f"experiment {name!r}: the splits differ from {splits_path} for {len(moved)} slide(s) "
                f"(e.g. {', '.join(moved[:5])}): the manifest or the set of bags changed. Use another "
                "--experiment name so the runs stay comparable"
            )

    _write_text(cfg_path, yaml.safe_dump(record, sort_keys=False))
    _write_text(labels_path, json.dumps(labels, indent=2) + "\n")
    lines = ["slide_id,seed,fold,split"] + [f"{r['slide_id']},{r['seed']},{r['fold']},{r['split']}" for r in split_rows]
    _write_text(splits_path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# training every seed and fold
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunOutcome:
    seed: int
    fold: int
    dir: Path
    status: str  # done | skipped | failed | locked
    best_epoch: int | None = None
    metric: str | None = None
    value: float | None = None
    seconds_per_epoch: float | None = None
    message: str = ""


def _summary_table(outcomes: Sequence[RunOutcome], seconds: float) -> str:
    lines = [f"train: {len(outcomes)} run(s) in {seconds:.1f} s",
             f"  {'fold':>4}  {'seed':>6}  {'status':<8}  {'best epoch':>10}  {'val metric':<18}  {'s/epoch':>8}"]
    for o in outcomes:
        metric = f"{o.metric} {o.value:.4f}" if o.value is not None else ""
        spe = f"{o.seconds_per_epoch:.2f}" if o.seconds_per_epoch is not None else ""
        be = str(o.best_epoch) if o.best_epoch is not None else ""
        lines.append(f"  {o.fold:>4}  {o.seed:>6}  {o.status:<8}  {be:>10}  {metric:<18}  {spe:>8}")
    for o in outcomes:
        if o.message:
            lines.append(f"  fold {o.fold} seed {o.seed}: {o.message}")
    return "\n".join(lines)


def _train_experiment(manifest_path, workspace, features_dir, config, experiment, resume,
                      allow_missing=False, progress=True, on_epoch_end=None, qc_filter=None):
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from mil.cpu_threads import cpu_threads_for
    from mil.data import load_bags, make_splits, make_targets
    from extract.runtime import resolve_device
    from mil.trainer import train_fold

    from .manifest import load_manifest
    from .runner import SlideLock
    from .train_summary import rebuild_summary, record_outcomes, run_key

    ws = Workspace(workspace)
    if manifest_path is None:
        raise ConfigError("no manifest: pass --manifest CSV or set 'manifest:' in the config")
    manifest_path = Path(manifest_path).resolve()
    need = ("label",) if config.task == "classification" else ("time", "event")
    manifest = load_manifest(manifest_path, require=need, check_files=False)
    features_dir = Path(features_dir).resolve() if features_dir is not None else find_features_dir(ws)
    exp_dir = ws.experiment_dir(experiment)

    if qc_filter:
        from extract.patch_qc import QCFilter

        qc_filter = str(QCFilter.parse(qc_filter)) or None
    bags = load_bags(features_dir, manifest.slide_ids, allow_missing=bool(allow_missing), qc_filter=qc_filter)
    rows = [r for r in manifest.rows if r.slide_id in bags]
    spans = None
    if config.bag == "case":  # one bag per case: from here on a "slide id" is a case id
        from mil.cases import case_bags, group_cases

        rows, members = group_cases(rows, config.task)
        bags, spans = case_bags(bags, members)
    targets = make_targets(rows, config.task, config.classes)
    strata = {s: v for s, v in zip([r.slide_id for r in rows], targets.strata([r.slide_id for r in rows]))}
    if config.bag == "case" and config.task == "survival":
        from mil.cases import survival_strata

        strata = survival_strata(rows, config.n_bins)

    runs: list[tuple[int, int, dict]] = []
    split_rows: list[dict] = []
    for seed in config.seeds:
        folds = make_splits(rows, config.task, config.folds, seed, config.val_ratio, config.protocol, strata=strata)
        for k, split in enumerate(folds):
            runs.append((seed, k, split))
            for part in ("train", "val", "test"):
                split_rows += [{"slide_id": s, "seed": seed, "fold": k, "split": part} for s in split[part]]
    _record_experiment(exp_dir, experiment, manifest_path, features_dir, config, targets, split_rows, qc_filter)
    if spans is not None:
        from mil.cases import spans_table

        table = spans_table(spans)
        _write_text(exp_dir / "bags.csv", "case_id,slide_id,start,stop\n"
                    + "".join(f"{r['case_id']},{r['slide_id']},{r['start']},{r['stop']}\n" for r in table))

    file_log = logging.FileHandler(exp_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(file_log)
    log.info("experiment %s: %d slide(s), %s, %d run(s) (%d seed(s) x %d fold(s)), features %s",
             experiment, len(rows), config.model + (" + MHIM" if config.mhim is not None else ""), len(runs),
             len(config.seeds), len(runs) // len(config.seeds), features_dir)
    if config.protocol == "paper":
        log.warning("protocol 'paper': validation IS the test fold (model selection on test data); the "
                    "results are optimistic and for comparison with the MHIM-MIL paper only")

    outcomes: list[RunOutcome] = []
    start = time.perf_counter()
    multi_seed = len(config.seeds) > 1
    try:
        # A bar only on a terminal: redirected output gets the trainer's log lines instead, and
        # logging_redirect_tqdm (whose handler ignores -q's level) only while a bar is shown.
        interactive = progress and sys.stderr.isatty()
        redirect = logging_redirect_tqdm() if interactive else contextlib.nullcontext()
        with redirect, cpu_threads_for(bags, resolve_device(config.device)):
            bar = tqdm(runs, desc="train", unit="fold", disable=not interactive, dynamic_ncols=True)
            for seed, k, split in bar:
                fold_dir = run_dir(ws, experiment, k, seed, multi_seed)
                bar.set_postfix_str(f"seed {seed} fold {k}", refresh=True)
                lock = SlideLock(exp_dir / ".locks", run_key(seed, k), stale_lock_s=24 * 3600)
                if not lock.acquire():
                    outcomes.append(RunOutcome(seed, k, fold_dir, "locked",
                                               message="another live process is training it"))
                    continue
                def epoch_done(d: Path, epoch: int, row: dict, seed=seed, k=k) -> None:
                    stage = "baseline " if d.name == "baseline" else ""
                    value = row.get(f"val_{config.selection_metric}", row.get("val_loss"))
                    bar.set_postfix_str(f"seed {seed} fold {k} {stage}epoch {epoch}/{config.epochs} "
                                        f"val {config.selection_metric} {value:.3f} {row['seconds']:.1f} s/epoch")
                    if on_epoch_end is not None:
                        on_epoch_end(d, epoch, row)

                tried = len(outcomes)
                try:
                    res = train_fold(bags, split, config, fold_dir, resume=bool(resume), targets=targets,
                                     seed=seed, fold=k, on_epoch_end=epoch_done)
                    outcomes.append(RunOutcome(seed, k, fold_dir, res.status, res.best_epoch, res.metric,
                                               res.best_value, res.seconds_per_epoch))
                except (PipelineError, _oom_error()) as exc:
                    log.error("fold %d seed %d failed: %s", k, seed, exc)
                    outcomes.append(RunOutcome(seed, k, fold_dir, "failed", message=str(exc).splitlines()[0]))
                finally:
                    # recorded before the lock goes: a fold is never seen unheld and unrecorded
                    record_outcomes(exp_dir, outcomes[tried:])
                    lock.release()
    finally:
        root.removeHandler(file_log)
        file_log.close()
    rebuild_summary(exp_dir)  # every process's folds, not only this one's
    return exp_dir, outcomes, time.perf_counter() - start


def _oom_error():
    import torch

    return getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", MemoryError))


def run_training(manifest_path, workspace, features_dir, train_config, experiment: str, resume: bool = False,
                 allow_missing: bool = False, progress: bool = True, qc_filter: str | None = None) -> Path:
    """Train every seed and fold of an experiment; returns its folder.

    Parameters
    ----------
    manifest_path : slide manifest CSV (labels, or time + event for survival).
    workspace : workspace folder.
    features_dir : folder of bags, or None for the workspace's only feature folder.
    train_config : :class:`mil.train_config.TrainConfig`.
    experiment : name of the folder under ``<ws>/experiments``.
    resume : continue unfinished folds (finished ones are always skipped).
    qc_filter : patch QC rules (``'focus>=50,background<=0.5'``); evaluate reuses them.

    Raises
    ------
    PipelineError
        After trying every fold, when some failed (listed) or are held by another process.
    """
    exp_dir, outcomes, seconds = _train_experiment(manifest_path, workspace, features_dir, train_config,
                                                   experiment, resume, allow_missing, progress, qc_filter=qc_filter)
    log.info("\n%s", _summary_table(outcomes, seconds))
    bad = [o for o in outcomes if o.status in ("failed", "locked")]
    if bad:
        raise PipelineError(
            f"experiment {experiment!r}: {len(bad)} of {len(outcomes)} run(s) did not finish: "
            + "; ".join(f"fold {o.fold} seed {o.seed} {o.status} ({o.message})" for o in bad)
        )
    return exp_dir


def _list_models() -> str:
    from mil.models import list_models, model_info

    names = list_models()
    width = max(len(n) for n in names)
    return "\n".join(f"{n:<{width}}  {model_info(n).summary}" for n in names)


def experiment_name(section: dict, raw: dict, recipe_path: Path | None, config) -> str:
    """The experiment's folder name when no ``--experiment`` is given.

    One rule for ``train``, ``evaluate`` and ``run``: ``train.experiment``, then the config's
    top-level ``name``, then the recipe's file name, then the model (``mhim_<model>`` with MHIM).
    """
    return (section.get("experiment") or raw.get("name")
            or (recipe_path.stem if recipe_path is not None else None)
            or (f"mhim_{config.model}" if config.mhim is not None else config.model))


def config_experiment_name(config: PipelineConfig) -> str | None:
    """The experiment a pipeline config trains (:func:`experiment_name`), None without one.

    ``evaluate --config X.yaml`` uses this, so it finds what ``train --config X.yaml`` made.
    """
    section = config.train_keys()
    if not section and not config.name:
        return None
    train_config, recipe_path = resolve_train_config(section, config.base, {})
    return experiment_name(section, config.raw, recipe_path, train_config)


def is_bare_recipe(raw: dict) -> bool:
    """True for a recipe file (``configs/train/*.yaml``: TrainConfig keys at the top level).

    A pipeline config has ``manifest``/``workspace``/stage sections instead; a file mixing
    both is not a recipe and is left to the pipeline config's own validation.
    """
    from mil.train_config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return bool(raw) and set(raw) <= fields


def _train_inputs(args):
    """``resolve_stage`` for train, where ``--config`` may also be a bare recipe file."""
    recipe = getattr(args, "recipe", None)
    config_path = getattr(args, "config", None)
    if config_path is not None and is_bare_recipe(load_yaml(config_path)):
        if recipe is not None:
            raise ConfigError(f"--config {config_path} is a train recipe and --recipe {recipe} is another; pass one")
        recipe = str(Path(config_path).resolve())
        args = argparse.Namespace(**{**vars(args), "config": None})
    inputs = resolve_stage(args, "train")
    section = inputs.config.train_keys()
    if recipe is not None:
        section["recipe"] = recipe  # --recipe replaces the config's recipe; inline keys still refine it
    return inputs, section, inputs.config.base


def train_command(args: argparse.Namespace) -> int:
    """The ``train`` subcommand; returns the exit code (0 ok, 1 a run failed or is locked)."""
    if getattr(args, "list_models", False):
        print(_list_models())
        return 0
    flags = {name: getattr(args, name, None) for name in TRAIN_FLAGS}
    flags["seeds"] = _parse_seeds(flags["seeds"])
    if getattr(args, "manifest", None) is not None:  # a wrong manifest is reported before torch is loaded
        from .manifest import load_manifest

        load_manifest(args.manifest, check_files=False)
    inputs, section, base = _train_inputs(args)
    config, recipe_path = resolve_train_config(section, base, flags)
    attach_run_log(inputs.workspace, "train", create_workspace=False)

    experiment = getattr(args, "experiment", None) or experiment_name(section, inputs.raw, recipe_path, config)
    features = getattr(args, "features", None)
    if features is None and section.get("features"):
        features = Path(section["features"]).expanduser()
        features = features if features.is_absolute() else base / features
    allow_missing = getattr(args, "allow_missing", None)
    if allow_missing is None:
        allow_missing = bool(section.get("allow_missing"))
    if getattr(args, "shard", None):
        log.warning("--shard is ignored by train: run one process per GPU on the same experiment instead "
                    "(folds are claimed with lock files)")

    qc_filter = getattr(args, "qc_filter", None) or section.get("qc_filter")
    exp_dir, outcomes, seconds = _train_experiment(
        inputs.manifest, inputs.workspace, features, config, experiment, bool(getattr(args, "resume", False)),
        allow_missing, progress=not getattr(args, "quiet", False), qc_filter=qc_filter)
    print(_summary_table(outcomes, seconds))
    print(f"experiment folder: {exp_dir}")
    return 1 if any(o.status in ("failed", "locked") for o in outcomes) else 0
