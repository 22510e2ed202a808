"""The slide cache for network storage: verified local copies, prefetch, LRU budget, local slides
read in place, and identical outputs with and without it."""

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from extract.synthetic import make_cohort
from pipeline.cli import main
from pipeline.slide_cache import SlideCache


@pytest.fixture
def other_fs(tmp_path):
    """A folder on another filesystem than tmp_path (the cache copies only such slides)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary folder")
    folder = shm / f"wsi-cache-test-{os.getpid()}-{tmp_path.name}"
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n_slides=4, seed=2, size_px=(2048, 1536))


def slides(manifest: Path) -> list[Path]:
    return sorted((manifest.parent / "slides").glob("*.svs"))


def test_segment_and_extract_with_the_cache_read_verified_copies_and_write_the_same_outputs(tmp_path, other_fs, cohort, capsys):
    # 512-px patches: 19 over the 4 slides (256 px: ~70), every slide still has some to extract
    common = ["segment", "--manifest", str(cohort), "--preset", "bwh_biopsy", "--patch-size", "512", "--no-previews", "-q"]
    assert main([*common, "--workspace", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main([*common, "--workspace", str(tmp_path / "cached"), "--cache-dir", str(other_fs),
                 "--cache-gb", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 slide(s) prefetched or already there, 1 copied on demand, 4 copies made" in out
    copies = {p.name.split("-", 1)[1]: p for p in (other_fs / "slot-0").iterdir()}
    for src in slides(cohort):
        copy = copies[src.name]
        assert copy.stat().st_size == src.stat().st_size and copy.stat().st_mtime_ns == src.stat().st_mtime_ns
        assert copy.read_bytes() == src.read_bytes()
    for plain in (tmp_path / "plain" / "segment").glob("*/coords/*.h5"):
        cached = tmp_path / "cached" / "segment" / plain.parent.parent.name / "coords" / plain.name
        with h5py.File(plain) as a, h5py.File(cached) as b:
            np.testing.assert_array_equal(a["coords"][:], b["coords"][:])

    # extract reads the copies made by segment (fresh: nothing copied again), same features
    extract = ["extract", "--manifest", str(cohort), "--backbone", "resnet18", "--weights", "random",
               "--batch-size", "16", "--num-workers", "0", "--device", "cpu", "-q"]
    assert main([*extract, "--workspace", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main([*extract, "--workspace", str(tmp_path / "cached"), "--cache-dir", str(other_fs)]) == 0
    assert "4 slide(s) prefetched or already there, 0 copied on demand, 0 copies made" in capsys.readouterr().out
    bags = sorted((tmp_path / "plain" / "features").glob("*/*/*.h5"))
    assert len(bags) == 4
    for plain in bags:
        cached = tmp_path / "cached" / plain.relative_to(tmp_path / "plain")
        with h5py.File(plain) as a, h5py.File(cached) as b:
            np.testing.assert_array_equal(a["features"][:], b["features"][:])


def test_lru_eviction_keeps_the_copies_within_budget(other_fs, cohort):
    paths = slides(cohort)
    size = max(p.stat().st_size for p in paths)
    cache = SlideCache(other_fs, max_gb=2.5 * size / 1024 ** 3)
    try:
        for src in paths:
            local = cache.acquire(src)
            assert local != src and local.read_bytes() == src.read_bytes()
            cache.release(local)
        kept = sorted(p.name.split("-", 1)[1] for p in cache.dir.iterdir())
        assert kept == [p.name for p in paths[-2:]]  # the two used last
        assert sum(p.stat().st_size for p in cache.dir.iterdir()) <= 2.5 * size
        # using the oldest copy again makes it the newest: the next eviction takes another
        cache.acquire(paths[2])
        cache.release(cache.dir / cache.cached_name(paths[2]))
        cache.release(cache.acquire(paths[0]))
        assert sorted(p.name.split("-", 1)[1] for p in cache.dir.iterdir()) == sorted([paths[0].name, paths[2].name])
    finally:
        cache.close()


def test_processes_sharing_a_cache_dir_each_get_their_own_folder_and_the_next_run_finds_its_copies(other_fs, cohort):
    src = slides(cohort)[0]
    first, second = SlideCache(other_fs, max_gb=1), SlideCache(other_fs, max_gb=1)  # e.g. --devices 0,1
    try:
        assert first.dir != second.dir and first.dir.parent == second.dir.parent == other_fs
        first.release(first.acquire(src))
        second.release(second.acquire(src))
        assert first.copied == second.copied == 1  # neither reads (or evicts) the other's copy
    finally:
        first.close()
        second.close()
    again = SlideCache(other_fs, max_gb=1)  # a later run takes the first free folder back
    try:
        assert again.dir == first.dir
        again.release(again.acquire(src))
        assert (again.hits, again.copied) == (1, 0)
    finally:
        again.close()


def test_a_slide_already_on_the_cache_filesystem_is_read_in_place(tmp_path, cohort):
    src = slides(cohort)[0]
    local_cache = Path(cohort).parent / "cache"  # same filesystem as the slides
    cache = SlideCache(local_cache, max_gb=1)
    try:
        assert cache.acquire(src) == src and not list(cache.dir.iterdir())
    finally:
        cache.close()


def test_a_changed_source_is_copied_again(tmp_path, other_fs, cohort):
    src = tmp_path / "slide.svs"
    shutil.copy(slides(cohort)[0], src)
    cache = SlideCache(other_fs, max_gb=1)
    try:
        cache.release(cache.acquire(src))
        assert cache.copied == 1
        stat = src.stat()
        os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
        local = cache.acquire(src)
        assert cache.copied == 2 and local.stat().st_mtime_ns == src.stat().st_mtime_ns
    finally:
        cache.close()


def test_a_fifo_on_network_storage_is_never_copied(other_fs, tmp_path):
    """A named pipe posing as a slide must not block the prefetch thread (the stage rejects it)."""
    other_fs.mkdir(parents=True)
    fifo = other_fs / "stuck.svs"
    os.mkfifo(fifo)
    cache = SlideCache(tmp_path / "cache", max_gb=1)
    try:
        assert not cache.wants(fifo)
        cache.prefetch([fifo])
        assert cache.acquire(fifo) == fifo and not list(cache.dir.iterdir())
    finally:
        cache.close()
