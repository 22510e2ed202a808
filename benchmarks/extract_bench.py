"""End-to-end feature extraction throughput: reader + on-device preprocessing + encoders.

    .venv/bin/python benchmarks/extract_bench.py                   # auto device
    .venv/bin/python benchmarks/extract_bench.py --device cpu --patches 256 --workers 1
    .venv/bin/python benchmarks/extract_bench.py --device cpu --patches 128 --backbones resnet18,resnet50_trunc

Same slide and tissue patches as read_bench.py (0.25 mpp generated slide, 512 level-0 px per
20x patch, delivered at 256 px and resized to 224 on the device), resnet50_trunc with random
weights (no downloads here; speed does not depend on the weights), batch 64.

CUDA: pinned batches, ``non_blocking`` copies, channels_last, autocast bf16 (fp16 where bf16
is missing), ``inference_mode``, cudnn.benchmark. CPU: fp32 (CPU autocast is slower on most
CPUs), same code path.

Two passes: a *split* pass that synchronises after every step to attribute time to reading
(waiting for the next batch), transfer (host->device copy + resize + normalise) and the model;
on CUDA also an *overlapped* pass with no per-batch synchronisation (the real pipeline's rate).
Then a *product* pass: the extract stage's own per-slide loop (``extract_slide``) feeding every
``--backbones`` encoder from one read pass, with patches/s and the read / per-encoder split.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def pick_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def amp_dtype(device):
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def run_pass(path, coords, patch0, out_px, model, device, dtype, workers, batch_size, split: bool):
    import torch

    from extract.backbones import preprocess_on_device
    from extract.patch_reader import iter_patch_batches

    cfg = model.backbone_config
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    t_read = t_transfer = t_model = 0.0
    n = 0
    outputs = []
    batches = iter_patch_batches(path, coords, patch0, out_px, batch_size=batch_size,
                                 num_workers=workers, pin_memory=cuda)
    start = time.perf_counter()
    with batches, torch.inference_mode():
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                indices, patches = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            x = torch.as_tensor(patches).to(device, non_blocking=True)
            x = preprocess_on_device(x, cfg, dtype or torch.float32)
            if split:
                sync()
            t2 = time.perf_counter()
            with autocast():
                feats = model(x)
            if split:
                feats = feats.float().cpu()
            outputs.append(feats)
            t3 = time.perf_counter()
            t_read, t_transfer, t_model = t_read + t1 - t0, t_transfer + t2 - t1, t_model + t3 - t2
            n += len(indices)
        features = torch.cat([f.float() for f in outputs]).cpu()  # the one sync of the overlapped pass
    total = time.perf_counter() - start
    assert features.shape == (len(coords), cfg.feature_dim) and torch.isfinite(features).all()
    return {"patches": n, "seconds": total, "patches_per_s": n / total,
            **({"read_s": t_read, "transfer_s": t_transfer, "model_s": t_model} if split else {})}


def product_pass(path, coords, patch0, out_px, backbones: list[str], device: str, workers: int,
                 batch_size, tmp_dir: Path) -> dict:
    """The product's own loop (``pipeline.extract_stage.extract_slide``) over ``backbones`` at once.

    Reports, per encoder, patches/s over the whole pass and the seconds the loop spent waiting
    for the reader and in that encoder (forward passes; on CUDA the final copy-back lands in the
    last encoder's time because nothing synchronises per batch).
    """
    from types import SimpleNamespace

    from extract.coords_file import write_coords
    from pipeline.config import ExtractConfig
    from pipeline.extract_stage import Extractor, extract_slide

    coords_path = tmp_dir / "coords.h5"
    write_coords(coords_path, coords, {"patch_size_level0": patch0, "patch_px": out_px, "patch_level": 0,
                                       "target_mpp": 0.5})
    configs = [ExtractConfig(backbone=b, weights="random", device=device, batch_size=batch_size,
                             num_workers=workers, dtype="float16") for b in backbones]
    extractors = [Extractor.create(c) for c in configs]
    if batch_size == "auto":
        from pipeline.device_feed import auto_batch_size

        configs[0] = ExtractConfig(**{**configs[0].__dict__, "batch_size": auto_batch_size(extractors, out_px)})
    row = SimpleNamespace(slide_id="bench", path=path, mpp=None)
    warm = tmp_dir / "warm.h5"
    write_coords(warm, coords[: min(len(coords), 64)], {"patch_size_level0": patch0, "patch_px": out_px,
                                                          "patch_level": 0, "target_mpp": 0.5})
    extract_slide(row, [tmp_dir / f"w{k}.h5" for k in range(len(extractors))], warm, extractors, configs[0])
    start = time.perf_counter()
    outcomes = extract_slide(row, [tmp_dir / f"b{k}.h5" for k in range(len(extractors))], coords_path,
                             extractors, configs[0])
    total = time.perf_counter() - start
    return {"batch_size": configs[0].batch_size, "seconds": total, "patches_per_s": len(coords) / total,
            "read_wait_s": outcomes[0].extra["read_s"],
            "encoders": {b: {"model_s": o.extra["model_s"], "precision": str(e.amp_dtype or "float32")}
                         for b, o, e in zip(backbones, outcomes, extractors)}}


def main(argv=None) -> dict:
    import torch

    from extract.backbones import create_backbone
    from read_bench import bench_slide, tissue_coords

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--size", default="80000x60000", help="generated slide WIDTHxHEIGHT (cached)")
    ap.add_argument("--slide", type=Path, help="use this 0.25-mpp slide instead")
    ap.add_argument("--patches", type=int, help="patches to embed (default: 256 on CPU, 2000 on CUDA)")
    ap.add_argument("--workers", type=int, help="reader processes (default: 1 on CPU, 8 on CUDA)")
    ap.add_argument("--batch-size", default="64", help="patches per batch, or auto")
    ap.add_argument("--backbones", default="resnet50_trunc",
                    help="comma-separated encoders for the product pass (random weights), e.g. resnet18,resnet50_trunc")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    if args.batch_size != "auto":
        args.batch_size = int(args.batch_size)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    n_patches = args.patches or (2000 if cuda else 256)
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if cuda else 1)
    width, height = (int(v) for v in args.size.lower().split("x"))
    path = args.slide or bench_slide(width, height)
    patch0, out_px = 512, 256
    coords = tissue_coords(path, patch0, n_patches)[:n_patches]

    torch.manual_seed(0)
    model = create_backbone("resnet50_trunc", weights="random").to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(device)
    if cuda:
        torch.backends.cudnn.benchmark = True
    loop_batch = args.batch_size if args.batch_size != "auto" else 64
    # Warm-up: kernels/autotuning and the reader's fork server, outside the timings.
    run_pass(path, coords[:loop_batch], patch0, out_px, model, device, dtype, workers, loop_batch, split=True)

    results = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""),
               "dtype": str(dtype or torch.float32).replace("torch.", ""), "workers": workers,
               "batch_size": loop_batch, "torch_threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]}
    results["split"] = run_pass(path, coords, patch0, out_px, model, device, dtype, workers, loop_batch, split=True)
    if cuda:
        results["overlapped"] = run_pass(path, coords, patch0, out_px, model, device, dtype, workers,
                                         loop_batch, split=False)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results["product"] = product_pass(path, coords, patch0, out_px, args.backbones.split(","), str(device),
                                          workers, args.batch_size, Path(tmp))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
