"""Training cost per epoch: baseline vs MHIM-MIL for AB-MIL and TransMIL, and MHIM-v2's GRN on/off.

Runs the real trainer (``mil.trainer.train_fold``: one bag per step, Adam, validation each epoch)
on generated bags shaped like CAMELYON16 features (ResNet-50-trunc, 1024-d): on CUDA 270 bags of
~8,000 instances; on the CPU a scaled-down 24 bags of ~2,000 on one thread (printed; a shared CPU
gives unstable multi-thread timings). Each configuration runs
in its own process, so its peak memory is its own: ``torch.cuda.max_memory_allocated`` on CUDA,
the peak resident set size above the level before training on the CPU.

The first epoch is a warm-up; the reported s/epoch is the fastest of the following ones (robust
to other load on the machine; the mean is printed too): training plus the validation pass on a
few bags, checkpoint writing excluded. Paper reference (MHIM-MIL
Table 2, RTX 3090, C16): AB-MIL 4.0 s / 2.4 GB, MHIM(AB-MIL) 4.3 s / 2.3 GB, TransMIL
13.1 s / 10.6 GB, MHIM(TransMIL) 10.1 s / 5.5 GB.

    python benchmarks/train_bench.py                 # auto device, default scale
    python benchmarks/train_bench.py --device cpu --bags 12 --instances 1000 --only abmil mhim_abmil
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MHIM_ABMIL_C16 = {"mask_ratio": 0.5, "mask_ratio_h": 0.01, "mask_ratio_hr": 0.5, "mrh_schedule": "cosine",
                  "cl_alpha": 0.1}
MHIM_TRANSMIL_C16 = {"mask_ratio_l": 0.8, "mask_ratio_h": 0.03, "mask_ratio_hr": 0.5, "cl_alpha": 0.1}
MHIM_V2 = {"mask_score": "class_prob", "mask_ratio_h": 0.03, "teacher_momentum": 0.9997, "cl_alpha": 0.5}

CONFIGS = {
    "abmil": dict(model="abmil", mhim=None),
    "mhim_abmil": dict(model="abmil", mhim=MHIM_ABMIL_C16),
    "transmil": dict(model="transmil", mhim=None),
    "mhim_transmil": dict(model="transmil", mhim=MHIM_TRANSMIL_C16),
    "mhim2_abmil_grn_off": dict(model="abmil", mhim={**MHIM_V2, "grn": False}),
    "mhim2_abmil_grn_on": dict(model="abmil", mhim={**MHIM_V2, "grn": True, "keep_ratio": 0.9, "grn_tokens": 5}),
}
RATIOS = (  # (numerator, denominator, target, comparison)
    ("mhim_abmil", "abmil", 1.15, "MHIM(AB-MIL) / AB-MIL"),
    ("mhim_transmil", "transmil", 0.85, "MHIM(TransMIL) / TransMIL"),
    ("mhim2_abmil_grn_on", "mhim2_abmil_grn_off", 1.30, "MHIM-v2 GRN on / off (AB-MIL)"),
)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _make_bags(n_bags: int, n_instances: int, dim: int, seed: int):
    """float16 bags of ~n_instances (uniform 0.75x-1.25x), random labels; no float32 copy kept."""
    import torch

    from mil.data import BagSet

    g = torch.Generator().manual_seed(seed)
    feats, labels = {}, {}
    for i in range(n_bags):
        n = int(torch.randint(int(n_instances * 0.75), int(n_instances * 1.25) + 1, (1,), generator=g))
        feats[f"bag_{i:03d}"] = torch.randn(n, dim, generator=g).half()
        labels[f"bag_{i:03d}"] = i % 2
    return BagSet(feats), labels


def _warm_up(spec: dict, dim: int, device) -> None:
    """One small training step of the same kind: kernels, autograd, optimizer and library code
    loaded, so the memory measured afterwards is the configuration's own (on the CPU the first
    optimizer step alone imports ~150 MiB of torch._dynamo and friends)."""
    import torch
    import torch.nn.functional as F

    from mil.mhim import MHIM
    from mil.models import create_model
    from mil.train_config import MHIMConfig

    model = create_model(spec["model"], dim, 2).to(device)
    x, y = torch.randn(1, 64, dim, device=device), torch.tensor([1], device=device)
    if spec["mhim"] is not None:
        wrapper = MHIM(model, MHIMConfig(**spec["mhim"]))
        loss, _ = wrapper.training_step(x, y, 0, 10, F.cross_entropy)
    else:
        loss = F.cross_entropy(model(x).logits, y)
    # the first optimizer use imports torch._dynamo & co (~150 MiB): not the configuration's cost
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2)
    loss.backward()
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        model.eval()(x)
    del model, loss, optimizer, scheduler
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _one(name: str, args: dict, queue) -> None:
    import torch

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    from mil.data import LabelMap, Targets
    from extract.runtime import resolve_device
    from mil.train_config import TrainConfig
    from mil.trainer import train_fold

    device = resolve_device(args["device"])
    bags, labels = _make_bags(args["bags"], args["instances"], args["dim"], seed=0)
    ids = bags.slide_ids
    n_val = max(2, args["bags"] // 20)
    split = {"train": ids[n_val:], "val": ids[:n_val], "test": []}
    targets = Targets("classification", y=labels, labels=LabelMap(("0", "1")))
    spec = CONFIGS[name]
    config = TrainConfig(model=spec["model"], mhim=spec["mhim"], teacher_init="none", epochs=args["epochs"] + 1,
                         patience=None, device=args["device"], precision=args["precision"])
    bags.to_device(device)  # the float32 copy is part of the data, not of the model's cost
    # load what the first epoch would import lazily, so the memory baseline holds the libraries
    import sklearn.metrics  # noqa: F401

    import mil.metrics  # noqa: F401
    import mil.mhim  # noqa: F401
    import mil.survival  # noqa: F401

    _warm_up(spec, args["dim"], device)
    out = Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    try:
        rss0 = _rss_bytes()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base_alloc = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        train_fold(bags, split, config, out / "fold_0", targets=targets, seed=0, fold=0)
        wall = time.perf_counter() - t0
        import csv

        with open(out / "fold_0" / "history.csv", newline="") as f:
            seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base_alloc
            mem_kind = "CUDA max_memory_allocated above the bags"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
            mem_kind = "peak RSS above the level before training"
        measured = seconds[1:] or seconds
        queue.put({"name": name, "s_per_epoch": min(measured), "mean_s_per_epoch": sum(measured) / len(measured),
                   "first_epoch_s": seconds[0], "peak_bytes": int(peak), "mem_kind": mem_kind,
                   "wall_s": wall, "device": str(device), "threads": torch.get_num_threads()})
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--bags", type=int, help="default 270 on CUDA, 24 on CPU")
    p.add_argument("--instances", type=int, help="mean instances per bag; default 8000 on CUDA, 2000 on CPU")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=2, help="measured epochs after one warm-up epoch")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU, torch's default on CUDA)")
    p.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run only these configurations")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)

    import torch

    cuda = a.device.startswith("cuda") or (a.device == "auto" and torch.cuda.is_available())
    args = {"device": a.device, "bags": a.bags or (270 if cuda else 24),
            "instances": a.instances or (8000 if cuda else 2000), "dim": a.dim, "epochs": a.epochs,
            "precision": a.precision, "threads": a.threads if a.threads is not None else (0 if cuda else 1)}
    scale = "CAMELYON16 scale" if cuda and args["bags"] == 270 else "SCALED DOWN from C16's 270 x ~8,000 (CPU)"
    print(f"train_bench: {args['bags']} bags x ~{args['instances']} instances x {args['dim']}-d ({scale}); "
          f"device {a.device}; {a.precision}; 1 warm-up + {a.epochs} measured epoch(s) per configuration",
          flush=True)
    ctx = mp.get_context("spawn")
    results = {}
    for name in a.only or CONFIGS:
        q = ctx.Queue()
        proc = ctx.Process(target=_one, args=(name, args, q))
        proc.start()
        proc.join()
        if proc.exitcode != 0 or q.empty():
            print(f"  {name}: FAILED (exit code {proc.exitcode})")
            continue
        r = q.get()
        results[name] = r
        print(f"  {name:<22} {r['s_per_epoch']:8.2f} s/epoch  (mean {r['mean_s_per_epoch']:.2f}, warm-up "
              f"{r['first_epoch_s']:.2f})  peak {r['peak_bytes'] / 2**20:8.1f} MiB  "
              f"[{r['device']}, {r['threads']} thread(s)]", flush=True)
    if results:
        print(f"  memory: {next(iter(results.values()))['mem_kind']}")
    print("ratios (s/epoch):")
    for num, den, target, label in RATIOS:
        if num in results and den in results:
            ratio = results[num]["s_per_epoch"] / results[den]["s_per_epoch"]
            mem = results[num]["peak_bytes"] / max(results[den]["peak_bytes"], 1)
            verdict = "ok" if ratio <= target else "ABOVE TARGET"
            print(f"  {label:<32} {ratio:5.2f}  (target <= {target:.2f}: {verdict}); memory ratio {mem:.2f}")
    if a.json:
        a.json.write_text(json.dumps({"args": args, "results": results}, indent=2))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
