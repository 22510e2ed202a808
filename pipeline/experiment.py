"""The experiment folder that ``train`` writes and ``evaluate`` and ``status`` read.

    <ws>/experiments/<name>/config.yaml   labels.json   splits.csv   summary.csv
        fold_<k>/            one seed
        seed_<s>/fold_<k>/   several seeds (the seed level only then)
            best.pt  last.pt  history.csv  done.json
        evaluation/  evaluation_paper/

Every path comes from :class:`pipeline.workspace.Workspace`; the rule "a seed level only with
several seeds" is :func:`run_dir`, the one place that applies it. splits.csv is read with the
csv module (no pandas), so ``wsi-pipeline status`` stays fast.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from extract.errors import CheckpointError

from .workspace import Workspace

__all__ = ["FoldUnit", "Experiment", "run_dir", "fold_units", "experiment_runs", "load_experiment",
           "evaluation_dir", "find_key"]


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
    def done(self) -> bool:
        """``done.json`` is written last: without it the fold was interrupted."""
        return (self.dir / "done.json").is_file()

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


def run_dir(ws: Workspace, name: str, fold: int, seed: int | None, several_seeds: bool) -> Path:
    """The folder of one (seed, fold) run: ``fold_<k>``, or ``seed_<s>/fold_<k>`` with several seeds."""
    return ws.fold_dir(name, fold, seed if several_seeds else None)


def _seed(value: str | None) -> int | None:
    value = (value or "").strip()
    return None if value in ("", "nan", "None") else int(float(value))


def fold_units(ws: Workspace, name: str) -> list[FoldUnit]:
    """The (seed, fold) runs listed in the experiment's splits.csv, sorted, with their slides.

    Raises
    ------
    CheckpointError
        splits.csv is missing or lacks a column.
    """
    path = ws.experiment_dir(name) / "splits.csv"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; the experiment was not trained to the point of writing its splits. "
            f"Run `wsi-pipeline train --experiment {name} --resume`"
        )
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"slide_id", "fold", "split"} - set(reader.fieldnames or ())
        if missing:
            raise CheckpointError(f"{path}: missing column(s) {sorted(missing)}; expected slide_id, seed, fold, split")
        rows = list(reader)
    groups: dict[tuple[int | None, int], dict[str, list[str]]] = {}
    for r in rows:
        g = groups.setdefault((_seed(r.get("seed")), int(r["fold"])), {"val": [], "test": []})
        if r["split"] in g:
            g[r["split"]].append(r["slide_id"])
    several = len({s for s, _ in groups if s is not None}) > 1
    return [FoldUnit(seed, fold, run_dir(ws, name, fold, seed, several), val=g["val"], test=g["test"])
            for (seed, fold), g in sorted(groups.items(), key=lambda kv: (-1 if kv[0][0] is None else kv[0][0], kv[0][1]))]


def experiment_runs(exp_dir: str | Path) -> list[dict]:
    """The (seed, fold) runs of an experiment folder: dicts seed, fold, dir, done."""
    exp_dir = Path(exp_dir).resolve()
    return [{"seed": u.seed, "fold": u.fold, "dir": u.dir, "done": u.done}
            for u in fold_units(Workspace(exp_dir.parent.parent), exp_dir.name)]


def find_key(config: dict, names: Sequence[str]) -> Any:
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
        ``best.pt`` or is unfinished (the message names the fold and says to resume training).
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
    units = fold_units(ws, name)
    if not units:
        raise CheckpointError(f"{exp_dir / 'splits.csv'}: no folds listed")
    missing = [f"{u.name} ({u.checkpoint} not found)" if not u.checkpoint.is_file()
               else f"{u.name} (unfinished: {u.dir / 'done.json'} not found)"
               for u in units if not (u.checkpoint.is_file() and u.done)]
    if missing:
        raise CheckpointError(
            f"experiment {name!r}: {len(missing)} fold(s) listed in splits.csv have no trained model: "
            + "; ".join(missing)
            + f". Finish training with `wsi-pipeline train --experiment {name} --resume` and evaluate again"
        )
    classes = task = None
    labels_path = exp_dir / "labels.json"
    if labels_path.is_file():
        labels = json.loads(labels_path.read_text())
        task = labels.get("task")
        if labels.get("classes") is not None:
            classes = [str(c) for c in labels["classes"]]
        elif isinstance(labels.get("mapping"), dict):
            classes = [str(c) for c, _ in sorted(labels["mapping"].items(), key=lambda kv: kv[1])]
    task = task or find_key(config, ("task",))
    features = _resolve(find_key(config, ("features_dir", "features")), exp_dir)
    manifest = _resolve(find_key(config, ("manifest", "manifest_path")), exp_dir)
    return Experiment(exp_dir, config, units, features, manifest, classes, task)


def evaluation_dir(ws: Workspace, name: str, protocol: str) -> Path:
    """``evaluation/`` (default protocol) or ``evaluation_paper/`` (kept apart on purpose)."""
    base = ws.evaluation_dir(name)
    return base if protocol == "default" else base.with_name("evaluation_paper")
