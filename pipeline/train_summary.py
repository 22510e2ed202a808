"""``summary.csv`` of an experiment, aggregated over every process that trained its folds.

Folds of one experiment may be trained by several processes (array tasks, one per GPU): each
sees only the folds it trained, and a fold another process held when it passed by. So every
process appends the outcome of each fold it trained (or found done) to its own record log,
``<experiment>/.records/`` (:class:`pipeline.records.SlideRecords`, keyed ``seed<s>_fold<k>``),
and ``summary.csv`` is rebuilt from all of them, one row per (seed, fold) of ``splits.csv``:

- ``done.json`` in the fold folder: done (the file decides), with the best epoch and metric of
  the latest record, or of ``done.json`` when no record has them;
- else the latest record says failed: failed, with its message;
- else a live lock: running; else pending.

Every train process rebuilds it when it ends (under a file lock, each from a fresh scan), so the
process that finishes last writes the complete table.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Sequence

from extract.runtime import atomic_write

from .records import SlideRecords

SUMMARY_FIELDS = ("seed", "fold", "status", "best_epoch", "metric", "value", "seconds_per_epoch", "dir", "message")


def run_key(seed: int, fold: int) -> str:
    """The name of a (seed, fold) run in locks and records."""
    return f"seed{seed}_fold{fold}"


def record_outcomes(exp_dir: Path, outcomes: Sequence) -> None:
    """Append the outcomes (:class:`pipeline.train_stage.RunOutcome`) of the folds this process
    trained, skipped or saw fail; a fold left to another process ('locked') is not recorded."""
    now = time.time()
    rows = []
    for o in outcomes:
        if o.status == "locked":
            continue
        rows.append({"slide_id": run_key(o.seed, o.fold), "seed": o.seed, "fold": o.fold, "state": o.status,
                     "best_epoch": o.best_epoch, "metric": o.metric, "value": o.value,
                     "seconds_per_epoch": o.seconds_per_epoch, "message": o.message,
                     "host": os.uname().nodename, "pid": os.getpid(), "finished_time": now})
    records = SlideRecords(exp_dir)
    try:
        records.append(rows)
    finally:
        records.close()


def summary_rows(exp_dir: Path) -> list[dict]:
    """One row per run of the experiment (see the module doc), from every process's records."""
    from .status import read_locks
    from .experiment import experiment_runs

    exp_dir = Path(exp_dir).resolve()
    records = SlideRecords(exp_dir).all()
    running = {h.item for h in read_locks(exp_dir / ".locks")[0]}
    rows = []
    for run in experiment_runs(exp_dir):
        key = run_key(run["seed"], run["fold"])
        rec = records.get(key) or {}
        row = {"seed": run["seed"], "fold": run["fold"], "dir": _relative(run["dir"], exp_dir), "message": ""}
        if run["done"]:
            # 'done' whichever process trained it; one that later found it finished ('skipped')
            # says so on its own terminal, not here.
            if rec.get("state") in ("done", "skipped"):
                row.update({k: rec.get(k) for k in ("best_epoch", "metric", "value", "seconds_per_epoch")})
            else:
                row.update(_from_done(run["dir"]))
            row["status"] = "done"
        elif rec.get("state") == "failed":
            row.update(status="failed", message=rec.get("message") or "")
        else:
            row["status"] = "running" if key in running else "pending"
        rows.append(row)
    return rows


def _from_done(fold_dir: Path) -> dict:
    try:
        done = json.loads((fold_dir / "done.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"best_epoch": done.get("best_epoch"), "metric": done.get("metric"), "value": done.get("best_value"),
            "seconds_per_epoch": done.get("seconds_per_epoch")}


def _relative(path: Path, base: Path) -> str:
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def rebuild_summary(exp_dir: Path) -> list[dict]:
    """Rewrite ``<exp_dir>/summary.csv`` from every record; returns its rows."""
    exp_dir = Path(exp_dir)
    path = exp_dir / "summary.csv"
    with open(exp_dir / ".summary.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        rows = summary_rows(exp_dir)

        def write(f) -> None:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: "" if row.get(k) is None else row[k] for k in SUMMARY_FIELDS} for row in rows)

        atomic_write(path, write, mode="w")
    return rows
