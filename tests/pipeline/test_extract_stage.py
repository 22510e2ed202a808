"""`wsi-pipeline extract` through the CLI: bags per backbone, order, determinism, bad slides, resume."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from extract.bags import read_bag
from extract.synthetic import make_cohort
from pipeline.cli import main
from tests.helpers import read_status as status

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cmu_workspace(tmp_path_factory, slides_dir):
    tmp = tmp_path_factory.mktemp("cmu")
    m = tmp / "m.csv"
    m.write_text(f"slide_id,path\ncmu,{slides_dir / 'cmu_small_region.svs'}\n")
    ws = tmp / "ws"
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "-q"]) == 0
    return m, ws


def test_real_slide_bag_per_backbone(cmu_workspace):
    m, ws = cmu_workspace
    base = ["extract", "--manifest", str(m), "--workspace", str(ws), "--weights", "random",
            "--batch-size", "16", "--num-workers", "0", "-q"]
    assert main(base + ["--backbone", "resnet50_trunc"]) == 0
    first = ws / "features" / "resnet50_trunc-random" / "level0_256px_bwh_biopsy" / "cmu.h5"
    with h5py.File(ws / "segment" / "level0_256px_bwh_biopsy" / "coords" / "cmu.h5") as f:
        coords = f["coords"][:]
    with h5py.File(first) as f:
        assert f["features"].dtype == np.float16 and f["features"].shape == (50, 1024)
        assert np.array_equal(f["coords"][:], coords)  # rows in coordinate order
        assert f.attrs["backbone"] == "resnet50_trunc" and f.attrs["weights"] == "random"
        assert f.attrs["patch_size_level0"] == 256 and f.attrs["dropped_patches"] == 0
    mtime = first.stat().st_mtime_ns

    # a second backbone lands in its own folder and leaves the first alone
    assert main(base + ["--backbone", "resnet18", "--dtype", "float32"]) == 0
    second = ws / "features" / "resnet18-random" / "level0_256px_bwh_biopsy" / "cmu.h5"
    bag = read_bag(second)
    assert bag.features.shape == (50, 512) and first.stat().st_mtime_ns == mtime
    assert np.isfinite(bag.features).all() and bag.features.std() > 0
    st = status(second.parent)
    assert st["cmu"]["state"] == "done" and st["cmu"]["patches"] == "50" and float(st["cmu"]["patches_per_s"]) > 0

    # same input, same features (random weights are seeded by the registry)
    assert main(base + ["--backbone", "resnet18", "--dtype", "float32", "--overwrite", "--export-pt"]) == 0
    again = read_bag(second)
    np.testing.assert_allclose(again.features, bag.features, rtol=1e-4, atol=1e-4)
    import torch
    pt = torch.load(second.parent / "pt_files" / "cmu.pt")
    assert tuple(pt.shape) == (50, 512)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cohort")
    manifest = make_cohort(tmp / "demo", n_slides=4, seed=3, size_px=(2048, 1536))
    ws = tmp / "ws"
    assert main(["segment", "--manifest", str(manifest), "--workspace", str(ws), "--preset", "bwh_biopsy", "-q"]) == 0
    return manifest, ws


def test_an_unreadable_slide_fails_alone(cohort, tmp_path):
    manifest, ws = cohort
    # copy the manifest, then break one slide file after segmentation
    rows = manifest.read_text().splitlines()
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide at all")
    first_id = rows[1].split(",")[0]
    rows[1] = ",".join([first_id, str(broken)] + rows[1].split(",")[2:])
    m2 = manifest.parent / "broken_manifest.csv"
    m2.write_text("\n".join(rows) + "\n")
    code = main(["extract", "--manifest", str(m2), "--workspace", str(ws), "--backbone", "resnet18",
                 "--weights", "random", "--num-workers", "0", "-q"])
    assert code == 1
    st = status(ws / "features" / "resnet18-random" / "mpp0.50_256px_bwh_biopsy")
    assert st[first_id]["state"] == "failed" and "OpenSlide cannot open" in st[first_id]["message"]
    assert sum(r["state"] == "done" for r in st.values()) == 3


def test_a_killed_run_resumes_without_redoing_finished_slides(cohort):
    manifest, ws = cohort
    out = ws / "features" / "resnet50_trunc-random" / "mpp0.50_256px_bwh_biopsy"
    cmd = [sys.executable, "-m", "pipeline.cli", "extract", "--manifest", str(manifest), "--workspace", str(ws),
           "--backbone", "resnet50_trunc", "--weights", "random", "--num-workers", "0", "--batch-size", "8", "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("slide_*.h5")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_first = {p.name: p.stat().st_mtime_ns for p in out.glob("slide_*.h5")}
    assert 1 <= len(done_first) < 4, "the run should have been killed mid-batch"

    assert main(cmd[3:]) == 0
    bags = sorted(out.glob("slide_*.h5"))
    assert len(bags) == 4 and not list(out.glob(".*tmp*"))
    for name, mtime in done_first.items():
        assert (out / name).stat().st_mtime_ns == mtime  # finished before the kill: not redone
    st = status(out)
    assert all(r["state"] == "done" for r in st.values())
    for bag in bags:
        b = read_bag(bag)
        assert b.features.shape[0] == len(b.coords) > 0


def test_slide_that_failed_segmentation_says_why_in_extract(tmp_path, slides_dir, capsys):
    m = tmp_path / "m.csv"
    m.write_text(f"slide_id,path\ndicom,{slides_dir / 'unopenable_tcga_dicom.dcm'}\n")
    ws = tmp_path / "ws"
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--patch-level", "0", "-q"]) == 1
    code = main(["extract", "--manifest", str(m), "--workspace", str(ws), "--backbone", "resnet18",
                 "--weights", "random", "--num-workers", "0", "-q"])
    assert code == 1
    st = status(ws / "features" / "resnet18-random" / "level0_256px")
    message = st["dicom"]["message"]
    assert message.startswith("dicom: segmentation failed (") and "OpenSlide cannot open" in message
    assert "rerun `wsi-pipeline segment`" in message


@pytest.mark.parametrize("flags, expected", [
    (["--backbone", "resnet99"], "The 'backbone' parameter must be a registered encoder (closest: resnet50, "
                                 "resnet18) or timm:<model name> (see `wsi-pipeline extract "
                                 "--list-backbones`). Got 'resnet99' instead."),
    (["--backbone", "uni", "--weights", "imagenet"], "backbone 'uni' needs its weights from a local file: pass --weights PATH to "
                            "pytorch_model.bin (Hugging Face MahmoodLab/UNI) or its folder"),
    (["--backbone", "resnet18", "--backbone-kw", "img_size=96"], "--backbone-kw applies to timm:<name> backbones"),
    (["--seg-tag", "mpp0.25_256px"], "pass one of those with --seg-tag"),
])
def test_extract_mistakes_are_one_line_naming_the_flag(cmu_workspace, capsys, flags, expected):
    m, ws = cmu_workspace
    code = main(["extract", "--manifest", str(m), "--workspace", str(ws), "--weights", "random", "-q", *flags])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert expected in line


def test_devices_that_do_not_exist_are_refused_before_starting_processes(cmu_workspace, capsys):
    import torch

    m, ws = cmu_workspace
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    code = main(["extract", "--manifest", str(m), "--workspace", str(ws), "--weights", "random",
                 "--devices", f"{n},{n + 1}", "-q"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"this machine has {n} CUDA device(s), none with index {n}, {n + 1}" in line
