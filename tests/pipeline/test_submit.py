"""`wsi-pipeline submit` through submitit: the Slurm scripts (fake sbatch on PATH) and the local
executor end to end (real processes, one killed mid-slide, the rerun completes, same outputs)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cli import main
from tests.helpers import write_pipeline_config

ROOT = Path(__file__).resolve().parents[2]

FAKE_SBATCH = """#!/bin/sh
# Records the script it is given and answers like sbatch.
n=$(cat "$SBATCH_RECORD/next" 2>/dev/null || echo 1001)
cp "$1" "$SBATCH_RECORD/job_$n.sh"
echo $((n + 1)) > "$SBATCH_RECORD/next"
echo "Submitted batch job $n"
"""


def write_config(tmp: Path, manifest: Path, workspace: str, slurm: str = "", folds: int = 3) -> Path:
    return write_pipeline_config(tmp / f"{workspace}.yaml", manifest, workspace, "sub", folds=folds, extra=slurm)


def sbatch_flags(script: str) -> dict:
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            flags[key] = value
    return flags


def test_slurm_arrays_resources_and_dependencies_in_the_sbatch_scripts(tmp_path, monkeypatch, capsys):
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    record.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that srun exists
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_RECORD", str(record))
    cfg = write_config(tmp_path, tmp_path / "manifest.csv", "ws", slurm="""
slurm:
  partition: cpu
  account: lab
  time: "1:30:00"
  mem: 8G
  cpus_per_task: 4
  array_size: 5
  setup: ["echo ready"]
  extract: {partition: gpu, gpus_per_task: 1, mem: 32G}
  train: {partition: gpu, gpus_per_task: 1, time: 45}
""")
    assert main(["submit", "run", "--config", str(cfg), "--executor", "slurm", "--account", "other"]) == 0
    out = capsys.readouterr().out
    assert "squeue --jobs 1001,1002,1003,1004" in out and "wsi-pipeline status --workspace" in out

    scripts = {n: (record / f"job_{n}.sh").read_text() for n in (1001, 1002, 1003, 1004)}
    seg, ext, train, ev = (sbatch_flags(scripts[n]) for n in (1001, 1002, 1003, 1004))
    assert seg["job-name"] == "wsi-segment" and seg["array"] == "0-4%5"
    assert (seg["partition"], seg["account"], seg["cpus-per-task"], seg["mem"], seg["time"]) == \
        ("cpu", "other", "4", "8G", "90")
    assert "gpus-per-task" not in seg and "dependency" not in seg
    assert ext["array"] == "0-4%5" and ext["gpus-per-task"] == "1" and ext["mem"] == "32G"
    assert ext["partition"] == "gpu" and ext["dependency"] == "afterok:1001"
    assert train["array"] == "0-2%3" and train["gpus-per-task"] == "1" and train["time"] == "45"
    assert train["dependency"] == "afterok:1002"
    assert "array" not in ev and "gpus-per-task" not in ev and ev["dependency"] == "afterok:1003"
    logs = tmp_path / "ws" / "logs" / "slurm"
    assert seg["output"].startswith(str(logs)) and "echo ready" in scripts[1001]

    # what each task will run: the stage command, with the segmentation and experiment fixed
    from submitit.core.utils import DelayedSubmission

    pickles = {p.parent.name: DelayedSubmission.load(p).function for p in logs.glob("*/*_submitted.pkl")}
    argvs = {task.stage: task.argv for task in pickles.values()}
    assert argvs["extract"][argvs["extract"].index("--seg-tag") + 1] == "mpp0.50_256px_bwh_biopsy"
    assert "--resume" in argvs["train"] and argvs["evaluate"][argvs["evaluate"].index("--experiment") + 1] == "sub"
    assert len([t for t in pickles.values() if t.stage == "train"]) == 3

    # GPUs only where the stage uses them
    assert main(["submit", "segment", "--config", str(cfg), "--executor", "slurm", "--gpus-per-task", "2",
                 "--array-size", "2", "--", "--patch-size", "128"]) == 0
    seg2 = sbatch_flags((record / "job_1005.sh").read_text())
    assert seg2["array"] == "0-1%2" and "gpus-per-task" not in seg2


def _feature_dir(ws: Path) -> Path:
    return ws / "features" / "resnet18-random" / "mpp0.50_256px_bwh_biopsy"


def _tensors(obj, prefix=""):
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}/{k}")


@pytest.mark.slow
def test_local_arrays_with_a_task_killed_mid_slide_match_a_single_process_run(tmp_path):
    import torch

    from extract.synthetic import make_cohort

    # 8 slides in arrays of 2 tasks (4 slides each), 2 folds: every task process imports torch,
    # so the number of tasks, more than the slides, sets this test's time
    manifest = make_cohort(tmp_path / "cohort", n_slides=8, seed=5, size_px=(2048, 1536))
    cfg = write_config(tmp_path, manifest, "ws", folds=2)
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "pipeline.cli", "submit", "run", "--config", str(cfg),
           "--executor", "local", "--array-size", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 600
    while killed is None and proc.poll() is None and time.time() < deadline:
        for lock in _feature_dir(ws).glob(".locks/*.lock"):
            try:
                info = json.loads(lock.read_text())
            except (OSError, ValueError):
                continue
            os.kill(info["pid"], signal.SIGKILL)  # an extract array task, mid-slide
            killed = lock.stem
            break
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=600)
    assert killed is not None, out
    assert proc.returncode == 1 and "extract: 1 of 2 task(s) failed" in out, out
    assert not (ws / "experiments").exists()  # train never started after the failed array

    assert main(["submit", "run", "--config", str(cfg), "--executor", "local", "--array-size", "2"]) == 0
    bags = sorted(p.name for p in _feature_dir(ws).glob("*.h5"))
    assert len(bags) == 8 and f"{killed}.h5" in bags and not list(_feature_dir(ws).glob(".*tmp*"))

    ref_cfg = write_config(tmp_path, manifest, "ref", folds=2)
    assert main(["run", "--config", str(ref_cfg), "-q"]) == 0
    ref = tmp_path / "ref"
    for name in bags:
        with h5py.File(_feature_dir(ws) / name) as a, h5py.File(_feature_dir(ref) / name) as b:
            np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
            np.testing.assert_array_equal(a["features"][:], b["features"][:])
    for seg in (ws / "segment").glob("*/coords/*.h5"):
        with h5py.File(seg) as a, h5py.File(ref / "segment" / seg.parent.parent.name / "coords" / seg.name) as b:
            np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
    for k in range(2):
        mine = dict(_tensors(torch.load(ws / "experiments/sub" / f"fold_{k}" / "best.pt", weights_only=False)))
        theirs = dict(_tensors(torch.load(ref / "experiments/sub" / f"fold_{k}" / "best.pt", weights_only=False)))
        assert mine.keys() == theirs.keys() and len(mine) > 5
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key
    assert (ws / "experiments/sub/evaluation/metrics.json").is_file()
    # the 2 fold tasks each trained their own fold; the summary lists both
    with open(ws / "experiments/sub/summary.csv", newline="") as f:
        assert [(r["fold"], r["status"]) for r in csv.DictReader(f)] == [("0", "done"), ("1", "done")]
    # each array task left its log: segment and extract twice (killed run, rerun), train, evaluate
    assert len(list((ws / "logs" / "slurm").glob("*/*_log.out"))) >= 2 + 2 + 2 + 2 + 2 + 1
