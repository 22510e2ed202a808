"""``wsi-pipeline status``: where every stage of a workspace stands, from its records and locks.

Read-only and cheap: one directory scan per stage folder (records, locks, outputs) and the
manifest each stage remembered; no output file is opened. For each segmentation, feature folder
and experiment it counts done / empty / failed / pending / running, names who runs what (host,
pid, Slurm job), estimates throughput and time left, and lists failures with their reason.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .records import SlideRecords
from .runner import boot_time, pid_alive
from .scheduler import job_label, job_running

# A lock older than this on another host, whose job Slurm cannot vouch for, is shown as stale
# (the runner's own default takes such locks over after the same time).
STALE_LOCK_S = 6 * 3600
RATE_WINDOW_S = 3600.0


@dataclass
class Holder:
    """A live claim on one slide (or fold): who holds it and since when."""

    item: str
    host: str
    pid: int
    job: str | None
    since_s: float
    alive: bool | None  # None: another host without Slurm; judged by age only


@dataclass
class StageStatus:
    stage: str
    output: str
    total: int | None
    done: int = 0
    empty: int = 0
    failed: int = 0
    running: int = 0
    pending: int | None = None
    per_hour: float | None = None
    eta_s: float | None = None
    holders: list[Holder] = field(default_factory=list)
    stale: list[Holder] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""


def read_locks(lock_dir: Path, stale_lock_s: float = STALE_LOCK_S) -> tuple[list[Holder], list[Holder]]:
    """(live, stale) holders of the ``*.lock`` files in ``lock_dir``."""
    live, stale = [], []
    try:
        entries = [e for e in os.scandir(lock_dir) if e.name.endswith(".lock") and not e.name.startswith(".")]
    except FileNotFoundError:
        return live, stale
    now, here = time.time(), socket.gethostname()
    for entry in entries:
        try:
            info = json.loads(Path(entry.path).read_text())
            age = now - entry.stat().st_mtime
        except (OSError, ValueError):
            continue
        alive: bool | None
        if info.get("host") == here:
            alive = pid_alive(int(info.get("pid", -1))) and float(info.get("time") or 0) >= boot_time()
        elif info.get("job"):
            alive = job_running(str(info["job"]))
        else:
            alive = None
        holder = Holder(entry.name[:-5], str(info.get("host", "?")), int(info.get("pid", -1)),
                        info.get("job"), age, alive)
        is_live = alive if alive is not None else age <= stale_lock_s
        (live if is_live else stale).append(holder)
    return sorted(live, key=lambda h: h.item), sorted(stale, key=lambda h: h.item)


def _manifest_ids(stage_dir: Path, manifest: Path | None) -> list[str] | None:
    from .manifest import load_manifest

    if manifest is None:
        try:
            manifest = Path(json.loads((stage_dir / "manifest.json").read_text())["manifest"])
        except (OSError, ValueError, KeyError):
            return None
    try:
        return load_manifest(manifest, check_files=False).slide_ids
    except Exception:  # a moved or edited manifest must not break the overview
        return None


def _output_names(folder: Path) -> set[str]:
    try:
        return {e.name[:-3] for e in os.scandir(folder) if e.name.endswith(".h5") and not e.name.startswith(".")}
    except FileNotFoundError:
        return set()


def slide_stage_status(stage: str, label: str, stage_dir: Path, outputs: Path,
                       manifest: Path | None = None) -> StageStatus:
    """Status of one segment or extract folder (outputs are ``<outputs>/<slide_id>.h5``)."""
    records = SlideRecords(stage_dir).all()
    live, stale = read_locks(stage_dir / ".locks")
    ids = _manifest_ids(stage_dir, manifest)
    st = StageStatus(stage, label, len(ids) if ids is not None else None, holders=live, stale=stale)
    running = {h.item for h in live}
    finished_names = _output_names(outputs)
    wanted = set(ids) if ids is not None else set(records) | finished_names | running
    # Outputs from before records existed count as done.
    states = {sid: "done" for sid in finished_names & wanted}
    for sid, record in records.items():
        if sid in wanted:
            states[sid] = record.get("state", "done")
    st.running = len(running & wanted)
    for sid, state in sorted(states.items()):
        if sid in running:
            continue  # being redone now
        if state in ("failed", "refused"):
            st.failed += 1
            st.failures.append((sid, records[sid].get("message", "")))
        elif state == "empty":
            st.empty += 1
        elif state == "done":
            st.done += 1
    if ids is not None:
        st.pending = len(wanted) - st.done - st.empty - st.failed - st.running
    else:
        st.note = "manifest unknown: pending not counted (pass --manifest)"
    st.per_hour = _rate([r for sid, r in records.items() if sid in wanted and r.get("state") in ("done", "empty")])
    if st.per_hour and st.pending is not None and st.pending + st.running:
        st.eta_s = (st.pending + st.running) / st.per_hour * 3600
    return st


def _rate(records: list[dict]) -> float | None:
    """Slides per hour over the last hour of finishes (all workers together)."""
    times = sorted(r["finished_time"] for r in records if isinstance(r.get("finished_time"), (int, float)))
    if not times:
        return None
    recent = [t for t in times if t >= times[-1] - RATE_WINDOW_S]
    first_start = min((r.get("started") or r["finished_time"]) for r in records
                      if isinstance(r.get("finished_time"), (int, float)) and r["finished_time"] >= recent[0])
    span = recent[-1] - min(first_start, recent[0])
    return len(recent) / span * 3600 if span > 0 else None


def train_status(exp_dir: Path) -> StageStatus:
    """Folds (and seeds) of one experiment: done, failed (records), running (locks), pending."""
    from .experiment import experiment_runs
    from .train_summary import run_key, summary_rows

    label = exp_dir.name
    try:
        runs = experiment_runs(exp_dir)
    except Exception:
        return StageStatus("train", label, None, note="no splits.csv yet")
    live, stale = read_locks(exp_dir / ".locks")
    running = {h.item for h in live}
    # from every train process's records (summary.csv may predate the last fold's outcome)
    failed = {run_key(r["seed"], r["fold"]): r["message"] for r in summary_rows(exp_dir) if r["status"] == "failed"}
    st = StageStatus("train", label, len(runs), holders=live, stale=stale)
    finished = []
    for run in runs:
        key = run_key(run["seed"], run["fold"])
        if run["done"]:
            st.done += 1
            finished.append((run["dir"] / "done.json").stat().st_mtime)
        elif key in running:
            st.running += 1
        elif key in failed:
            st.failed += 1
            st.failures.append((key, failed[key]))
    st.pending = st.total - st.done - st.running - st.failed
    if len(finished) >= 2 and max(finished) > min(finished):
        st.per_hour = (len(finished) - 1) / (max(finished) - min(finished)) * 3600
        if st.pending + st.running:
            st.eta_s = (st.pending + st.running) / st.per_hour * 3600
    metrics = exp_dir / "evaluation" / "metrics.json"
    st.note = "evaluated" if metrics.is_file() else ""
    return st


def workspace_status(workspace: Path, manifest: Path | None = None) -> list[StageStatus]:
    """Every segmentation, feature folder and experiment of ``workspace``."""
    from .workspace import Workspace

    ws = Workspace(workspace)
    out = []
    for tag in ws.segment_tags():
        d = ws.segment_dir(tag)
        out.append(slide_stage_status("segment", tag, d, d / "coords", manifest))
    features = ws.root / "features"
    for bdir in sorted(p for p in features.iterdir() if p.is_dir()) if features.is_dir() else []:
        for sdir in sorted(p for p in bdir.iterdir() if p.is_dir()):
            out.append(slide_stage_status("extract", f"{bdir.name}/{sdir.name}", sdir, sdir, manifest))
    experiments = ws.root / "experiments"
    for edir in sorted(p for p in experiments.iterdir() if p.is_dir()) if experiments.is_dir() else []:
        out.append(train_status(edir))
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_status(stages: list[StageStatus], workspace: Path) -> str:
    """One table across stages, then who is running what, then the failures."""
    if not stages:
        return f"{workspace}: no stage outputs yet (run `wsi-pipeline segment` first)"
    head = ("stage", "output", "total", "done", "empty", "failed", "pending", "running", "per hour", "ETA")
    rows = []
    for st in stages:
        rows.append((st.stage, st.output, "-" if st.total is None else str(st.total), str(st.done),
                     str(st.empty) if st.stage != "train" else "-", str(st.failed),
                     "-" if st.pending is None else str(st.pending), str(st.running),
                     "-" if st.per_hour is None else f"{st.per_hour:.0f}", _duration(st.eta_s)))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [f"workspace {workspace}", fmt(head)] + [fmt(r) for r in rows]
    notes = [f"  {st.stage} {st.output}: {st.note}" for st in stages if st.note]
    lines += notes
    running = [(st, h) for st in stages for h in st.holders]
    if running:
        lines.append("running:")
        lines += [f"  {st.stage:<8} {h.item:<24} {job_label(asdict(h))}  for {_duration(h.since_s)}"
                  for st, h in running]
    stale = [(st, h) for st in stages for h in st.stale]
    if stale:
        lines.append("stale locks (their process is gone; the next run takes them over):")
        lines += [f"  {st.stage:<8} {h.item:<24} {job_label(asdict(h))}" for st, h in stale]
    failures = [(st, sid, msg) for st in stages for sid, msg in st.failures]
    if failures:
        lines.append("failed:")
        width = max(len(sid) for _, sid, _ in failures)
        lines += [f"  {st.stage:<8} {sid:<{width}}  {msg}" for st, sid, msg in failures]
    return "\n".join(lines)


def status_command(args) -> int:
    from extract.errors import ConfigError

    from .config import load_config

    config = load_config(args.config)
    workspace, manifest = args.workspace or config.workspace, args.manifest or config.manifest
    if workspace is None:
        raise ConfigError("no workspace: pass --workspace DIR (or --config with 'workspace:')")
    if not Path(workspace).is_dir():
        raise ConfigError(f"{workspace}: no such workspace folder")
    stages = workspace_status(Path(workspace), manifest)
    if args.json:
        print(json.dumps({"workspace": str(Path(workspace).resolve()),
                          "stages": [asdict(st) for st in stages]}, indent=2))
    else:
        print(format_status(stages, Path(workspace).resolve()))
    return 0
