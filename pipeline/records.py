"""Per-slide outcome records and the ``status.csv`` aggregated from them.

Each process appends the outcomes of the slides it finishes (done, empty, failed, refused) to
its own log, ``<stage dir>/.records/<host>-<pid>-<start>.jsonl``: one JSON object per line, one
file opened once, so a record costs one ``write`` (plus, in a durable batch, a share of one
``fsync`` per group of slides) at the 30,000th slide as at the first. No two processes ever
write to the same file, so appends need no lock, also on NFS.

Reading merges every log (and the ``<slide_id>.json`` files of earlier versions): per slide, the
record with the latest ``finished_time`` wins. A line that does not parse (the torn tail of a
log whose writer was killed mid-write or lost power) is ignored; it can only be a process's
last line, because a log is never appended to by another process afterwards.

A record is bookkeeping, never the proof that a slide is done: that is the output file (it
exists, opens and carries the fingerprint). The runner appends a 'done' record only after the
output's data and name are durable (see :mod:`pipeline.commit_group`), so a record that
survives a power loss never names an output that did not.

``status.csv`` (one row per slide, for people and spreadsheets) is rebuilt from the records at
the end of each batch; rows of an older ``status.csv`` with no record are kept.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from extract.runtime import fsync_dir

STATUS_FIELDS = ("slide_id", "state", "seconds", "patches", "patches_per_s", "message", "host", "pid", "finished")
RECORD_DIR = ".records"
LOG_SUFFIX = ".jsonl"


def _private_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


class SlideRecords:
    """The ``.records/`` folder of one stage output folder: this process's log, and every log.

    Thread-safe for writing (the runner's committer thread and its main thread share one log).
    """

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / RECORD_DIR
        self._log = None
        self._write_lock = threading.Lock()
        self._offsets: dict[str, int] = {}  # bytes of each log already read
        self._index: dict[str, dict] = {}

    # -- writing ----------------------------------------------------------------------------

    def append(self, records: list[dict], durable: bool = False) -> None:
        """Append ``records`` to this process's log in one write; with ``durable``, fsync it.

        After the call the records are in the operating system (a kill -9 keeps them); with
        ``durable`` they are on disk (a power loss keeps them).
        """
        if not records:
            return
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        with self._write_lock:
            if self._log is None:
                self._open_log()
            self._log.write(text)
            self._log.flush()
            if durable:
                os.fsync(self._log.fileno())

    def write(self, record: dict) -> None:
        """Append one record (not fsynced)."""
        self.append([record])

    def _open_log(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns():x}{LOG_SUFFIX}"
        self._log = open(self.dir / name, "a", encoding="utf-8")
        # The new name itself must survive a power loss for the log's fsyncs to mean anything.
        fsync_dir(self.dir)
        fsync_dir(self.dir.parent)

    def close(self) -> None:
        with self._write_lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    # -- reading ----------------------------------------------------------------------------

    def all(self) -> dict[str, dict]:
        """Every readable record by slide id, the latest per slide (reads only what is new
        since this object's last read)."""
        self._refresh()
        return dict(self._index)

    def get(self, slide_id: str) -> dict | None:
        record = self._index.get(slide_id)
        if record is None:
            self._refresh()
            record = self._index.get(slide_id)
        return record

    def _keep(self, record: object, fallback_id: str | None = None) -> None:
        if not isinstance(record, dict):
            return
        sid = record.get("slide_id", fallback_id)
        if sid is None:
            return
        old = self._index.get(sid)
        if old is None or _when(record) >= _when(old):
            self._index[sid] = record

    def _refresh(self) -> None:
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue  # a killed writer's temporary file (earlier versions)
            if name.endswith(LOG_SUFFIX):
                self._read_log(entry.path, name)
            elif name.endswith(".json") and name not in self._offsets:
                # One file per slide, written by earlier versions; never rewritten now.
                self._offsets[name] = 0
                try:
                    with open(entry.path, encoding="utf-8") as f:
                        self._keep(json.load(f), name[:-5])
                except (OSError, ValueError):
                    continue

    def _read_log(self, path: str, name: str) -> None:
        start = self._offsets.get(name, 0)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
        except OSError:
            return
        # Only whole lines: a line still being written is read next time; a torn line that
        # stays the last one forever (its writer died) is never consumed, never parsed.
        end = data.rfind(b"\n") + 1
        self._offsets[name] = start + end
        for line in data[:end].splitlines():
            try:
                self._keep(json.loads(line))
            except ValueError:
                continue  # bytes a power loss left where a line was being written


def _when(record: dict) -> float:
    value = record.get("finished_time")
    return float(value) if isinstance(value, (int, float)) else 0.0


def csv_row(record: dict) -> dict:
    """A record as a ``status.csv`` row (the file keeps its historical columns)."""
    row = {k: record.get(k, "") for k in STATUS_FIELDS}
    row.update({k: v for k, v in (record.get("extra") or {}).items() if k not in row})
    for key in ("patches", "patches_per_s", "seconds"):
        if row[key] is None:
            row[key] = ""
    if isinstance(record.get("seconds"), float):
        row["seconds"] = f"{record['seconds']:.2f}"
    if isinstance(record.get("patches_per_s"), float):
        row["patches_per_s"] = f"{record['patches_per_s']:.1f}"
    return row


class StatusFile:
    """``status.csv``: one row per slide, rebuilt from the records (never edited per slide)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        with open(self.path, newline="") as f:
            return {row["slide_id"]: row for row in csv.DictReader(f)}

    def rebuild(self, records: SlideRecords) -> int:
        """Rewrite ``status.csv`` from the records; returns its number of rows.

        Several processes may finish at once: the file lock makes them write one after the
        other, each from a fresh scan, so the last file written is complete.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(".status.lock"), "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            rows = self.read()
            rows.update({sid: csv_row(r) for sid, r in records.all().items()})
            extra_fields = list(dict.fromkeys(k for row in rows.values() for k in row if k not in STATUS_FIELDS))
            # Under the lock, any other temporary status file is a killed writer's leftover.
            for leftover in self.path.parent.glob(f".{self.path.name}.tmp-*"):
                leftover.unlink(missing_ok=True)
            tmp = _private_name(self.path)
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=[*STATUS_FIELDS, *extra_fields], extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows[sid] for sid in sorted(rows))
            os.replace(tmp, self.path)
        return len(rows)
