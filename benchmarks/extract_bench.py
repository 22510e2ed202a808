"""End-to-end feature extraction throughput: reader + on-device preprocessing + resnet50_trunc.

    .venv/bin/python benchmarks/extract_bench.py                   # auto device
    .venv/bin/python benchmarks/extract_bench.py --device cpu --patches 256 --workers 1

Same slide and tissue patches as read_bench.py (0.25 mpp generated slide, 512 level-0 px per
20x patch, delivered at 256 px and resized to 224 on the device), resnet50_trunc with random
weights (no downloads here; speed does not depend on the weights), batch 64.

CUDA: pinned batches, ``non_blocking`` copies, channels_last, autocast bf16 (fp16 where bf16
is missing), ``inference_mode``, cudnn.benchmark. CPU: fp32 (CPU autocast is slower on most
CPUs), same code path.

Two passes: a *split* pass that synchronises after every step to attribute time to reading
(waiting for the next batch), transfer (host->device copy + resize + normalise) and the model;
on CUDA also an *overlapped* pass with no per-batch synchronisation (the real pipeline's rate).
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
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

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
    # Warm-up: kernels/autotuning and the reader's fork server, outside the timings.
    run_pass(path, coords[: args.batch_size], patch0, out_px, model, device, dtype, workers, args.batch_size, split=True)

    results = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""),
               "dtype": str(dtype or torch.float32).replace("torch.", ""), "workers": workers,
               "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]}
    results["split"] = run_pass(path, coords, patch0, out_px, model, device, dtype, workers, args.batch_size, split=True)
    if cuda:
        results["overlapped"] = run_pass(path, coords, patch0, out_px, model, device, dtype, workers,
                                         args.batch_size, split=False)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
