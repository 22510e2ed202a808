"""Extraction from slides behind simulated slow storage: the slide cache vs reading in place.

    .venv/bin/python benchmarks/cache_bench.py [--slides 4] [--mbps 0.2] [--size 6000x4000]

Slow storage is simulated by a link of fixed bandwidth (``--mbps`` MB/s). The default makes a
slide's transfer take about as long as its extraction here (1.6 MB slides, ~8 s of CPU
extraction each), the ratio of a 1 GB slide on a 100 MB/s share extracted on a GPU at
2,000 patches/s:

* **in place**: when its turn comes, each slide's bytes cross the link (read through the
  throttle), then it is extracted; transfer and compute add up. This models extraction reading
  a slide over the network: it reads nearly every level-0 tile, so nearly the whole file.
* **cache** (``--cache-dir``): the same throttled link copies the next slide to local disk while
  the current one is extracted (the first slide is copied when its turn comes).
* **local**: the slides on local disk, no link: the compute alone (the floor).

The slides live in the system temporary folder and the cache in ``/dev/shm`` (another
filesystem, as the cache requires). ResNet-18 with random weights on the CPU, batch 32, one
reader worker. Prints seconds per mode, the speed-up and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def throttled_read(src: Path, out, mbps: float) -> None:
    """Pass ``src``'s bytes through a link of ``mbps`` MB/s into ``out`` (a file or None)."""
    t0, sent = time.perf_counter(), 0
    with open(src, "rb") as f:
        while chunk := f.read(1 << 20):
            if out is not None:
                out.write(chunk)
            sent += len(chunk)
            ahead = sent / (mbps * 1e6) - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)


class InPlace:
    """Stands in for the cache: each slide crosses the link when its turn comes, then is read."""

    def __init__(self, mbps: float):
        self.mbps = mbps

    def wrap(self, work, rows, output_path, lock_dir):
        def in_place(row, tmp):
            throttled_read(row.path, None, self.mbps)
            return work(row, tmp)
        return in_place

    def summary(self) -> str:
        return "in place"

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--mbps", type=float, default=0.2, help="simulated storage bandwidth, MB/s")
    parser.add_argument("--size", default="6000x4000", help="slide size in pixels (W x H)")
    args = parser.parse_args()

    from extract.synthetic import make_cohort
    from pipeline.config import ExtractConfig, SegmentConfig
    from pipeline.extract_stage import run_extract
    from pipeline.segment_stage import run_segment
    from pipeline.slide_cache import SlideCache

    width, height = (int(v) for v in args.size.lower().split("x"))
    base = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    cache_dir = Path(tempfile.mkdtemp(prefix="cache-bench-", dir=shm))
    try:
        if os.stat(cache_dir).st_dev == os.stat(base).st_dev:
            sys.exit("the cache folder must be on another filesystem than the slides (no /dev/shm here)")
        manifest = make_cohort(base / "remote", n_slides=args.slides, seed=3, size_px=(width, height))
        sizes = [p.stat().st_size for p in (base / "remote" / "slides").glob("*.svs")]
        ws = base / "ws"
        seg = SegmentConfig(preset="bwh_biopsy", previews=False)
        run_segment(manifest, ws, seg, progress=False)
        config = ExtractConfig(backbone="resnet18", weights="random", batch_size=32, num_workers=1, device="cpu")
        results = {}
        for mode in ("warm-up", "local", "in place", "cache", "in place", "cache"):
            shutil.rmtree(ws / "features", ignore_errors=True)
            shutil.rmtree(cache_dir, ignore_errors=True)
            cache = {"warm-up": None, "local": None, "in place": InPlace(args.mbps),
                     "cache": SlideCache(cache_dir, max_gb=1.0,
                                         copy=lambda s, d: _copy(s, d, args.mbps))}[mode]
            t0, c0 = time.perf_counter(), time.process_time()
            summary, _ = run_extract(manifest, ws, config, progress=False, cache=cache)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert summary.count("done") == args.slides, summary.table()
            if cache is not None:
                cache.close()
            results.setdefault(mode, []).append((wall, cpu))
            print(f"{mode:<9} {wall:6.1f} s wall  {cpu:6.1f} s CPU  {cache.summary() if cache else ''}", flush=True)
        best = {m: min(w for w, _ in v) for m, v in results.items() if m != "warm-up"}
        link = sum(sizes) / (args.mbps * 1e6)
        print(f"{args.slides} slides of {width}x{height} px, {sum(sizes) / 1e6:.1f} MB in all "
              f"({link:.1f} s over a {args.mbps:g} MB/s link)")
        print(f"best of runs: local {best['local']:.1f} s, in place {best['in place']:.1f} s, cache {best['cache']:.1f} s; "
              f"cache / in place = {best['cache'] / best['in place']:.2f}")
        load = os.getloadavg()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)


def _copy(src: Path, dst: Path, mbps: float) -> None:
    with open(dst, "wb") as out:
        throttled_read(src, out, mbps)


if __name__ == "__main__":
    main()
