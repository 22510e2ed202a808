"""Per-slide outcome records and the ``status.csv`` aggregated from them.

Each slide that ends a batch done, empty, failed or refused leaves one small JSON record,
``<stage dir>/.records/<slide_id>.json``, written to a private name and renamed into place, so a
reader sees the old record or the new one, never half of one, and writing it costs the same at
the 30,000th slide as at the first. ``status.csv`` (one row per slide, for people and
spreadsheets) is rebuilt from the records at the end of each batch; rows of an older
``status.csv`` with no record (written before records existed) are kept.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import socket
import time
from pathlib import Path

STATUS_FIELDS = ("slide_id", "state", "seconds", "patches", "patches_per_s", "message", "host", "pid", "finished")
RECORD_DIR = ".records"


def _private_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


class SlideRecords:
    """The ``.records/`` folder of one stage output folder."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / RECORD_DIR

    def path(self, slide_id: str) -> Path:
        return self.dir / f"{slide_id}.json"

    def write(self, record: dict) -> None:
        """Atomically replace the record of ``record['slide_id']`` (no fsync: a record is
        bookkeeping; the committed output file is what decides whether a slide is done)."""
        final = self.path(record["slide_id"])
        tmp = _private_name(final)
        try:
            tmp.write_text(json.dumps(record, separators=(",", ":")))
        except FileNotFoundError:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record, separators=(",", ":")))
        os.replace(tmp, final)

    def get(self, slide_id: str) -> dict | None:
        try:
            return json.loads(self.path(slide_id).read_text())
        except (OSError, ValueError):
            return None

    def all(self) -> dict[str, dict]:
        """Every readable record by slide id (one directory scan; killed writers' temps ignored)."""
        out: dict[str, dict] = {}
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return out
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue
            try:
                with open(entry.path) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue
            out[record.get("slide_id", entry.name[:-5])] = record
        return out

    def remove_leftovers(self, max_age_s: float = 3600.0) -> None:
        """Delete private files of killed writers (a live writer renames its own within ms)."""
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.dir):
                if entry.name.startswith(".") and ".tmp-" in entry.name:
                    with contextlib.suppress(OSError):
                        if now - entry.stat().st_mtime > max_age_s:
                            os.unlink(entry.path)


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
