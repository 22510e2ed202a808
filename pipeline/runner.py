"""The one per-slide loop every stage goes through.

It owns, for each slide: skip when done, the exclusive lock, the temporary output, the atomic
commit, the status row, the progress bar and the error boundary. A stage supplies only a
``work(row, tmp_path) -> SlideOutcome`` function that writes one HDF5 file to ``tmp_path``.

"Done" means: the final file exists, opens, and carries the fingerprint of the parameters asked
for. A slide made with other parameters is refused unless ``overwrite``; a partial or corrupt
file is redone. Several processes (shards, GPUs, nodes on a shared filesystem) may run the same
batch: each slide is claimed with an ``O_CREAT | O_EXCL`` lock file that names its host, pid and
start time, and a lock whose process is dead (same host) or older than ``stale_lock_s`` (other
hosts) is taken over.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from extract.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

STATUS_FIELDS = ("slide_id", "state", "seconds", "patches", "patches_per_s", "message", "host", "pid", "finished")
# States a slide can end a batch in. 'done'/'empty'/'skipped' are successes; 'locked' means
# another live process holds it; 'failed' and 'refused' make the command exit non-zero.
OK_STATES = ("done", "empty", "skipped")


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

    def count(self, state: str) -> int:
        return sum(s.state == state for s in self.statuses)

    @property
    def failed(self) -> list[SlideStatus]:
        return [s for s in self.statuses if s.state in ("failed", "refused")]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def table(self) -> str:
        """A short human summary: counts per state, then one line per failed slide."""
        states = ("done", "empty", "skipped", "locked", "refused", "failed")
        counts = "  ".join(f"{s} {self.count(s)}" for s in states if self.count(s))
        worked = [s for s in self.statuses if s.state in ("done", "empty")]
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


def commit(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and rename it over ``final``; the final name appears complete or not at all."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    with contextlib.suppress(OSError):
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


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


class SlideLock:
    """An exclusive claim on one slide: ``<dir>/.locks/<slide_id>.lock``."""

    def __init__(self, lock_dir: Path, slide_id: str, stale_lock_s: float):
        self.path = lock_dir / f"{slide_id}.lock"
        self.stale_lock_s = stale_lock_s
        self.held = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The lock appears with its content in one step (write a private file, then hard-link it
        # to the lock name, which fails if the lock exists): a competitor never reads an empty
        # lock file and mistakes it for a stale one. os.link is atomic on local disks and NFS.
        mine = self.path.with_name(f".{self.path.name}.{socket.gethostname()}-{os.getpid()}")
        mine.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}))
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
        same_host = info.get("host") == socket.gethostname()
        if info:
            stale = (same_host and not pid_alive(int(info.get("pid", -1)))) or (
                not same_host and age > self.stale_lock_s)
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


# -- status -----------------------------------------------------------------------------------

class StatusFile:
    """``status.csv`` with one row per slide, updated under an exclusive file lock."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        with open(self.path, newline="") as f:
            return {row["slide_id"]: row for row in csv.DictReader(f)}

    def update(self, status: SlideStatus) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(".status.lock"), "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            rows = self.read()
            rate = status.patches_per_s
            rows[status.slide_id] = {
                "slide_id": status.slide_id,
                "state": status.state,
                "seconds": f"{status.seconds:.2f}",
                "patches": "" if status.patches is None else status.patches,
                "patches_per_s": "" if rate is None else f"{rate:.1f}",
                "message": status.message.replace("\n", " ")[:500],
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **status.extra,
            }
            extra_fields = list(dict.fromkeys(k for row in rows.values() for k in row if k not in STATUS_FIELDS))
            # Under the lock, any other temporary status file is a killed writer's leftover.
            for leftover in self.path.parent.glob(f".{self.path.name}.tmp-*"):
                leftover.unlink(missing_ok=True)
            tmp = temp_path_for(self.path)
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=[*STATUS_FIELDS, *extra_fields], extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows.values())
            os.replace(tmp, self.path)


# -- the loop ---------------------------------------------------------------------------------

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
) -> BatchSummary:
    """Run ``work`` once per manifest row that is not done yet.

    Parameters
    ----------
    stage : name for logs and the summary ("segment", "extract").
    rows : manifest rows (objects with ``slide_id``).
    out_dir : folder of ``status.csv`` and ``.locks/``.
    output_path : final output file of a row.
    fingerprint_value : digest of the parameters; stored in each output.
    work : writes the output of one row to the temporary path it is given; raises a
        :class:`PipelineError` (or anything else) to fail that slide alone.
    overwrite : redo slides whose outputs were made with other parameters.
    """
    from tqdm.auto import tqdm

    rows = list(rows)
    status_file = StatusFile(out_dir / "status.csv")
    summary = BatchSummary(stage)
    lock_dir = out_dir / ".locks"
    start = time.perf_counter()
    # Under nohup or a batch scheduler a progress bar fills the log with carriage returns:
    # there, one log line per slide tells how far an overnight batch got.
    interactive = progress and sys.stderr.isatty()
    bar = tqdm(rows, desc=stage, unit="slide", disable=not interactive, dynamic_ncols=True)
    for i, row in enumerate(bar, 1):
        status = _one_slide(stage, row, output_path(row), fingerprint_value, work, overwrite,
                            lock_dir, stale_lock_s, status_file)
        summary.statuses.append(status)
        rate = f", {status.patches} patches ({status.patches_per_s:.1f}/s)" if status.patches_per_s else ""
        log.log(logging.DEBUG if interactive else logging.INFO, "%s [%d/%d] %s: %s in %.1f s%s",
                stage, i, len(rows), row.slide_id, status.state, status.seconds, rate)
        bar.set_postfix_str(
            " ".join(f"{s}={summary.count(s)}" for s in ("done", "skipped", "empty", "failed") if summary.count(s)),
            refresh=False,
        )
    summary.seconds = time.perf_counter() - start
    return summary


def _one_slide(stage, row, final: Path, fingerprint_value, work, overwrite, lock_dir,
               stale_lock_s, status_file) -> SlideStatus:
    sid = row.slide_id
    existing = read_fingerprint(final)
    if existing == fingerprint_value and not overwrite:
        return SlideStatus(sid, "skipped", message="done earlier")
    if existing is not None and existing != fingerprint_value and not overwrite:
        status = SlideStatus(
            sid, "refused",
            message=f"{final.name} was made with other parameters; rerun with --overwrite to replace it",
        )
        status_file.update(status)
        return status

    lock = SlideLock(lock_dir, sid, stale_lock_s)
    if not lock.acquire():
        return SlideStatus(sid, "locked", message="another process is working on it")
    tmp = temp_path_for(final)
    t0 = time.perf_counter()
    try:
        # Another process may have finished it between our check and our lock.
        if read_fingerprint(final) == fingerprint_value and not overwrite:
            return SlideStatus(sid, "skipped", message="done by another process")
        final.parent.mkdir(parents=True, exist_ok=True)
        for leftover in final.parent.glob(f".{final.name}.tmp-*"):
            leftover.unlink(missing_ok=True)  # a killed run's partial file; we hold the lock
        outcome = work(row, tmp)
        if not tmp.is_file():
            raise PipelineError(f"internal error: the {stage} step wrote no output for {sid}")
        stamp_fingerprint(tmp, fingerprint_value, stage)
        commit(tmp, final)
        status = SlideStatus(sid, outcome.state, time.perf_counter() - t0, outcome.message, outcome.patches,
                             dict(outcome.extra))
    except KeyboardInterrupt:
        tmp.unlink(missing_ok=True)
        lock.release()
        raise
    except PipelineError as exc:
        status = SlideStatus(sid, "failed", time.perf_counter() - t0, str(exc).splitlines()[0])
        log.warning("%s %s failed: %s", stage, sid, exc)
    except Exception as exc:  # one bad slide never stops the batch
        status = SlideStatus(sid, "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}".splitlines()[0])
        log.warning("%s %s failed unexpectedly: %s", stage, sid, exc)
        log.debug("%s", traceback.format_exc())
    finally:
        tmp.unlink(missing_ok=True)
        lock.release()
    status_file.update(status)
    return status
