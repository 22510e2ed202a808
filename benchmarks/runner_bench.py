"""Bookkeeping cost per slide of the per-slide runner, at 1,000 and 30,000 trivial slides.

    .venv/bin/python benchmarks/runner_bench.py [--sizes 1000 30000] [--repeats 3] [--no-fsync]

Each "slide" writes a 3-row HDF5 file, so what is timed is everything the runner does around
the work: fingerprint check, lock, temporary file, fingerprint stamp, the group commit (fsync of
the outputs, rename, folder fsync, the record appended to the process's log and fsynced: see
``pipeline.commit_group``), the log line, and the ``status.csv`` rebuilt at the end. Reports
wall and CPU time per slide (all in, and without the time spent inside the work function) for
every run with the load average before it, the median run per size, the ratio of the largest
batch to the smallest (flat = 1.0), and the time to skip a batch of finished slides (a resume).
The workspace lives in ``$WSI_BENCH_CACHE`` or the system temporary folder and is deleted
afterwards.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Row:
    slide_id: str


def run_batch(root: Path, n: int, durable: bool) -> dict:
    import h5py
    import numpy as np

    from pipeline.runner import SlideOutcome, run_slides

    rows = [Row(f"slide_{i:06d}") for i in range(n)]
    out = root / "out"
    coords = np.arange(6, dtype=np.int64).reshape(3, 2)
    in_work = [0.0]

    def work(row, tmp):
        t0 = time.perf_counter()
        with h5py.File(tmp, "w") as f:
            f["coords"] = coords
        in_work[0] += time.perf_counter() - t0
        return SlideOutcome("done", patches=3)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    summary = run_slides("bench", rows, root, lambda r: out / f"{r.slide_id}.h5", "fp", work, progress=False,
                         durable=durable)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    assert summary.count("done") == n, summary.table()
    return {"n": n, "wall": wall, "cpu": cpu, "work": in_work[0]}


def resume(root: Path) -> tuple[int, float]:
    """Skip every slide of the batch already in ``root`` (all done)."""
    from pipeline.runner import run_slides

    out = root / "out"
    rows = [Row(p.stem) for p in sorted(out.glob("*.h5"))]
    t0 = time.perf_counter()
    summary = run_slides("bench", rows, root, lambda r: out / f"{r.slide_id}.h5", "fp",
                         lambda r, t: None, progress=False)
    assert summary.count("skipped") == len(rows)
    return len(rows), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 30000])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each batch size (the median is reported)")
    parser.add_argument("--no-fsync", dest="durable", action="store_false",
                        help="commit without any fsync (run_slides(durable=False)), for comparison")
    args = parser.parse_args()
    print(f"outputs committed {'with' if args.durable else 'without'} fsync", flush=True)

    base = Path(os.environ.get("WSI_BENCH_CACHE", tempfile.gettempdir())) / f"runner-bench-{os.getpid()}"
    results = []
    try:
        for n in args.sizes:
            runs = []
            for k in range(args.repeats):
                root = base / f"n{n}-{k}"
                load = os.getloadavg()[0]
                r = run_batch(root, n, args.durable)
                runs.append(r)
                print(f"  {n} slides, run {k + 1}: {1e3 * r['wall'] / n:.2f} ms wall, {1e3 * r['cpu'] / n:.2f} ms CPU "
                      f"per slide (load average {load:.1f} before)", flush=True)
                if n == args.sizes[0] and k == 0:
                    skipped, seconds = resume(root)
                    print(f"  resume: {skipped} finished slides skipped in {seconds:.2f} s", flush=True)
                shutil.rmtree(root, ignore_errors=True)
            # The median run by wall time: a shared machine's load swings from run to run.
            r = sorted(runs, key=lambda x: x["wall"])[len(runs) // 2]
            results.append(r)
            print(f"{n:>7} slides: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU; per slide "
                  f"{1e3 * r['wall'] / n:.2f} ms wall ({1e3 * (r['wall'] - r['work']) / n:.2f} ms outside the work), "
                  f"{1e3 * r['cpu'] / n:.2f} ms CPU" + (f" (median of {len(runs)})" if len(runs) > 1 else ""),
                  flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    first, last = results[0], results[-1]
    per = lambda r, key: r[key] / r["n"]
    print(f"per slide at {last['n']:,} / at {first['n']:,}: wall {per(last, 'wall') / per(first, 'wall'):.2f}x, "
          f"CPU {per(last, 'cpu') / per(first, 'cpu'):.2f}x, outside the work "
          f"{(last['wall'] - last['work']) / last['n'] / ((first['wall'] - first['work']) / first['n']):.2f}x "
          "(target <= 1.3x and <= 5 ms per slide)")
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, Python {platform.python_version()}")


if __name__ == "__main__":
    main()
