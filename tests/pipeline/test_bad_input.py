"""Red-team inputs, each failing alone with one clear line and nothing lost (issue 10)."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import h5py
import pytest

from extract.errors import PipelineError
from extract.synthetic import make_cohort
from pipeline.cli import main
from pipeline.logging_setup import attach_run_log
from pipeline.manifest import SlideRow
from pipeline.os_errors import workspace_problem
from pipeline.runner import SlideOutcome, run_slides
from tests.helpers import read_status as status


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two generated slides (6000 x 4000 px at 0.5 mpp) and their manifest."""
    return make_cohort(tmp_path_factory.mktemp("cohort"), n_slides=2, seed=3)


def _h5_work(row, tmp: Path) -> SlideOutcome:
    with h5py.File(tmp, "w") as f:
        f["x"] = [1]
    return SlideOutcome("done", "ok")


def test_a_fifo_as_slide_fails_alone_without_blocking(cohort, tmp_path):
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    manifest = tmp_path / "m.csv"
    good = next((cohort.parent / "slides").glob("*.svs"))
    manifest.write_text(f"slide_id,path\nfifo,{fifo}\ngood,{good}\n")
    ws = tmp_path / "ws"
    signal.alarm(120)  # a regression would block on open(): fail instead of hanging the suite
    try:
        code = main(["segment", "--manifest", str(manifest), "--workspace", str(ws), "--preset", "bwh_biopsy",
                     "--target-mpp", "2.0", "--patch-size", "224", "--no-previews", "-q"])
    finally:
        signal.alarm(0)
    assert code == 1
    st = status(next((ws / "segment").iterdir()))
    assert st["fifo"]["state"] == "failed" and "a FIFO, not a slide file" in st["fifo"]["message"]
    assert st["good"]["state"] == "done"


def test_an_os_error_of_one_slide_fails_that_slide_only(tmp_path):
    rows = [SlideRow("s" * 300, 2), SlideRow("ok", 3)]  # a name no filesystem takes
    summary = run_slides("segment", rows, tmp_path, lambda r: tmp_path / f"{r.slide_id}.h5", "fp", _h5_work,
                         progress=False)
    states = {s.slide_id: s for s in summary.statuses}
    assert states["s" * 300].state == "failed" and "File name too long" in states["s" * 300].message
    assert states["ok"].state == "done" and (tmp_path / "ok.h5").is_file()


def test_a_full_disk_stops_the_batch_named_as_such_and_keeps_finished_slides(tmp_path):
    def work(row, tmp):
        if row.slide_id == "b":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        return _h5_work(row, tmp)

    rows = [SlideRow("a", 2), SlideRow("b", 3), SlideRow("c", 4)]
    with pytest.raises(PipelineError, match="segment stopped at b: disk full"):
        run_slides("segment", rows, tmp_path, lambda r: tmp_path / f"{r.slide_id}.h5", "fp", work, progress=False)
    assert (tmp_path / "a.h5").is_file() and not (tmp_path / "c.h5").exists()
    assert status(tmp_path)["a"]["state"] == "done"
    # PyTorch's DataLoader re-raises a worker's OSError as a RuntimeError quoting its text
    wrapped = RuntimeError("Caught OSError in DataLoader worker process 0.\nOSError: [Errno 28] No space left on device")
    assert workspace_problem(wrapped) == "disk full"


def test_a_workspace_whose_log_cannot_be_written_still_serves(tmp_path, caplog):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "logs").write_text("a file where the log folder should be")
    assert attach_run_log(ws, "evaluate") is None
    assert "no log file: cannot write" in caplog.text


def _without_root_override(probe: Path) -> tuple[list[str] | None, str]:
    """A command prefix under which file permissions hold, or (None, why there is none).

    Root writes through file permissions, so as root the CLI runs under ``setpriv``: first as
    root without the capabilities that override them (dac_override, dac_read_search, fowner:
    a 0555 folder owned by root is then read-only to it, and the interpreter stays readable
    wherever it lives), else as uid/gid 65534. Each is tried on ``probe`` (a 0555 folder that it
    must be able to read but not write).
    """
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0:
        return [], ""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None, "running as root, and setpriv (util-linux) is not installed to give up root's file access"
    why = []
    for prefix in ([setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"],
                   [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]):
        done = subprocess.run([*prefix, sys.executable, "-c", f"import os, pipeline.cli; os.listdir({str(probe)!r}); os.mkdir({str(probe / 'x')!r})"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd="/")
        if done.returncode != 0 and "PermissionError" in done.stderr:
            return prefix, ""
        why.append(f"`{' '.join(prefix[1:])}`: " + (done.stderr.strip().splitlines() or ["could write"])[-1])
    return None, "running as root and no way to give up root's file access: " + "; ".join(why)


def test_a_read_only_workspace_is_reported_in_one_line(tmp_path):
    import subprocess
    import sys

    ws = tmp_path / "ws"
    (ws / "experiments").mkdir(parents=True)
    ws.chmod(0o555)
    try:
        prefix, why = _without_root_override(ws)
        if prefix is None:
            pytest.skip(why)
        done = subprocess.run([*prefix, sys.executable, "-m", "pipeline.cli", "evaluate", "--workspace", str(ws),
                               "--experiment", "nope"], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        ws.chmod(0o755)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot write {ws / 'logs'} (Permission denied)" in done.stderr
    assert not (ws / "logs").exists()


def test_mpp_outside_the_sane_range_is_refused_up_front(cohort, tmp_path, capsys):
    ws = tmp_path / "ws"
    code = main(["segment", "--manifest", str(cohort), "--workspace", str(ws), "--slide-mpp", "1000", "-q"])
    assert code == 2 and "--slide-mpp 1000 is outside 0.05-20" in capsys.readouterr().err
    assert not ws.exists()


def _corrupt_level0(path: Path) -> None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        offsets = [int(o) for o in tif.pages[0].dataoffsets]
    with open(path, "r+b") as fh:  # overwrite every level-0 tile's JPEG header: undecodable
        for offset in offsets:
            fh.seek(offset)
            fh.write(b"\0" * 64)


def test_corrupt_tiles_make_a_slide_degraded_or_failed_and_are_counted(cohort, tmp_path, capsys):
    import shutil

    slides = tmp_path / "slides"
    shutil.copytree(cohort.parent / "slides", slides)
    ids = sorted(p.stem for p in slides.glob("*.svs"))
    _corrupt_level0(slides / f"{ids[0]}.svs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\n" + "".join(f"{i},{slides / (i + '.svs')}\n" for i in ids))
    ws = tmp_path / "ws"
    # 448-px patches at the slides' own 0.5 mpp: read from level 0, where the tiles are broken
    assert main(["segment", "--manifest", str(manifest), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--target-mpp", "0.5", "--patch-size", "448", "--no-previews", "-q"]) == 0
    base = ["extract", "--manifest", str(manifest), "--workspace", str(ws), "--backbone", "resnet18",
            "--weights", "random", "--batch-size", "32", "--num-workers", "0", "-q"]
    assert main(base) == 0  # degraded is kept: the batch succeeds, the slide is flagged
    out = capsys.readouterr().out
    assert "degraded 1" in out and "unreadable at full resolution" in out
    folder = next((ws / "features").glob("*/*"))
    st = status(folder)
    assert st[ids[0]]["state"] == "degraded" and int(st[ids[0]]["reread_patches"]) > 0
    assert st[ids[1]]["state"] == "done" and st[ids[1]]["reread_patches"] == "0"

    assert main(base + ["--reread-action", "failed", "--overwrite"]) == 1
    st = status(folder)
    assert st[ids[0]]["state"] == "failed" and "the slide file is damaged" in st[ids[0]]["message"]
    assert st[ids[1]]["state"] == "done"
