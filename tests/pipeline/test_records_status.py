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
from pipeline.runner import SlideOutcome, SlideRecords, StatusFile, run_slides
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
    (log,) = (tmp_path / ".records").glob("*.jsonl")  # one append-only log for this process
    assert log.name.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    records = {r["slide_id"]: r for r in map(json.loads, log.read_text().splitlines())}
    assert sorted(records) == ["s0", "s1", "s2", "s3"]
    assert records["s2"]["state"] == "failed" and records["s2"]["message"] == "unreadable"
    assert records["s0"]["pid"] == os.getpid() and records["s0"]["patches"] == 3
    rows = StatusFile(tmp_path / "status.csv").read()
    assert sorted(rows) == ["old", "s0", "s1", "s2", "s3"]
    assert rows["s2"]["state"] == "failed" and rows["old"]["patches"] == "5"


def test_records_merge_logs_latest_wins_and_a_torn_last_line_is_ignored(tmp_path):
    run(tmp_path, [Row("s0")], work=lambda r, t: (_ for _ in ()).throw(SlideError("unreadable")))
    run(tmp_path, [Row("s0"), Row("s1")])  # a later process redoes s0
    logs = sorted((tmp_path / ".records").glob("*.jsonl"))
    assert len(logs) == 2
    # a power loss mid-append: half a line, then the zeros the disk kept of the rest
    with open(logs[0], "ab") as f:
        f.write(b'{"slide_id":"s1","state":"fai' + b"\0" * 20)
    # a record from an earlier version (one JSON file per slide) is still read
    (tmp_path / ".records" / "old.json").write_text(json.dumps({"slide_id": "old", "state": "empty"}))
    records = SlideRecords(tmp_path).all()
    assert {sid: r["state"] for sid, r in records.items()} == {"s0": "done", "s1": "done", "old": "empty"}
    assert StatusFile(tmp_path / "status.csv").read()["s0"]["state"] == "done"


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
  706_1) echo RUNNING ;;                  # this very task (siblings, or its requeued self)
esac
"""


def _foreign_lock(root: Path, slide: str, job: str, job_id: str, **more) -> None:
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    (root / ".locks" / f"{slide}.lock").write_text(json.dumps(
        {"host": "node-elsewhere", "pid": 4242, "time": time.time(), "job": job, "job_id": job_id, **more}))


def test_a_lock_whose_slurm_job_is_gone_is_taken_over_at_once(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(FAKE_SQUEUE)
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
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

    # the same array task, same run, on another node (squeue: RUNNING): a live sibling, left alone
    _foreign_lock(root, "s5", "706_1", "1706")
    monkeypatch.setenv("SLURM_JOB_ID", "1706")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "706")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert run(root, [Row("s5")], work=work).count("locked") == 1
    # requeued (Slurm sets SLURM_RESTART_COUNT=1): the lock is its own pre-empted run's, taken at once
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    summary = run(root, [Row("s5")], work=work)
    assert calls[-1] == "s5" and summary.count("done") == 1
    record = SlideRecords(root).get("s5")
    assert (record["job"], record["job_id"], record["restart"]) == ("706_1", "1706", 1)
    # a lock of the requeued run itself (same count) is not taken over by its siblings
    _foreign_lock(root, "s6", "706_1", "1706", restart=1)
    assert run(root, [Row("s6")], work=work).count("locked") == 1


def test_a_lock_from_before_this_machine_booted_is_taken_over_even_if_its_pid_now_lives(tmp_path):
    # after a power loss the pid in a lock may belong to an unrelated new process (here: us)
    (tmp_path / ".locks").mkdir()
    (tmp_path / ".locks" / "s0.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "time": 1.0}))
    assert run(tmp_path, [Row("s0")]).count("done") == 1


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
        # s0 and s2 are committed by the runner's committer thread while s3 is being worked on
        (st,) = workspace_status(ws)
        while st.done < 2 and time.time() < deadline:
            time.sleep(0.02)
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
