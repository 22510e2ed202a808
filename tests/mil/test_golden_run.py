"""Golden run: the demo config, made small, gives the same coords, features, checkpoints and metrics.

A refactor that changes no behaviour must leave this test green. The run goes through the four
stage commands (segment -> extract -> train -> evaluate) on a cohort the test generates with the
project's own ``make_cohort``, with the demo's settings (``configs/demo.yaml``: bwh_biopsy preset,
224 px at 1 um/px, ResNet-18 with random weights, MHIM(AB-MIL) recipe, 3 folds, standardized
features) shortened to a few epochs and 20 bootstrap replicates, on the CPU.

What is compared with ``tests/mil/golden/demo_small.json``:

- coords: exact (sha256 of the int64 arrays of every coords file and every bag);
- features: per bag shape, dtype, mean, std, mean |x| and the first row's first values, to
  ``atol 1e-3, rtol 2e-3`` (float16 storage: one rounding step of a different CPU's kernels
  stays inside);
- checkpoints (``best.pt`` and ``last.pt`` of every fold and of its baseline teacher): per tensor
  sum, sum of |x| and L2 norm to ``rtol 1e-4``; RNG states exactly; the other entries (epoch,
  early stopping, history losses, validation metrics, config) numbers to ``rtol 1e-4``, the rest
  exactly; timings and software versions are left out;
- ``splits.csv`` exactly; ``evaluation/metrics.json`` and ``predictions.csv`` numbers to
  ``abs 1e-4``, strings exactly (paths made relative to the workspace).

Regenerating the golden file (``WSI_REGEN_GOLDEN=1 pytest tests/mil/test_golden_run.py``) is
legitimate only when an output is meant to change: a new metric, a deliberate change of the
training recipe, a new checkpoint entry, a fix of a real bug. Say so in the commit message and
show the difference. Never regenerate it to make a refactor pass: a difference after a
refactor is a bug in the refactor unless it is proven otherwise. The test itself is
deterministic (run twice in a row, the summaries are equal).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden" / "demo_small.json"
REGEN = os.environ.get("WSI_REGEN_GOLDEN") == "1"

FEATURE_ATOL = 1e-3
FEATURE_RTOL = 2e-3  # one float16 rounding step is 2**-10 of the value
CHECKPOINT_RTOL = 1e-4
METRIC_ATOL = 1e-4

#: Entries of a checkpoint that differ between two identical runs (wall time) or machines.
VOLATILE_KEYS = {"seconds", "software"}

CONFIG = """
name: golden
manifest: {manifest}
workspace: {workspace}
segment: {{preset: bwh_biopsy, target_mpp: 1.0, patch_px: 224}}
extract: {{backbone: resnet18, weights: random, batch_size: 64, num_workers: 0, device: cpu}}
train:
  recipe: mhim_abmil_c16
  experiment: demo
  folds: 3
  seeds: [2021]
  epochs: 6
  lr: 1.0e-3
  patience: 2
  min_epochs: 2
  val_ratio: 0.2
  feature_norm: standardize
  device: cpu
evaluate: {{protocol: default, heatmaps: 0, n_boot: 20, device: cpu}}
"""


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _num(x: float) -> float:
    return float(f"{float(x):.7g}")  # 7 digits: enough for rtol 1e-4, small file


def _float_summary(a: np.ndarray) -> dict:
    a64 = np.asarray(a, dtype=np.float64)
    flat = a64.reshape(-1)
    return {"shape": list(a.shape), "dtype": str(a.dtype), "mean": _num(flat.mean()), "std": _num(flat.std()),
            "abs_mean": _num(np.abs(flat).mean()), "first": [_num(v) for v in flat[:6]]}


def _h5_arrays(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as h5:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                a = obj[()]
                if np.issubdtype(a.dtype, np.floating):
                    out[name] = _float_summary(a)
                else:
                    out[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha(a)}
        h5.visititems(visit)
    return out


def _plain(obj, workspace: str):
    """A checkpoint entry as JSON: tensors summarised, paths relative to the workspace."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.uint8:  # RNG states
            return {"sha256": _sha(t.numpy())}
        t64 = t.double()
        return {"shape": "x".join(map(str, t.shape)), "sum": _num(t64.sum()), "abs_sum": _num(t64.abs().sum()),
                "norm": _num(t64.norm())}
    if isinstance(obj, dict):
        return {str(k): _plain(v, workspace) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, (list, tuple)):
        if len(obj) > 16 and all(isinstance(v, (int, float)) for v in obj):
            a = np.asarray(obj, dtype=np.float64)
            return {"len": len(obj), "sum": _num(a.sum()), "abs_sum": _num(np.abs(a).sum()),
                    "first": [_num(v) for v in a[:4]]}
        return [_plain(v, workspace) for v in obj]
    if isinstance(obj, float):
        return _num(obj)
    if isinstance(obj, str):
        return obj.replace(workspace, "<ws>")
    return obj


def _csv_rows(path: Path, workspace: str) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _cell(v, workspace) for k, v in row.items()} for row in csv.DictReader(f)]


def _cell(v: str, workspace: str):
    try:
        return _num(float(v)) if v not in ("", "nan") else v
    except ValueError:
        return v.replace(workspace, "<ws>")


def run_pipeline(tmp: Path) -> Path:
    """Generate the cohort and run the four stages; returns the workspace."""
    from extract.synthetic import make_cohort
    from pipeline.cli import main

    manifest = make_cohort(tmp / "cohort", n_slides=12, seed=0, size_px=(3072, 2048))
    workspace = tmp / "ws"
    cfg = tmp / "golden.yaml"
    cfg.write_text(CONFIG.format(manifest=manifest, workspace=workspace))
    for stage in ("segment", "extract", "train", "evaluate"):
        assert main([stage, "--config", str(cfg), "-q"]) == 0, f"{stage} failed"
    return workspace


def summarise(workspace: Path) -> dict:
    """Everything the golden file holds, from one finished workspace."""
    import torch

    ws = str(workspace)
    seg = workspace / "segment" / "mpp1.00_224px_bwh_biopsy"
    bags = workspace / "features" / "resnet18-random" / "mpp1.00_224px_bwh_biopsy"
    exp = workspace / "experiments" / "demo"
    out: dict = {"coords": {p.stem: _h5_arrays(p) for p in sorted((seg / "coords").glob("*.h5"))},
                 "features": {p.stem: _h5_arrays(p) for p in sorted(bags.glob("*.h5"))},
                 "splits_sha256": hashlib.sha256((exp / "splits.csv").read_bytes()).hexdigest(),
                 "checkpoints": {}}
    for path in sorted(exp.glob("**/*.pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        entry = _plain(ckpt, ws)
        wrapper = entry.get("wrapper")
        if wrapper is not None:  # the MHIM wrapper's state is student.* + teacher.*: checked, not stored twice
            parts = {f"{role}.{k}": v for role in ("student", "teacher") for k, v in (entry[role] or {}).items()}
            entry["wrapper"] = "student + teacher" if wrapper == parts else wrapper
        out["checkpoints"][path.relative_to(exp).as_posix()] = entry
    # The resolved train configs (the MHIM run's and its baseline's) are kept once each and
    # referred to by their index from every checkpoint.
    configs = sorted({json.dumps(c["config"], sort_keys=True) for c in out["checkpoints"].values()})
    for c in out["checkpoints"].values():
        c["config"] = configs.index(json.dumps(c["config"], sort_keys=True))
    out["train_configs"] = [json.loads(c) for c in configs]
    out["metrics"] = _plain(json.loads((exp / "evaluation" / "metrics.json").read_text()), ws)
    out["predictions"] = _csv_rows(exp / "evaluation" / "predictions.csv", ws)
    return out


def _dump(obj, depth: int = 0) -> str:
    """JSON with one line per leaf group (a tensor, a bag dataset, a metric record): small, diffable."""
    if not isinstance(obj, dict) or depth >= 3 or not any(isinstance(v, dict) for v in obj.values()):
        return json.dumps(obj, sort_keys=True, separators=(",", ":"))
    pad = " " * (depth + 1)
    items = [f"{pad}{json.dumps(k)}: {_dump(v, depth + 1)}" for k, v in sorted(obj.items())]
    return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"


def compare(golden, actual, path: str = "", rtol: float = 0.0, atol: float = 0.0) -> list[str]:
    """Differences between two summaries as readable lines (empty when they agree)."""
    if path.startswith("/features"):
        rtol, atol = FEATURE_RTOL, FEATURE_ATOL
    elif path.startswith("/checkpoints"):
        rtol, atol = CHECKPOINT_RTOL, 1e-7
    elif path.startswith(("/metrics", "/predictions")):
        rtol, atol = 0.0, METRIC_ATOL
    if isinstance(golden, dict) and isinstance(actual, dict):
        diffs = [f"{path}/{k}: missing" for k in golden if k not in actual]
        diffs += [f"{path}/{k}: unexpected" for k in actual if k not in golden]
        for k in golden.keys() & actual.keys():
            k_atol = atol
            if k == "sum" and "abs_sum" in golden:  # a sum near zero (mixed signs) is judged against sum |x|
                k_atol = max(atol, max(rtol, atol) * golden["abs_sum"])
            diffs += compare(golden[k], actual[k], f"{path}/{k}", rtol, k_atol)
        return diffs
    if isinstance(golden, list) and isinstance(actual, list):
        if len(golden) != len(actual):
            return [f"{path}: length {len(actual)} != golden {len(golden)}"]
        return [d for i, (g, a) in enumerate(zip(golden, actual)) for d in compare(g, a, f"{path}[{i}]", rtol, atol)]
    is_float = isinstance(golden, float) or isinstance(actual, float)
    if is_float and isinstance(golden, (int, float)) and isinstance(actual, (int, float)) \
            and not isinstance(golden, bool) and not isinstance(actual, bool):
        if math.isnan(golden) and math.isnan(actual):
            return []
        if math.isclose(actual, golden, rel_tol=rtol, abs_tol=atol):
            return []
        return [f"{path}: {actual!r} != golden {golden!r}"]
    return [] if golden == actual else [f"{path}: {actual!r} != golden {golden!r}"]


@pytest.mark.slow
def test_demo_config_golden_run(tmp_path):
    actual = summarise(run_pipeline(tmp_path))
    if REGEN:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(_dump(actual) + "\n")
        pytest.skip(f"regenerated {GOLDEN}; commit it with the reason the outputs changed")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing: generate it with WSI_REGEN_GOLDEN=1 (see the module docstring)"
    golden = json.loads(GOLDEN.read_text())
    diffs = sorted(compare(golden, actual))
    assert not diffs, f"{len(diffs)} difference(s) from the golden run:\n" + "\n".join(diffs[:40])
