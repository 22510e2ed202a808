"""Time segmentation + tiling on a large slide (80,000 x 60,000 px at 0.25 um/px).

    .venv/bin/python benchmarks/segment_bench.py [--width 80000 --height 60000] [--repeats 5]

The first run writes the slide (a full Aperio-layout pyramid, tissue textured with a real H&E
image) under ``$WSI_BENCH_CACHE`` or ``<tmp>/wsi-pipeline-bench`` and reuses it afterwards.
Per repeat it times what the segment stage does per slide, on a freshly opened slide:
segmentation image (CLAM's level, or a block thumbnail), segmentation, tiling at 0.5 um/px with
256-px patches (512 level-0 px). Prints a table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_slide(width: int, height: int, mpp: float = 0.25, seed: int = 0) -> Path:
    """Path of the cached benchmark slide, written on first use (atomically)."""
    from extract.synthetic import write_large_svs

    cache = Path(os.environ.get("WSI_BENCH_CACHE", Path(tempfile.gettempdir()) / "wsi-pipeline-bench"))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"bench_{width}x{height}_mpp{mpp:g}_seed{seed}.svs"
    if not path.exists():
        data = Path(os.environ.get("WSI_TEST_DATA", ROOT.parent / "shared" / "data"))
        texture = data / "images" / "prostate_he_2500.jpeg"
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        t0 = time.perf_counter()
        print(f"writing {path.name} (once) ...", flush=True)
        write_large_svs(tmp, width, height, mpp, texture=texture if texture.exists() else None, seed=seed)
        os.replace(tmp, path)
        print(f"  wrote {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=80_000)
    ap.add_argument("--height", type=int, default=60_000)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--mode", choices=("clam", "thumbnail"), default="clam")
    args = ap.parse_args(argv)

    from extract.segmentation import load_preset, segment_tissue, segmentation_image
    from extract.slide import Slide
    from extract.tiling import level0_patch_px, tile_tissue

    path = bench_slide(args.width, args.height, args.mpp)
    params = load_preset(args.preset)
    rows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with Slide(path) as slide:
            patch0 = level0_patch_px(256, 0.5, slide.require_mpp())
            image, scale = segmentation_image(slide, mode=args.mode)
            t1 = time.perf_counter()
            tissue = segment_tissue(image, params, scale)
            t2 = time.perf_counter()
            coords = tile_tissue(tissue, patch0, slide.dimensions)
            t3 = time.perf_counter()
            levels = slide.level_dimensions
        rows.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))

    print()
    print(f"slide      {path.name}: {args.width} x {args.height} px, {args.mpp} um/px, "
          f"{len(levels)} levels {levels}")
    print(f"result     image {image.shape[1]}x{image.shape[0]} (mode {args.mode}), preset {args.preset}: "
          f"{tissue.n_contours} contours, {sum(map(len, tissue.holes))} holes, "
          f"{len(coords)} patches of {patch0} level-0 px (256 px at 0.5 um/px)")
    print(f"machine    {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {cpu_model()}, "
          f"Python {platform.python_version()}")
    print()
    print(f"{'step':<22}{'median s':>10}{'min s':>10}{'max s':>10}")
    for i, name in enumerate(("read seg. image", "segment_tissue", "tile_tissue", "total per slide")):
        values = [r[i] for r in rows]
        print(f"{name:<22}{statistics.median(values):>10.3f}{min(values):>10.3f}{max(values):>10.3f}")
    print(f"\n{args.repeats} repeats; target <= 3 s per slide")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
