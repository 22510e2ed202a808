"""The per-slide loop: skip, atomic commit, resume, refusal, failures, and two processes at once."""

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from extract.errors import ConfigError, SlideError
from pipeline.runner import StatusFile, SlideOutcome, check_stage_params, run_slides


@dataclass(frozen=True)
class Row:
    slide_id: str


def write_h5(path: Path, n: int = 3) -> None:
    with h5py.File(path, "w") as f:
        f["coords"] = np.arange(2 * n, dtype=np.int64).reshape(n, 2)


def make_work(calls: list, fail: set = frozenset()):
    def work(row, tmp):
        calls.append(row.slide_id)
        if row.slide_id in fail:
            raise SlideError(f"{row.slide_id}.svs: cannot open")
        write_h5(tmp)
        return SlideOutcome("done", patches=3)
    return work


def run(tmp_path, rows, work, fp="fp1", overwrite=False):
    return run_slides("test", rows, tmp_path, lambda r: tmp_path / "out" / f"{r.slide_id}.h5",
                      fp, work, overwrite=overwrite, progress=False)


def test_done_slides_are_skipped_and_a_bad_slide_does_not_stop_the_batch(tmp_path):
    rows = [Row(f"s{i}") for i in range(5)]
    calls: list = []
    summary = run(tmp_path, rows, make_work(calls, fail={"s2"}))
    assert calls == ["s0", "s1", "s2", "s3", "s4"]
    assert summary.count("done") == 4 and summary.count("failed") == 1 and summary.exit_code == 1
    assert "s2" in summary.table() and "cannot open" in summary.table()
    status = StatusFile(tmp_path / "status.csv").read()
    assert status["s2"]["state"] == "failed" and "cannot open" in status["s2"]["message"]
    assert status["s0"]["state"] == "done" and status["s0"]["patches"] == "3"
    assert not (tmp_path / "out" / "s2.h5").exists()

    calls.clear()
    summary = run(tmp_path, rows, make_work(calls))
    assert calls == ["s2"]  # only the failed one is redone
    assert summary.count("skipped") == 4 and summary.exit_code == 0


def test_leftover_temp_and_truncated_outputs_are_redone(tmp_path):
    rows = [Row("a"), Row("b")]
    run(tmp_path, rows, make_work([]))
    out = tmp_path / "out"
    # a crash mid-write of 'a' left a temp file; 'b' was truncated on disk
    (out / ".a.h5.tmp-otherhost-1").write_bytes(b"partial")
    (out / "a.h5").unlink()
    data = (out / "b.h5").read_bytes()
    (out / "b.h5").write_bytes(data[: len(data) // 3])
    calls: list = []
    summary = run(tmp_path, rows, make_work(calls))
    assert sorted(calls) == ["a", "b"] and summary.count("done") == 2
    assert not list(out.glob(".*tmp*"))
    with h5py.File(out / "b.h5") as f:
        assert f["coords"].shape == (3, 2)


def test_other_parameters_are_refused_without_overwrite(tmp_path):
    rows = [Row("a")]
    run(tmp_path, rows, make_work([]), fp="fp1")
    calls: list = []
    summary = run(tmp_path, rows, make_work(calls), fp="fp2")
    assert calls == [] and summary.count("refused") == 1 and summary.exit_code == 1
    assert "--overwrite" in summary.table()
    summary = run(tmp_path, rows, make_work(calls), fp="fp2", overwrite=True)
    assert calls == ["a"] and summary.count("done") == 1

    check_stage_params(tmp_path / "stage", {"sthresh": 8}, "x1", overwrite=False)
    with pytest.raises(ConfigError, match="sthresh"):
        check_stage_params(tmp_path / "stage", {"sthresh": 15}, "x2", overwrite=False)


def test_interrupt_leaves_no_file_that_looks_finished(tmp_path):
    def work(row, tmp):
        write_h5(tmp)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, [Row("a")], work)
    assert not list((tmp_path / "out").iterdir())
    assert not list((tmp_path / ".locks").iterdir())


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import json, socket
    proc = mp.get_context("fork").Process(target=os._exit, args=(0,))
    proc.start(); proc.join()
    (tmp_path / ".locks").mkdir()
    (tmp_path / ".locks" / "a.lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": proc.pid, "time": time.time()}))
    calls: list = []
    summary = run(tmp_path, [Row("a")], make_work(calls))
    assert calls == ["a"] and summary.count("done") == 1


def _worker(root: str, log: str) -> None:
    rows = [Row(f"s{i:02d}") for i in range(12)]

    def work(row, tmp):
        with open(log, "a") as f:
            f.write(f"{row.slide_id}\n")
        time.sleep(0.05)
        write_h5(tmp)
        return SlideOutcome()

    run_slides("test", rows, Path(root), lambda r: Path(root) / "out" / f"{r.slide_id}.h5",
               "fp", work, progress=False)


def test_two_processes_on_one_workspace_do_each_slide_once(tmp_path):
    log = tmp_path / "calls.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    done = log.read_text().split()
    assert sorted(done) == [f"s{i:02d}" for i in range(12)]  # each exactly once
    assert len(list((tmp_path / "out").glob("*.h5"))) == 12
    rows = StatusFile(tmp_path / "status.csv").read()
    assert len(rows) == 12 and all(r["state"] == "done" for r in rows.values())


def test_slides_held_by_a_live_process_are_named_in_the_summary(tmp_path):
    import json, socket
    (tmp_path / ".locks").mkdir()
    (tmp_path / ".locks" / "b.lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}))
    summary = run(tmp_path, [Row("a"), Row("b")], make_work([]))
    assert summary.count("locked") == 1 and summary.exit_code == 0
    assert "1 slide(s) were being processed by another process; rerun this command" in summary.table()


def test_a_killed_status_writers_temporary_file_is_cleaned_up(tmp_path):
    (tmp_path / ".status.csv.tmp-otherhost-4242").write_text("slide_id,state\nhalf")
    run(tmp_path, [Row("a")], make_work([]))
    assert sorted(p.name for p in tmp_path.iterdir() if "status" in p.name) == [".status.lock", "status.csv"]
