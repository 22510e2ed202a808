"""Per-slide records, status.csv built from them, scheduler-aware lock takeover, and
`wsi-pipeline status` on a workspace while a live process holds a slide."""

import json
import multiprocessing as mp
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from extract.errors import SlideError
from pipeline.cli import main
from pipeline.runner import SlideOutcome, StatusFile, run_slides
from pipeline.status import format_status, workspace_status


@dataclass(frozen=True)
class Row:
    slide_id: str


def write_h5(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["coords"] = np.zeros((3, 2), np.int64)


def ok_work(row, tmp):
    write_h5(tmp)
    return SlideOutcome("done", patches=3)


def run(root: Path, rows, work=ok_work, **kw):
    return run_slides("test", rows, root, lambda r: root / "out" / f"{r.slide_id}.h5", "fp", work,
                      progress=False, **kw)


def test_each_slide_has_its_own_record_and_status_csv_is_rebuilt_from_them(tmp_path):
    # rows of a status.csv written before records existed are kept
    (tmp_path / "status.csv").write_text("slide_id,state,seconds,patches,patches_per_s,message,host,pid,finished\n"
                                         "old,done,1.00,5,,,h,1,2020-01-01T00:00:00\n")
    summary = run(tmp_path, [Row(f"s{i}") for i in range(4)],
                  work=lambda r, t: (_ for _ in ()).throw(SlideError("unreadable")) if r.slide_id == "s2" else ok_work(r, t))
    assert summary.count("done") == 3 and summary.count("failed") == 1
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / ".records").glob("*.json")}
    assert sorted(records) == ["s0", "s1", "s2", "s3"]
    assert records["s2"]["state"] == "failed" and records["s2"]["message"] == "unreadable"
    assert records["s0"]["pid"] == os.getpid() and records["s0"]["patches"] == 3
    rows = StatusFile(tmp_path / "status.csv").read()
    assert sorted(rows) == ["old", "s0", "s1", "s2", "s3"]
    assert rows["s2"]["state"] == "failed" and rows["old"]["patches"] == "5"


def test_an_interrupted_batch_still_leaves_a_complete_status_csv(tmp_path):
    def work(row, tmp):
        if row.slide_id == "s2":
            raise KeyboardInterrupt
        return ok_work(row, tmp)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, [Row(f"s{i}") for i in range(4)], work=work)
    rows = StatusFile(tmp_path / "status.csv").read()
    assert sorted(rows) == ["s0", "s1"] and all(r["state"] == "done" for r in rows.values())


# -- locks of Slurm jobs --------------------------------------------------------------------------

FAKE_SQUEUE = """#!/bin/sh
# squeue --noheader --jobs JOB --format %T, answering from the test's table
job="$3"
case "$job" in
  701_1) exit 0 ;;                       # finished: squeue no longer lists it
  702_1) echo RUNNING ;;
  703_1) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;
  704_1) echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1 ;;
  705_1) echo PENDING ;;                  # requeued: no process holds its old locks
  706_1) echo RUNNING ;;                  # that is this very task, requeued
esac
"""


def _foreign_lock(root: Path, slide: str, job: str, job_id: str) -> None:
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    (root / ".locks" / f"{slide}.lock").write_text(json.dumps(
        {"host": "node-elsewhere", "pid": 4242, "time": time.time(), "job": job, "job_id": job_id}))


def test_a_lock_whose_slurm_job_is_gone_is_taken_over_at_once(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(FAKE_SQUEUE)
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "ws"
    for i, job in enumerate(["701_1", "702_1", "703_1", "704_1", "705_1"]):
        _foreign_lock(root, f"s{i}", job, str(900 + i))
    calls: list = []

    def work(row, tmp):
        calls.append(row.slide_id)
        return ok_work(row, tmp)

    summary = run(root, [Row(f"s{i}") for i in range(5)], work=work, stale_lock_s=24 * 3600)
    # gone (not listed, invalid id, pending after requeue): taken over; running or unknown: left
    assert calls == ["s0", "s2", "s4"]
    assert summary.count("locked") == 2

    # a requeued array task meets the lock of its own pre-empted run on another node
    _foreign_lock(root, "s5", "706_1", "1706")
    monkeypatch.setenv("SLURM_JOB_ID", "1706")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "706")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    summary = run(root, [Row("s5")], work=work)
    assert calls[-1] == "s5" and summary.count("done") == 1
    record = json.loads((root / ".records" / "s5.json").read_text())
    assert record["job"] == "706_1" and record["job_id"] == "1706"


# -- status of a workspace mid-run -----------------------------------------------------------------

def _slow_worker(ws: str, manifest: str, release: str) -> None:
    root = Path(ws) / "segment" / "t1"

    def work(row, tmp):
        if row.slide_id == "s1":
            raise SlideError("s1.svs: cannot open (truncated file)")
        if row.slide_id == "s3":
            while not os.path.exists(release):
                time.sleep(0.02)
        write_h5(tmp)
        return SlideOutcome("done", patches=3)

    rows = [Row(f"s{i}") for i in range(6)]
    run_slides("segment", rows, root, lambda r: root / "coords" / f"{r.slide_id}.h5", "fp", work,
               progress=False, manifest=Path(manifest))


def test_status_mid_run_shows_running_done_failed_and_pending(tmp_path, capsys):
    ws = tmp_path / "ws"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("slide_id,path\n" + "".join(f"s{i},s{i}.svs\n" for i in range(6)))
    release = tmp_path / "release"
    proc = mp.get_context("spawn").Process(target=_slow_worker, args=(str(ws), str(manifest), str(release)))
    proc.start()
    try:
        lock = ws / "segment" / "t1" / ".locks" / "s3.lock"
        deadline = time.time() + 60
        while not lock.exists() and time.time() < deadline:
            time.sleep(0.02)
        assert lock.exists()
        (st,) = workspace_status(ws)
        assert (st.stage, st.output, st.total) == ("segment", "t1", 6)
        assert (st.done, st.failed, st.running, st.pending) == (2, 1, 1, 2)
        assert [(h.item, h.pid, h.host) for h in st.holders] == [("s3", proc.pid, socket.gethostname())]
        assert st.failures == [("s1", "s1.svs: cannot open (truncated file)")]
        text = format_status([st], ws)
        assert "s3" in text and f"{socket.gethostname()}:{proc.pid}" in text
        assert "s1.svs: cannot open (truncated file)" in text

        assert main(["status", "--workspace", str(ws), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["stages"][0]["running"] == 1 and data["stages"][0]["holders"][0]["item"] == "s3"
    finally:
        release.touch()
        proc.join(60)
    (st,) = workspace_status(ws)
    assert (st.done, st.failed, st.running, st.pending) == (5, 1, 0, 0)
    assert st.per_hour is not None and st.per_hour > 0
