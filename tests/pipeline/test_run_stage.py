"""`wsi-pipeline run` end to end on a generated cohort: kill mid-extract, rerun, complete outputs."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from extract.synthetic import make_cohort
from pipeline.cli import main
from tests.helpers import write_pipeline_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_run_killed_mid_extract_then_rerun_completes(tmp_path):
    manifest = make_cohort(tmp_path / "cohort", n_slides=6, seed=5, size_px=(2048, 1536))
    cfg = write_pipeline_config(tmp_path / "run.yaml", manifest, "ws", "e2e", heatmaps=2)
    ws = tmp_path / "ws"
    bags_dir = ws / "features" / "resnet18-random" / "mpp0.50_256px_bwh_biopsy"

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--config", str(cfg), "-q"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(bags_dir.glob("slide_*.h5"))) < 2:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    early = {p.name: p.stat().st_mtime_ns for p in bags_dir.glob("slide_*.h5")}
    assert 0 < len(early) < 6, "the run should have been killed during extraction"
    coords_mtimes = {p.name: p.stat().st_mtime_ns for p in (ws / "segment").glob("*/coords/*.h5")}
    assert len(coords_mtimes) == 6

    assert main(["run", "--config", str(cfg), "-q"]) == 0

    # nothing finished before the kill was redone; everything else is complete
    assert {p.name: p.stat().st_mtime_ns for p in (ws / "segment").glob("*/coords/*.h5")} == coords_mtimes
    for name, mtime in early.items():
        assert (bags_dir / name).stat().st_mtime_ns == mtime
    assert len(list(bags_dir.glob("slide_*.h5"))) == 6 and not list(bags_dir.glob(".*tmp*"))

    exp = ws / "experiments" / "e2e"
    for k in range(3):
        assert (exp / f"fold_{k}" / "best.pt").is_file() and (exp / f"fold_{k}" / "history.csv").is_file()
    metrics = json.loads((exp / "evaluation" / "metrics.json").read_text())
    assert metrics["protocol"].startswith("default")
    assert [f["fold"] for f in metrics["folds"]] == [0, 1, 2]
    for key in ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "threshold"):
        assert key in metrics["folds"][0] and key in metrics["mean"] and key in metrics["std"]
    with open(exp / "evaluation" / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert len({r["slide_id"] for r in preds if r["split"] == "test"}) == 6  # every slide tested once

    import cv2
    heatmaps = sorted((exp / "evaluation" / "heatmaps").glob("slide_*[0-9].png"))
    assert len(heatmaps) == 2
    for png in heatmaps:
        img = cv2.imread(str(png))
        assert img is not None and img.shape[0] > 100 and img.std() > 5
