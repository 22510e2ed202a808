"""The one per-slide loop every stage goes through.

It owns, for each slide: skip when done, the exclusive lock, the temporary output, the atomic
commit, the status row, the progress bar and the error boundary. A stage supplies only a
``work(row, tmp_path) -> SlideOutcome`` function that writes one HDF5 file to ``tmp_path``.

"Done" means: the final file exists, opens, and carries the fingerprint of the parameters asked
for. A slide made with other parameters is refused unless ``overwrite``; a partial or corrupt
file is redone. Several processes (shards, GPUs, nodes on a shared filesystem) may run the same
batch: each slide is claimed with an ``O_CREAT | O_EXCL`` lock file that names its host, pid and
start time (and its Slurm job), and a lock whose process is dead (same host), whose Slurm job is
no longer running, or that is older than ``stale_lock_s`` (other hosts) is taken over.

Bookkeeping costs the same per slide at 30,000 slides as at 10: each slide's outcome is one line
appended to this process's record log (``<dir>/.records/*.jsonl``, see :mod:`pipeline.records`),
finished outputs are made durable in groups by a committer thread (see
:mod:`pipeline.commit_group`, which states what kill -9 and power loss each leave), and the
human-readable ``status.csv`` is aggregated from the records once, at the end of a batch (and
by ``wsi-pipeline status``), never rewritten per slide.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from collections import Counter
from typing import Callable, Iterable

from extract.errors import ConfigError, PipelineError
from extract.runtime import atomic_write_text, fsync_dir, fsync_file

from .os_errors import describe_os_error, workspace_problem
from .records import STATUS_FIELDS, SlideRecords, StatusFile
from .scheduler import current_job, earlier_run_of_this_job, job_running

log = logging.getLogger(__name__)

__all__ = ["STATUS_FIELDS", "SlideRecords", "StatusFile", "SlideOutcome", "SlideStatus", "BatchSummary",
           "SlideLock", "run_slides", "commit", "temp_path_for", "pid_alive", "check_stage_params"]
# States a slide can end a batch in. 'done'/'empty'/'skipped' are successes; 'locked' means
# another live process holds it; 'failed' and 'refused' make the command exit non-zero.
# 'degraded': done, but part of the slide was unreadable (e.g. patches re-read from a coarser level).
OK_STATES = ("done", "empty", "skipped", "degraded")


@dataclass
class SlideOutcome:
    """What ``work`` reports for one slide after writing its file."""

    state: str = "done"  # 'done' or 'empty'
    message: str = ""
    patches: int | None = None
    extra: dict = field(default_factory=dict)  # stage-specific status.csv columns (e.g. ink area)


@dataclass
class SlideStatus:
    slide_id: str
    state: str
    seconds: float = 0.0
    message: str = ""
    patches: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def patches_per_s(self) -> float | None:
        if self.patches is None or self.seconds <= 0:
            return None
        return self.patches / self.seconds


@dataclass
class BatchSummary:
    stage: str
    statuses: list[SlideStatus] = field(default_factory=list)
    seconds: float = 0.0
    counts: Counter = field(default_factory=Counter)

    def add(self, status: SlideStatus) -> None:
        self.statuses.append(status)
        self.counts[status.state] += 1

    def count(self, state: str) -> int:
        # Kept in step by add(): asked once per slide for the progress bar, a scan would make
        # the batch quadratic.
        if sum(self.counts.values()) != len(self.statuses):
            self.counts = Counter(s.state for s in self.statuses)
        return self.counts[state]

    @property
    def failed(self) -> list[SlideStatus]:
        return [s for s in self.statuses if s.state in ("failed", "refused")]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def table(self) -> str:
        """A short human summary: counts per state, then one line per failed slide."""
        states = ("done", "degraded", "empty", "skipped", "locked", "refused", "failed")
        counts = "  ".join(f"{s} {self.count(s)}" for s in states if self.count(s))
        worked = [s for s in self.statuses if s.state in ("done", "degraded", "empty")]
        patches = sum(s.patches or 0 for s in worked)
        rate = f"; {patches / self.seconds:.1f} patches/s" if patches and self.seconds > 0 else ""
        lines = [
            f"{self.stage}: {len(self.statuses)} slide(s) in {self.seconds:.1f} s "
            f"({len(worked) / max(self.seconds, 1e-9) * 3600:.0f} slides/h{rate})",
            f"  {counts or 'nothing to do'}",
        ]
        if self.failed:
            width = max(len(s.slide_id) for s in self.failed)
            lines.append("  slides that need attention:")
            lines += [f"    {s.slide_id:<{width}}  {s.state:<7}  {s.message}" for s in self.failed]
        if self.count("locked"):
            lines.append(f"  {self.count('locked')} slide(s) were being processed by another process; "
                         "rerun this command once it has finished to check they are done")
        degraded = [s for s in self.statuses if s.state == "degraded"]
        if degraded:
            lines.append("  slides kept with unreadable parts (status 'degraded'):")
            width = max(len(s.slide_id) for s in degraded)
            lines += [f"    {s.slide_id:<{width}}  {s.message}" for s in degraded[:20]]
        empties = [s for s in self.statuses if s.state == "empty"]
        if empties:
            lines.append("  slides with no patches (status 'empty'):")
            width = max(len(s.slide_id) for s in empties)
            lines += [f"    {s.slide_id:<{width}}  {s.message}" for s in empties[:20]]
        return "\n".join(lines)


# -- files ------------------------------------------------------------------------------------

def temp_path_for(final: Path) -> Path:
    """A temporary name in the final folder (so the rename is atomic on one filesystem)."""
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def commit(tmp: Path, final: Path, durable: bool = True) -> None:
    """fsync ``tmp`` and rename it over ``final``; the final name appears complete or not at all.

    ``durable=False`` skips both fsyncs (file and folder): the rename is still atomic and a
    killed process still leaves nothing half-written, but after a power loss or kernel crash a
    just-committed file may be missing or empty; the runner then redoes that slide, because
    "done" means "opens and carries the fingerprint".
    """
    if durable:
        fsync_file(tmp)
    os.replace(tmp, final)
    if durable:
        fsync_dir(final.parent)


def read_fingerprint(path: Path) -> str | None:
    """The fingerprint stored in an HDF5 output, or None when the file is missing or unreadable."""
    import h5py

    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("fingerprint")
    except (OSError, KeyError, ValueError):
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return None if value is None else str(value)


def stamp_fingerprint(path: Path, value: str, stage: str) -> None:
    import h5py

    with h5py.File(path, "a") as f:
        f.attrs["fingerprint"] = value
        f.attrs["stage"] = stage


def check_stage_params(out_dir: Path, params: dict, fingerprint_value: str, overwrite: bool) -> None:
    """Record the parameters of an output folder; refuse other parameters unless ``overwrite``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / "params.json"
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except ValueError:
            old = {}
        if old.get("fingerprint") not in (None, fingerprint_value) and not overwrite:
            changed = sorted(
                k for k in set(params) | set(old.get("params", {}))
                if params.get(k) != old.get("params", {}).get(k)
            )
            raise ConfigError(
                f"{out_dir} holds outputs made with other parameters (changed: "
                f"{', '.join(changed) or 'unknown'}); rerun with --overwrite to replace them, "
                "or choose another output tag"
            )
    tmp = temp_path_for(record)
    tmp.write_text(json.dumps({"fingerprint": fingerprint_value, "params": params}, indent=2, default=str))
    os.replace(tmp, record)


# -- locks ------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_info() -> dict:
    """What a lock (and a record) says about its holder: host, pid, time, and the Slurm job."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), **current_job()}


def holder_is_gone(info: dict, age_s: float, stale_lock_s: float) -> bool:
    """Whether the process that wrote lock ``info`` (``age_s`` old) can no longer be working.

    Same host: its pid is dead, or it was written before this machine last booted (a power loss
    may hand its pid to another process). A Slurm job: it is an earlier run of this very job or
    array task (requeued since: SLURM_RESTART_COUNT), or the scheduler says it no longer runs.
    Otherwise: older than ``stale_lock_s``.
    """
    here = info.get("host") == socket.gethostname()
    if here and (not pid_alive(int(info.get("pid", -1))) or float(info.get("time") or 0) < boot_time()):
        return True
    if info.get("job"):
        if earlier_run_of_this_job(info):
            return True
        if not here and job_running(str(info["job"])) is False:
            return True
    return not here and age_s > stale_lock_s


def boot_time() -> float:
    """When this machine last booted (Unix time; 0 where unknown)."""
    global _BOOT_TIME
    if _BOOT_TIME is None:
        _BOOT_TIME = 0.0
        with contextlib.suppress(OSError, ValueError):
            with open("/proc/stat") as f:
                for line in f:
                    if line.startswith("btime "):
                        _BOOT_TIME = float(line.split()[1])
                        break
    return _BOOT_TIME


_BOOT_TIME: float | None = None


class SlideLock:
    """An exclusive claim on one slide: ``<dir>/.locks/<slide_id>.lock``."""

    def __init__(self, lock_dir: Path, slide_id: str, stale_lock_s: float):
        self.path = lock_dir / f"{slide_id}.lock"
        self.stale_lock_s = stale_lock_s
        self.held = False

    def acquire(self) -> bool:
        # The lock appears with its content in one step (write a private file, then hard-link it
        # to the lock name, which fails if the lock exists): a competitor never reads an empty
        # lock file and mistakes it for a stale one. os.link is atomic on local disks and NFS.
        mine = self.path.with_name(f".{self.path.name}.{socket.gethostname()}-{os.getpid()}")
        try:
            mine.write_text(json.dumps(lock_info()))
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            mine.write_text(json.dumps(lock_info()))
        try:
            for _ in range(2):
                try:
                    os.link(mine, self.path)
                except FileExistsError:
                    if not self._take_over_if_stale():
                        return False
                    continue
                self.held = True
                return True
            return False
        finally:
            mine.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> bool:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: try again
        except OSError:
            text, age = "", float("inf")
        try:
            info = json.loads(text) if text else {}
        except ValueError:
            info = {}
        if info:
            stale = holder_is_gone(info, age, self.stale_lock_s)
        else:  # unreadable: a crash of an older writer; give it a minute before taking over
            stale = age > 60
        if not stale:
            return False
        # Renaming is atomic: of several processes taking over the same stale lock, one wins.
        grave = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return True
        try:
            moved = grave.read_text()
        except OSError:
            moved = text
        if moved != text:
            # Another process replaced the stale lock with its own between our read and our
            # rename: give it back rather than steal a live claim.
            with contextlib.suppress(OSError):
                os.link(grave, self.path)
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        log.info("took over stale lock %s (held by %s)", self.path.name, info)
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# -- the loop ---------------------------------------------------------------------------------

class _Leftovers:
    """Temporary files of killed runs, found with one scan per output folder and batch.

    A glob per slide would list the whole output folder each time (quadratic at 30,000
    slides); a slide's leftovers are deleted only once its lock is held, so a live writer's
    temporary file is never touched.
    """

    def __init__(self):
        self._by_folder: dict[Path, dict[str, list[str]]] = {}

    def of(self, final: Path) -> list[Path]:
        folder = final.parent
        found = self._by_folder.get(folder)
        if found is None:
            found = {}
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(folder):
                    name = entry.name
                    if name.startswith(".") and ".tmp-" in name:
                        found.setdefault(name[1:name.index(".tmp-")], []).append(name)
            self._by_folder[folder] = found
        return [folder / n for n in found.pop(final.name, ())]


def run_slides(
    stage: str,
    rows: Iterable,
    out_dir: Path,
    output_path: Callable[[object], Path],
    fingerprint_value: str,
    work: Callable[[object, Path], SlideOutcome],
    overwrite: bool = False,
    progress: bool = True,
    stale_lock_s: float = 6 * 3600,
    durable: bool = True,
    manifest: Path | None = None,
) -> BatchSummary:
    """Run ``work`` once per manifest row that is not done yet.

    Parameters
    ----------
    stage : name for logs and the summary ("segment", "extract").
    rows : manifest rows (objects with ``slide_id``).
    out_dir : folder of ``status.csv``, ``.records/`` and ``.locks/``.
    output_path : final output file of a row.
    fingerprint_value : digest of the parameters; stored in each output.
    work : writes the output of one row to the temporary path it is given; raises a
        :class:`PipelineError` (or anything else) to fail that slide alone.
    overwrite : redo slides whose outputs were made with other parameters.
    stale_lock_s : age after which another host's lock is taken over when neither its process
        nor its Slurm job can be checked.
    durable : outputs, their names and their records are fsynced before a slide counts as
        done (in groups, by :class:`~pipeline.commit_group.GroupCommitter`, which states what a
        kill -9 and a power loss each leave); ``False`` skips the flushes (a kill -9 still
        leaves nothing half-written; a power loss may cost the last slides, which are redone).
    manifest : the manifest the rows come from, remembered in ``<out_dir>/manifest.json`` so
        that ``wsi-pipeline status`` can count the slides still pending.

    Each finished slide costs a constant amount of bookkeeping (its lock, one appended record,
    a share of one group flush); ``status.csv`` is rebuilt once, when the batch ends (also after
    Ctrl-C, once the slides already finished are committed).
    """
    from tqdm.auto import tqdm

    from .commit_group import Finished, GroupCommitter

    rows = list(rows)
    records = SlideRecords(out_dir)
    summary = BatchSummary(stage)
    lock_dir = out_dir / ".locks"
    leftovers = _Leftovers()
    if manifest is not None:
        _remember_manifest(out_dir, Path(manifest))
    start = time.perf_counter()
    # Under nohup or a batch scheduler a progress bar fills the log with carriage returns:
    # there, one log line per slide tells how far an overnight batch got.
    interactive = progress and sys.stderr.isatty()
    bar = tqdm(rows, desc=stage, unit="slide", disable=not interactive, dynamic_ncols=True)

    # A slide's line is logged once it is committed, possibly after the next slide's failure:
    # its number is its place in the manifest.
    position = {row.slide_id: i for i, row in enumerate(rows, 1)}

    def report(status: SlideStatus) -> None:
        summary.add(status)
        rate = f", {status.patches} patches ({status.patches_per_s:.1f}/s)" if status.patches_per_s else ""
        log.log(logging.DEBUG if interactive else logging.INFO, "%s [%d/%d] %s: %s in %.1f s%s",
                stage, position.get(status.slide_id, 0), len(rows), status.slide_id, status.state,
                status.seconds, rate)

    def fatal(exc: BaseException) -> PipelineError:
        return PipelineError(f"{stage} stopped: {describe_os_error(exc) if isinstance(exc, OSError) else exc}")

    committer = GroupCommitter(records, durable, fail=_commit_failed, fatal=lambda e: bool(workspace_problem(e)))
    try:
        for row in bar:
            try:
                result = _one_slide(stage, row, output_path(row), fingerprint_value, work, overwrite,
                                    lock_dir, stale_lock_s, records, leftovers)
            except OSError as exc:  # outside the slide's own try (its lock, its name): still only this slide
                if workspace_problem(exc):
                    raise PipelineError(f"{stage} stopped at {row.slide_id}: {describe_os_error(exc)}") from exc
                result = SlideStatus(row.slide_id, "failed", 0.0, describe_os_error(exc))
                log.warning("%s %s failed: %s", stage, row.slide_id, result.message)
            if isinstance(result, Finished):
                try:
                    committer.submit(result)
                except OSError as exc:
                    raise fatal(exc) from exc
            else:
                report(result)
            for status in committer.results():
                report(status)
            if interactive:
                bar.set_postfix_str(
                    " ".join(f"{s}={summary.count(s)}" for s in ("done", "skipped", "empty", "failed")
                             if summary.count(s)),
                    refresh=False,
                )
    finally:
        try:
            for status in committer.close():
                report(status)
        except OSError as exc:
            raise fatal(exc) from exc
        finally:
            if summary.count("done") + summary.count("degraded") + summary.count("empty") \
                    + summary.count("failed") + summary.count("refused"):
                try:
                    StatusFile(out_dir / "status.csv").rebuild(records)
                except OSError as exc:  # e.g. the full disk that stopped the batch: keep its message
                    log.warning("status.csv not rebuilt: %s", describe_os_error(exc))
    summary.seconds = time.perf_counter() - start
    return summary


def _commit_failed(item, exc: BaseException) -> SlideStatus:
    """The status of a slide whose output could not be flushed or renamed into place."""
    message = describe_os_error(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
    log.warning("%s could not be committed: %s", item.slide_id, message)
    return SlideStatus(item.slide_id, "failed", item.status.seconds, message)


def _remember_manifest(out_dir: Path, manifest: Path) -> None:
    path = out_dir / "manifest.json"
    text = json.dumps({"manifest": str(manifest.resolve())})
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return
    atomic_write_text(path, text)


def _record(status: SlideStatus, started: float) -> dict:
    rate = status.patches_per_s
    return {
        "slide_id": status.slide_id,
        "state": status.state,
        "seconds": round(status.seconds, 3),
        "patches": status.patches,
        "patches_per_s": None if rate is None else round(rate, 1),
        "message": status.message.replace("\n", " ")[:500],
        "extra": dict(status.extra),  # stage-specific status.csv columns (e.g. ink area)
        **lock_info(),
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "finished_time": time.time(),
    }


def _one_slide(stage, row, final: Path, fingerprint_value, work, overwrite, lock_dir,
               stale_lock_s, records: SlideRecords, leftovers: _Leftovers):
    """One slide up to its committed-or-not outcome: a final :class:`SlideStatus`, or a
    :class:`~pipeline.commit_group.Finished` slide (complete temporary file, lock held) for the
    committer."""
    from .commit_group import Finished

    sid = row.slide_id
    started = time.time()
    existing = read_fingerprint(final)
    if existing == fingerprint_value and not overwrite:
        return SlideStatus(sid, "skipped", message="done earlier")
    if existing is not None and existing != fingerprint_value and not overwrite:
        status = SlideStatus(
            sid, "refused",
            message=f"{final.name} was made with other parameters; rerun with --overwrite to replace it",
        )
        records.write(_record(status, started))
        return status

    lock = SlideLock(lock_dir, sid, stale_lock_s)
    if not lock.acquire():
        return SlideStatus(sid, "locked", message="another process is working on it")
    tmp = temp_path_for(final)
    t0 = time.perf_counter()
    status = finished = None
    try:
        # Another process may have finished it between our check and our lock.
        if read_fingerprint(final) == fingerprint_value and not overwrite:
            return SlideStatus(sid, "skipped", message="done by another process")
        final.parent.mkdir(parents=True, exist_ok=True)
        for leftover in leftovers.of(final):
            leftover.unlink(missing_ok=True)  # a killed run's partial file; we hold the lock
        outcome = work(row, tmp)
        if not tmp.is_file():
            raise PipelineError(f"internal error: the {stage} step wrote no output for {sid}")
        stamp_fingerprint(tmp, fingerprint_value, stage)
        done = SlideStatus(sid, outcome.state, time.perf_counter() - t0, outcome.message, outcome.patches,
                           dict(outcome.extra))
        finished = Finished(sid, tmp, final, lock.release, done, lambda st: _record(st, started))
        return finished
    except KeyboardInterrupt:
        tmp.unlink(missing_ok=True)
        lock.release()
        raise
    except PipelineError as exc:
        status = SlideStatus(sid, "failed", time.perf_counter() - t0, str(exc).splitlines()[0])
        log.warning("%s %s failed: %s", stage, sid, exc)
    except Exception as exc:  # one bad slide never stops the batch, a full disk does
        if workspace_problem(exc):
            raise PipelineError(f"{stage} stopped at {sid}: {workspace_problem(exc)} ({exc}); free space and "
                                "rerun the same command, finished slides are kept") from exc
        status = SlideStatus(sid, "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}".splitlines()[0])
        log.warning("%s %s failed unexpectedly: %s", stage, sid, exc)
        log.debug("%s", traceback.format_exc())
    finally:
        if finished is None:  # the committer owns a finished slide's file and lock
            tmp.unlink(missing_ok=True)
            # The record is written while the lock is still held, so `status` never sees a
            # slide with neither a live lock nor its outcome.
            if status is not None:
                records.write(_record(status, started))
            lock.release()
    return status
