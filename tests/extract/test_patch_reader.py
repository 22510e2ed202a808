"""The tile-aligned patch reader: pixels equal OpenSlide's, edges, order, failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from extract.errors import ConfigError, SlideError
from extract.patch_reader import (
    PatchReader,
    choose_read_level,
    iter_patch_batches,
    plan_geometry,
    plan_groups,
)
from extract.slide import Slide


def _reference(path, coords, level, size, out_px=None, downsample=1.0):
    """Per-patch OpenSlide reads at ``level`` (optionally resized like the reader does)."""
    with Slide(path) as slide:
        patches = []
        for x, y in coords:
            rgb = slide.read_region((int(x), int(y)), level, (size, size))
            if out_px is not None and out_px != size:
                rgb = cv2.resize(rgb, (out_px, out_px), interpolation=cv2.INTER_AREA)
            patches.append(rgb)
    return np.stack(patches)


def _max_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def pyramid_slide(tmp_path_factory, images_dir) -> Path:
    """A 2560 x 2560 Aperio-layout SVS at 0.25 mpp: levels 1x and 4x (640 x 640), 256-px tiles."""
    from extract.svs_writer import write_svs

    rgb = cv2.cvtColor(cv2.imread(str(images_dir / "prostate_he_2500.jpeg")), cv2.COLOR_BGR2RGB)
    image = np.full((2560, 2560, 3), 255, np.uint8)
    image[:2500, :2500] = rgb[:2500, :2500]
    return write_svs(tmp_path_factory.mktemp("pyr") / "pyr.svs", image, mpp=0.25)


# -- geometry ---------------------------------------------------------------------------------
def test_choose_read_level_keeps_at_least_target_resolution():
    assert choose_read_level([1.0, 4.0, 16.0], 512, 256) == 0  # 4x would give 128 px
    assert choose_read_level([1.0, 4.0, 16.0], 1024, 256) == 1  # exactly 256 px at 4x
    assert choose_read_level([1.0, 4.0, 16.0], 4096, 256) == 2
    assert choose_read_level([1.0, 2.0005], 512, 256) == 1  # rounded level size, still 2x
    assert choose_read_level([1.0], 128, 256) == 0  # coarser than asked: level 0, upsampled
    g = plan_geometry([1.0, 4.0], [(4000, 4000), (1000, 1000)], 1024, 224)
    assert (g.level, g.read_px) == (1, 256)


def test_plan_groups_covers_every_patch_once_ordered_by_first_index():
    rng = np.random.default_rng(0)
    xy = rng.integers(0, 20000, size=(500, 2))
    groups = plan_groups(xy, 256, (256, 256), block_px=2048, max_patches=40)
    allidx = np.sort(np.concatenate(groups))
    assert np.array_equal(allidx, np.arange(500))
    assert [g.min() for g in groups] == sorted(g.min() for g in groups)
    assert max(len(g) for g in groups) <= 40


# -- pixels -----------------------------------------------------------------------------------
def test_level0_patches_equal_per_patch_read_region(slides_dir):
    path = slides_dir / "cmu_small_region.svs"  # 2220 x 2967, 240-px Aperio RGB JPEG tiles
    rng = np.random.default_rng(1)
    coords = np.stack([rng.integers(0, 2220 - 256, 40), rng.integers(0, 2967 - 256, 40)], axis=1)
    coords = np.concatenate([coords, [[0, 0], [240, 480], [2220 - 100, 2967 - 50], [-30, 100]]])
    with PatchReader(path, patch_px_level0=256, out_px=256) as reader:
        assert reader.source_kind == "tiff"  # the fast path, not OpenSlide
        indices, patches, report = reader.read(coords)
    assert np.array_equal(indices, np.arange(len(coords)))
    assert report.dropped.size == 0 and report.sources == {"tiff": len(coords)}
    ref = _reference(path, coords, 0, 256)
    assert _max_diff(patches, ref) == 0
    # Past the right/bottom edge and left of x = 0: white, as read_region gives.
    assert (patches[-2][50:, :] == 255).all() and (patches[-2][:, 100:] == 255).all()
    assert (patches[-1][:, :30] == 255).all()


def test_openslide_backend_equals_fast_path_and_resize(slides_dir):
    path = slides_dir / "cmu_small_region.svs"
    coords = np.array([[10, 20], [700, 900], [1500, 2400], [2000, 2800]])
    with PatchReader(path, 512, 256, backend="openslide") as reader:
        assert reader.source_kind == "openslide"
        _, slow, _ = reader.read(coords)
    with PatchReader(path, 512, 256) as reader:
        _, fast, _ = reader.read(coords)
    ref = _reference(path, coords, 0, 512, out_px=256)  # crop 512 then INTER_AREA to 256
    assert _max_diff(slow, ref) == 0
    assert _max_diff(fast, ref) == 0


def test_deeper_level_on_generated_pyramid_equals_read_region(pyramid_slide):
    # 0.25 mpp slide read at 1.0 mpp: 256 px patches = 1024 level-0 px, read at the 4x level.
    with Slide(pyramid_slide) as slide:
        assert slide.level_downsamples == [1.0, 4.0]
    coords = np.array([[x, y] for y in range(0, 2560, 1024 - 64) for x in range(0, 2560, 1024 - 128)])
    coords[:, 0] += 8  # multiples of the downsample: OpenSlide samples whole level pixels
    with PatchReader(pyramid_slide, patch_px_level0=1024, out_px=256) as reader:
        assert reader.geometry.level == 1 and reader.geometry.read_px == 256
        assert reader.source_kind == "tiff"
        indices, patches, report = reader.read(coords)
    assert len(indices) == len(coords) and report.retried.size == 0
    ref = _reference(pyramid_slide, coords, 1, 256)
    assert _max_diff(patches, ref) == 0
    assert (patches[-1][(2560 - coords[-1, 1]) // 4:] == 255).all()  # past the bottom edge


def test_jpeg2000_and_generic_tiff_fast_paths(slides_dir):
    jp2k = slides_dir / "tcga_frozen_jp2k_nompp.svs"  # Aperio JPEG 2000 (33005), no mpp
    coords = np.array([[0, 0], [1000, 1200], [3000, 2000]])
    with PatchReader(jp2k, 256, 256) as reader:
        assert reader.source_kind == "tiff"
        _, patches, _ = reader.read(coords)
    assert _max_diff(patches, _reference(jp2k, coords, 0, 256)) == 0

    boxes = slides_dir / "openslide_boxes.tiff"  # generic tiled TIFF, deflate, 4 levels
    coords = np.array([[0, 0], [64, 128], [200, 180]])
    with PatchReader(boxes, patch_px_level0=64, out_px=32) as reader:
        assert reader.geometry.level == 1 and reader.source_kind == "tiff"
        _, patches, _ = reader.read(coords)
    assert _max_diff(patches, _reference(boxes, coords, 1, 32)) == 0


def test_order_preserved_with_two_workers(slides_dir):
    path = slides_dir / "cmu_small_region.svs"
    rng = np.random.default_rng(2)
    coords = np.stack([rng.integers(0, 2000, 120), rng.integers(0, 2700, 120)], axis=1)
    with PatchReader(path, 256, 128) as reader:
        _, expected, _ = reader.read(coords)
    batches = iter_patch_batches(path, coords, 256, 128, batch_size=7, num_workers=2)
    got = list(batches)
    assert all(len(i) == 7 for i, _ in got[:-1])
    assert np.array_equal(np.concatenate([i for i, _ in got]), np.arange(len(coords)))
    assert np.array_equal(np.concatenate([p for _, p in got]), expected)
    assert batches.report.n_read == len(coords)

    unordered = list(iter_patch_batches(path, coords, 256, 128, batch_size=16, ordered=False))
    idx = np.concatenate([i for i, _ in unordered])
    assert np.array_equal(np.sort(idx), np.arange(len(coords)))
    assert np.array_equal(np.concatenate([p for _, p in unordered]), expected[idx])


def test_reader_workers_serve_slide_after_slide_and_survive_an_abandoned_or_killed_read(slides_dir):
    import multiprocessing
    import os
    import signal

    path = slides_dir / "cmu_small_region.svs"
    rng = np.random.default_rng(3)
    coords = np.stack([rng.integers(0, 2000, 60), rng.integers(0, 2700, 60)], axis=1)
    reader = PatchReader(path, 256, 128, block_px=256)  # small work groups: ~20 of them
    _, expected, _ = reader.read(coords)
    assert len(reader.plan(coords)) >= 12

    def read_all():
        batches = iter_patch_batches(reader, coords, batch_size=8, num_workers=1)
        patches = np.concatenate([p for _, p in batches])
        return patches, batches.report

    read_all()
    patches, report = read_all()  # the next slide: no process started
    assert report.workers_started == 0 and np.array_equal(patches, expected)
    # a consumer that stops after one batch leaves nothing behind for the next read
    abandoned = iter(iter_patch_batches(reader, coords, batch_size=8, num_workers=1, prefetch_groups=8))
    next(abandoned)
    abandoned.close()
    patches, report = read_all()
    assert report.workers_started == 0 and np.array_equal(patches, expected)
    # a worker killed mid-slide: that read fails in one line, the next one starts fresh workers
    batches = iter(iter_patch_batches(reader, coords, batch_size=8, num_workers=1))
    next(batches)
    for proc in multiprocessing.active_children():
        if proc.name.startswith("wsi-reader-"):
            os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="exited unexpectedly.*--num-workers 0"):
        list(batches)
    patches, report = read_all()
    assert report.workers_started == 1 and np.array_equal(patches, expected)
    reader.close()


def test_empty_coords_and_bad_parameters(slides_dir):
    path = slides_dir / "cmu_small_region.svs"
    assert list(iter_patch_batches(path, np.zeros((0, 2), np.int64), 256, 256)) == []
    with pytest.raises(ConfigError, match="'coords' parameter"):
        iter_patch_batches(path, np.zeros((3, 3), np.int64), 256, 256)
    with pytest.raises(ConfigError, match="'batch_size' parameter"):
        iter_patch_batches(path, np.zeros((1, 2), np.int64), 256, 256, batch_size=0)


def test_missing_and_unopenable_slides_raise_slide_error(tmp_path, slides_dir):
    with pytest.raises(SlideError, match="not found"):
        iter_patch_batches(tmp_path / "nope.svs", np.zeros((1, 2), np.int64), 256, 256)
    with pytest.raises(SlideError, match="cannot open"):
        PatchReader(slides_dir / "unopenable_tcga_dicom.dcm", 256, 256)


# -- corrupt tiles ----------------------------------------------------------------------------
def _corrupt_tile(path: Path, page_index: int, tile_index: int) -> None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[page_index]
        offset = int(page.dataoffsets[tile_index])
    with open(path, "r+b") as fh:  # overwrite the JPEG SOI and headers: undecodable
        fh.seek(offset)
        fh.write(b"\0" * 64)


@pytest.mark.parametrize("backend", ["auto", "openslide"])
def test_corrupt_tile_is_retried_from_another_level_then_dropped(tmp_path, pyramid_slide, backend):
    bad = tmp_path / "bad.svs"
    shutil.copy(pyramid_slide, bad)
    # Level-0 page 0 has 10 x 10 tiles of 256 px; break tile (col 2, row 1) = pixels
    # x 512..767, y 256..511.
    _corrupt_tile(bad, 0, 1 * 10 + 2)
    coords = np.array([[0, 0], [512, 256], [600, 300], [1024, 1024], [300, 200], [1200, 1500], [768, 0]])
    touching = [1, 2, 4]
    # [768, 0] shares OpenSlide's 512-px block with the bad tile but not the tile itself: the
    # per-patch re-read at the same level recovers it exactly.
    others = [0, 3, 5, 6]
    with PatchReader(bad, 256, 256, backend=backend) as reader:
        assert reader.source_kind == ("tiff" if backend == "auto" else "openslide")
        indices, patches, report = reader.read(coords)
    assert report.dropped.size == 0
    assert report.retried.tolist() == touching  # served from the 4x level, upsampled
    assert np.array_equal(indices, np.arange(len(coords)))
    assert report.errors and (backend != "auto" or "tile (2, 1)" in report.errors[0])
    assert _max_diff(patches[others], _reference(pyramid_slide, coords[others], 0, 256)) == 0

    # Break the 4x level's tile over the same area too: now those patches are dropped.
    with Slide(bad) as slide:
        assert slide.level_dimensions[1] == (640, 640)
    # Page 1 is Aperio's thumbnail; the 4x level is page 2 with 3 x 3 tiles; (0, 0) covers it.
    _corrupt_tile(bad, 2, 0)
    batches = iter_patch_batches(bad, coords, 256, 256, batch_size=4, num_workers=0, backend=backend)
    got = list(batches)
    kept = np.concatenate([i for i, _ in got])
    assert batches.report.dropped.tolist() == touching
    assert kept.tolist() == others
    assert _max_diff(np.concatenate([p for _, p in got]), _reference(pyramid_slide, coords[others], 0, 256)) == 0


def test_slide_smaller_than_a_patch_is_white_padded(slides_dir):
    path = slides_dir / "openslide_small.svs"  # 16 x 16 px
    coords = np.array([[0, 0], [8, 4]])
    _, patches, _ = PatchReader(path, 64, 64).read(coords)
    assert _max_diff(patches, _reference(path, coords, 0, 64)) == 0
    assert (patches[0][16:] == 255).all() and (patches[0][:, 16:] == 255).all()


def test_pin_memory_batches_are_tensors_and_reader_can_be_reused(slides_dir):
    import torch

    path = slides_dir / "cmu_small_region.svs"
    coords = np.array([[0, 0], [300, 300], [900, 1200]])
    with PatchReader(path, 256, 224) as reader:
        _, expected, _ = reader.read(coords)
        got = list(iter_patch_batches(reader, coords, batch_size=2, pin_memory=True))
    assert all(isinstance(p, torch.Tensor) and p.dtype == torch.uint8 for _, p in got)
    assert np.array_equal(torch.cat([p for _, p in got]).numpy(), expected)
    if torch.cuda.is_available():
        assert got[0][1].is_pinned()


@pytest.mark.gpu
def test_cuda_pinned_batches_feed_preprocess(slides_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from extract.backbones import BackboneConfig, preprocess_on_device

    cfg = BackboneConfig("x", 8, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "random")
    coords = np.array([[0, 0], [300, 300], [900, 1200]])
    for _, patches in iter_patch_batches(slides_dir / "cmu_small_region.svs", coords, 256, 256,
                                         batch_size=3, pin_memory=True, num_workers=1):
        assert patches.is_pinned()
        x = preprocess_on_device(patches.to("cuda", non_blocking=True), cfg, torch.bfloat16)
        cpu = preprocess_on_device(patches, cfg, torch.float32)
        assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x.float().cpu(), cpu, atol=0.05, rtol=0.02)


# -- buffer reuse ------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
def test_reused_buffers_never_change_a_batch_the_consumer_still_holds(slides_dir, pyramid_slide, workers):
    """Group buffers, shared-memory slabs, decoded-tile memory and dropped batches are reused
    (slide after slide); a batch the consumer keeps, or wraps in a tensor, stays as read."""
    import torch

    rng = np.random.default_rng(5)
    for path, side in ((slides_dir / "cmu_small_region.svs", 2000), (pyramid_slide, 2000), (pyramid_slide, 2000)):
        coords = np.stack([rng.integers(0, side, 90), rng.integers(0, side, 90)], axis=1)
        with PatchReader(path, 256, 128, block_px=256) as reader:
            _, expected, _ = reader.read(coords)
            kept, wrapped = [], []
            for k, (idx, patches) in enumerate(iter_patch_batches(reader, coords, batch_size=8, num_workers=workers)):
                assert np.array_equal(patches, expected[idx])
                if k % 3 == 0:
                    kept.append((idx, patches))
                elif k % 3 == 1:
                    wrapped.append((idx, torch.from_numpy(patches)))
        for idx, patches in kept:
            assert np.array_equal(patches, expected[idx])
        for idx, tensor in wrapped:
            assert np.array_equal(tensor.numpy(), expected[idx])


def test_tiles_shared_by_neighbouring_work_groups_are_decoded_once(pyramid_slide):
    """Small work groups (many bands and segments), a grid off the tile grid: each stored tile
    the patches cover is decoded exactly once, with a tile cache far smaller than the slide."""
    xs = np.arange(37, 2560 - 512, 256)  # overlapping patches, 3 x 3 tiles each
    gx, gy = np.meshgrid(xs, xs)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)  # row-major
    covered = {(c, r) for x, y in coords for r in range(y // 256, (y + 511) // 256 + 1)
               for c in range(x // 256, (x + 511) // 256 + 1)}
    with PatchReader(pyramid_slide, 512, 256, block_px=512, tile_cache_mb=8) as reader:
        assert len(reader.plan(coords)) >= 4  # 2 bands x 2 segments
        _, patches, report = reader.read(coords)
    assert report.tiles_decoded == len(covered)
    assert _max_diff(patches, _reference(pyramid_slide, coords, 0, 512, out_px=256)) == 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_reading_process_leaves_no_shared_memory_and_no_reader_workers(tmp_path, pyramid_slide):
    """A consumer killed with SIGKILL mid-slide (a preempted job): its reader workers exit and
    nothing of the shared memory it lent them stays in /dev/shm."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    from extract.reader_pool import _running

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "consumer.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, time
        import numpy as np
        from extract.patch_reader import iter_patch_batches
        if __name__ == "__main__":
            xs = np.arange(0, 2000, 64)
            gx, gy = np.meshgrid(xs, xs)
            coords = np.stack([gx.ravel(), gy.ravel()], 1)
            batches = iter(iter_patch_batches({str(pyramid_slide)!r}, coords, 256, 128, batch_size=8,
                                              num_workers=2, prefetch_groups=8))
            next(batches)
            print(" ".join(str(p.pid) for p in multiprocessing.active_children()
                           if p.name.startswith("wsi-reader-")), flush=True)
            time.sleep(120)
    """))
    shm = Path("/dev/shm")
    before = set(os.listdir(shm)) if shm.is_dir() else set()
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=root, env=env)
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(pid) for pid in workers)
    if shm.is_dir():
        assert set(os.listdir(shm)) - before == set()


def test_patches_read_at_twice_their_size_across_the_level_edge_equal_read_region(pyramid_slide):
    """2x reads (a 40x slide for 20x): odd and even coordinates, patches crossing the right and
    bottom edges (white beyond, as read_region) equal OpenSlide + INTER_AREA."""
    coords = np.array([[2560 - 301, 100], [100, 2560 - 300], [2560 - 257, 2560 - 256], [2301, 2302],
                       [1, 0], [2048, 2047], [255, 257], [2560 - 100, 2560 - 99]])
    _, patches, report = PatchReader(pyramid_slide, 512, 256).read(coords)
    assert report.n_read == len(coords)
    assert _max_diff(patches, _reference(pyramid_slide, coords, 0, 512, out_px=256)) == 0
