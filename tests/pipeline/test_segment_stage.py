"""`wsi-pipeline segment` on real slides and generated ones, through the CLI a user runs."""

from pathlib import Path

import numpy as np
import pytest

from extract.svs_writer import write_svs
from pipeline.cli import main
from tests.helpers import coords_of
from tests.helpers import read_status as status


def manifest(tmp_path: Path, rows: list[tuple], name="manifest.csv", header="slide_id,path,mpp") -> Path:
    path = tmp_path / name
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_clam_mode_reproduces_clams_patch_counts_and_bad_slides_fail_alone(tmp_path, slides_dir):
    m = manifest(tmp_path, [
        ("cmu", slides_dir / "cmu_small_region.svs", ""),
        ("tcga", slides_dir / "tcga_frozen_jp2k_nompp.svs", ""),
        ("dicom", slides_dir / "unopenable_tcga_dicom.dcm", ""),
        ("gone", tmp_path / "missing.svs", ""),
        ("tiny", slides_dir / "openslide_small.svs", ""),
    ])
    ws = tmp_path / "ws"
    code = main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "--patch-size", "256", "-q"])
    assert code == 1  # some slides failed, the batch still finished
    seg = ws / "segment" / "level0_256px_bwh_biopsy"
    st = status(seg)
    assert st["cmu"]["state"] == "done" and st["cmu"]["patches"] == "50"  # CLAM: 1 contour, 50 patches
    assert st["tcga"]["state"] == "done" and st["tcga"]["patches"] == "169"  # level-based: no mpp needed
    assert st["dicom"]["state"] == "failed" and "OpenSlide cannot open" in st["dicom"]["message"]
    assert st["gone"]["state"] == "failed" and "not found" in st["gone"]["message"]
    assert st["tiny"]["state"] == "empty"

    coords, attrs, root = coords_of(seg, "cmu")
    assert coords.dtype == np.int64 and coords.shape == (50, 2)
    # CLAM's attributes, so CLAM's own extraction reads our files
    assert attrs["patch_size"] == 256 and attrs["patch_level"] == 0 and attrs["name"] == "cmu"
    assert list(attrs["downsample"]) == [1.0, 1.0] and list(attrs["level_dim"]) == [2220, 2967]
    assert root["fingerprint"]
    # empty slides still get a file, so they are not redone forever
    tiny, _, _ = coords_of(seg, "tiny")
    assert tiny.shape == (0, 2)
    previews = sorted(p.name for p in (seg / "previews").iterdir())
    assert previews == ["cmu.png", "tcga.png", "tiny.png"]
    import cv2
    img = cv2.imread(str(seg / "previews" / "cmu.png"))
    assert img is not None and img.shape[0] > 300


def test_default_preset_keeps_no_tissue_and_says_why(tmp_path, slides_dir):
    m = manifest(tmp_path, [("cmu", slides_dir / "cmu_small_region.svs", "")])
    ws = tmp_path / "ws"
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--patch-level", "0", "-q"]) == 0
    st = status(ws / "segment" / "level0_256px")
    assert st["cmu"]["state"] == "empty"
    assert "area filter" in st["cmu"]["message"] and "a_t = 100" in st["cmu"]["message"]


def test_slide_without_resolution_needs_an_mpp_in_magnification_mode(tmp_path, slides_dir):
    slide = slides_dir / "tcga_frozen_jp2k_nompp.svs"
    ws = tmp_path / "ws"
    m = manifest(tmp_path, [("tcga", slide, "")])
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy", "-q"]) == 1
    seg = ws / "segment" / "mpp0.50_256px_bwh_biopsy"
    st = status(seg)
    assert st["tcga"]["state"] == "failed" and "'mpp' column" in st["tcga"]["message"]

    m = manifest(tmp_path, [("tcga", slide, 0.2527)])
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy", "-q"]) == 0
    coords, attrs, _ = coords_of(seg, "tcga")
    assert attrs["patch_size_level0"] == round(256 * 0.5 / 0.2527) == 507
    assert attrs["slide_mpp"] == pytest.approx(0.2527) and len(coords) > 20


def test_target_mpp_gives_the_right_level0_patch_on_generated_slides(tmp_path):
    rng = np.random.default_rng(0)
    image = np.full((2048, 3072, 3), 240, np.uint8)
    image[300:1700, 400:2600] = (200, 80, 150) + rng.integers(-20, 20, (1400, 2200, 3))
    for mpp in (0.25, 0.5):
        write_svs(tmp_path / f"s{mpp}.svs", image, mpp=mpp)
    m = manifest(tmp_path, [("s025", tmp_path / "s0.25.svs", ""), ("s050", tmp_path / "s0.5.svs", "")])
    ws = tmp_path / "ws"
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--target-mpp", "0.5", "--patch-size", "256", "-q"]) == 0
    seg = ws / "segment" / "mpp0.50_256px_bwh_biopsy"
    c25, a25, _ = coords_of(seg, "s025")
    c50, a50, _ = coords_of(seg, "s050")
    assert a25["patch_size_level0"] == 512 and a50["patch_size_level0"] == 256
    # the same tissue area in micrometres: 4x fewer 512-px patches than 256-px ones, give or take borders
    assert 0.15 < len(c25) / len(c50) < 0.4
    # every patch lies on the painted tissue rectangle (within one patch of its border)
    assert (c50[:, 0] >= 400 - 256).all() and (c50[:, 1] >= 300 - 256).all()
    assert (c50[:, 0] < 2600).all() and (c50[:, 1] < 1700).all()


def test_rerun_skips_done_slides_and_refuses_other_parameters(tmp_path, slides_dir):
    m = manifest(tmp_path, [("cmu", slides_dir / "cmu_small_region.svs", "")])
    ws = tmp_path / "ws"
    args = ["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy", "-q"]
    assert main(args) == 0
    seg = ws / "segment" / "mpp0.50_256px_bwh_biopsy"
    first = (seg / "coords" / "cmu.h5").stat().st_mtime_ns
    assert main(args) == 0
    assert (seg / "coords" / "cmu.h5").stat().st_mtime_ns == first  # skipped, not redone
    # same tag, other threshold: refused with a clear message, nothing touched
    assert main(args + ["--sthresh", "30"]) == 2
    assert (seg / "coords" / "cmu.h5").stat().st_mtime_ns == first
    assert main(args + ["--sthresh", "30", "--overwrite"]) == 0
    assert (seg / "coords" / "cmu.h5").stat().st_mtime_ns != first


def test_a_killed_runs_half_written_preview_is_removed_on_rerun(tmp_path, slides_dir):
    m = manifest(tmp_path, [("cmu", slides_dir / "cmu_small_region.svs", "")])
    ws = tmp_path / "ws"
    previews = ws / "segment" / "level0_256px_bwh_biopsy" / "previews"
    previews.mkdir(parents=True)
    # what `kill -9` leaves while the preview of 'cmu' is being written (pid of a dead process)
    (previews / ".cmu.tmp999999.png").write_bytes(b"\x89PNG half")
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "-q"]) == 0
    assert sorted(p.name for p in previews.iterdir()) == ["cmu.png"]


def test_slide_smaller_than_a_patch_says_so(tmp_path, slides_dir, capsys):
    m = manifest(tmp_path, [("tiny", slides_dir / "openslide_small.svs", "")])
    ws = tmp_path / "ws"
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--patch-level", "0",
                 "--no-previews", "-q"]) == 0
    st = status(ws / "segment" / "level0_256px")
    assert st["tiny"]["state"] == "empty"
    assert st["tiny"]["message"].startswith("the slide (16x16 px) is smaller than one patch (256 level-0 px)")
    out = capsys.readouterr().out
    assert "coordinates:" in out and "previews:" not in out  # no previews were asked for


def test_every_run_leaves_a_log_file_with_one_line_per_slide(tmp_path, slides_dir):
    m = manifest(tmp_path, [("cmu", slides_dir / "cmu_small_region.svs", ""),
                            ("dicom", slides_dir / "unopenable_tcga_dicom.dcm", "")])
    ws = tmp_path / "ws"
    # -q quiets the terminal; the log file still says how far an overnight batch got
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "-q"]) == 1
    (log,) = (ws / "logs").glob("segment-*.log")
    text = log.read_text()
    assert "segment [1/2] cmu: done" in text and "50 patches" in text
    assert "segment [2/2] dicom: failed" in text and "OpenSlide cannot open" in text
