"""Feature extraction throughput of the extract stage's own loop: reader + device feed + encoders.

    .venv/bin/python benchmarks/extract_bench.py                   # auto device, resnet50_trunc
    .venv/bin/python benchmarks/extract_bench.py --device cpu --patches 256 --workers 1
    .venv/bin/python benchmarks/extract_bench.py --device cuda --backbones resnet50_trunc,uni --precision bf16
    .venv/bin/python benchmarks/extract_bench.py --device cuda --backbones uni --batch-size auto --compile

What is timed is ``pipeline.extract_stage.extract_slide``, the per-slide loop of
``wsi-pipeline extract`` (reader processes, pinned batches, one host->device copy per batch,
on-device resize/normalise, every ``--backbones`` encoder fed from the same device batch,
features kept on the device until the slide ends), on the tissue patches of the generated
0.25-mpp slide of read_bench.py: 512 level-0 px per 20x patch, delivered at 256 px and resized
on the device to each encoder's input size. Encoders have random weights (nothing is
downloaded; speed does not depend on the weights): ``uni`` is the registry's exact ViT-L/16.

Reported per pass: patches/s over the slide (all encoders together) and the split the loop
itself records (``SlideOutcome.extra``): ``read_s`` host seconds waiting for the reader,
``transfer_s`` host->device copy + preprocessing and ``model_s`` per encoder; on CUDA the last
two are device time from CUDA events, so measuring adds no per-batch synchronisation. One
untimed warm-up pass first (kernel selection, ``torch.compile``, the reader's fork server)
that also sees the last, smaller batch's shape; then ``--repeats`` timed passes (best and all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def _write_coords(path: Path, coords, patch0: int, out_px: int) -> Path:
    from extract.coords_file import write_coords

    return write_coords(path, coords, {"patch_size_level0": patch0, "patch_px": out_px, "patch_level": 0,
                                       "target_mpp": 0.5})


def product_pass(path, coords, patch0: int, out_px: int, backbones: list[str], device: str, workers: int,
                 batch_size, precision: str = "auto", compile: bool = False, repeats: int = 1,
                 tmp_dir: Path | None = None) -> dict:
    """Time ``extract_slide`` over ``backbones`` at once (one read pass feeds them all).

    Returns a dict: ``batch_size`` (resolved when 'auto'), ``patches``, ``seconds`` and
    ``patches_per_s`` of the best pass, ``all_patches_per_s``, ``read_wait_s``, ``transfer_s``
    and, per encoder, ``model_s`` and ``precision``.
    """
    import dataclasses

    from pipeline.config import ExtractConfig
    from pipeline.extract_stage import Extractor, extract_slide

    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        tmp = Path(tmp)
        configs = [ExtractConfig(backbone=b, weights="random", device=device, batch_size=batch_size,
                                 num_workers=workers, precision=precision, compile=compile) for b in backbones]
        extractors = [Extractor.create(c) for c in configs]
        config = configs[0]
        if batch_size == "auto":
            from pipeline.device_feed import auto_batch_size

            config = dataclasses.replace(config, batch_size=auto_batch_size(extractors, out_px))
        b = config.batch_size
        row = SimpleNamespace(slide_id="bench", path=path, mpp=None)
        # Warm-up on one full batch plus the timed pass's last, partial one: both shapes compiled.
        warm = coords[: min(len(coords), b + len(coords) % b)]
        extract_slide(row, [tmp / f"w{k}.h5" for k in range(len(extractors))],
                      _write_coords(tmp / "warm.h5", warm, patch0, out_px), extractors, config)
        coords_path = _write_coords(tmp / "coords.h5", coords, patch0, out_px)
        runs = []
        for r in range(repeats):
            start = time.perf_counter()
            outcomes = extract_slide(row, [tmp / f"b{r}_{k}.h5" for k in range(len(extractors))], coords_path,
                                     extractors, config)
            runs.append((time.perf_counter() - start, outcomes))
        seconds, outcomes = min(runs, key=lambda run: run[0])
    n = outcomes[0].patches
    assert n == len(coords), (n, len(coords))
    return {"backbones": backbones, "batch_size": b, "compile": bool(compile), "patches": n,
            "seconds": round(seconds, 3), "patches_per_s": round(n / seconds, 1),
            "all_patches_per_s": [round(n / s, 1) for s, _ in runs],
            "read_wait_s": outcomes[0].extra["read_s"], "transfer_s": outcomes[0].extra["transfer_s"],
            "encoders": {name: {"model_s": o.extra["model_s"],
                                "precision": str(e.amp_dtype or "float32").replace("torch.", "")}
                         for name, o, e in zip(backbones, outcomes, extractors)}}


def main(argv=None) -> dict:
    import torch

    from read_bench import bench_slide, tissue_coords

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--size", default="80000x60000", help="generated slide WIDTHxHEIGHT (cached)")
    ap.add_argument("--slide", type=Path, help="use this 0.25-mpp slide instead")
    ap.add_argument("--patches", type=int, help="patches to embed (default: 256 on CPU, 2000 on CUDA)")
    ap.add_argument("--workers", type=int, help="reader processes (default: 1 on CPU, 8 on CUDA)")
    ap.add_argument("--batch-size", default="64", help="patches per batch, or auto")
    ap.add_argument("--backbones", default="resnet50_trunc",
                    help="comma-separated encoders fed from one read pass (random weights), e.g. resnet50_trunc,uni")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    ap.add_argument("--compile", action="store_true", help="torch.compile every encoder")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes (the best is reported)")
    ap.add_argument("--label", help="name of this configuration in the output")
    ap.add_argument("--jsonl", type=Path, help="also append the result to this file as one JSON line")
    args = ap.parse_args(argv)

    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    n_patches = args.patches or (2000 if cuda else 256)
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if cuda else 1)
    width, height = (int(v) for v in args.size.lower().split("x"))
    path = args.slide or bench_slide(width, height)
    patch0, out_px = 512, 256
    coords = tissue_coords(path, patch0, n_patches)[:n_patches]

    results = {"label": args.label or f"{args.backbones} {args.precision}{' compiled' if args.compile else ''}",
               "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""),
               "torch": torch.__version__, "workers": workers, "torch_threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    results.update(product_pass(path, coords, patch0, out_px, args.backbones.split(","), str(device), workers,
                                batch_size, args.precision, args.compile, args.repeats))
    print(json.dumps(results))
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(results) + "\n")
    return results


if __name__ == "__main__":
    main()
