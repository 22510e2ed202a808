"""Batch size from the free device memory (``--batch-size auto``)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CPU_BATCH = 64          # patches per batch on a CPU: larger batches gain nothing there
PROBE = 8               # patches in the measuring forward pass
MEMORY_FRACTION = 0.6   # of the memory free after loading the models; the rest is headroom
MAX_BATCH = 1024


def auto_batch_size(extractors: list, patch_px: int) -> int:
    """The largest batch (a multiple of 8, 8..1024) whose forward pass fits the free device memory.

    Parameters
    ----------
    extractors : the :class:`~pipeline.extract_stage.Extractor` objects fed from one batch (they
        run one after another, so the largest per-patch need counts, not their sum).
    patch_px : side of the uint8 patches the reader delivers, in pixels.

    Returns
    -------
    int: ``CPU_BATCH`` on a CPU; on CUDA, ``MEMORY_FRACTION`` of the free memory divided by the
    peak memory per patch measured in a ``PROBE``-patch forward pass of each model.
    """
    import torch

    device = extractors[0].device
    if device.type != "cuda":
        return CPU_BATCH
    probe = torch.zeros((PROBE, patch_px, patch_px, 3), dtype=torch.uint8, device=device)
    per_patch = 1.0
    for ex in extractors:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        ex.embed(probe)
        torch.cuda.synchronize(device)
        per_patch = max(per_patch, (torch.cuda.max_memory_allocated(device) - base) / PROBE)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    batch = int(MEMORY_FRACTION * free / per_patch) // 8 * 8
    batch = max(8, min(MAX_BATCH, batch))
    log.info("--batch-size auto: %d patches (%.1f MiB per patch at %d px, %.1f GiB free on %s)",
             batch, per_patch / 2**20, patch_px, free / 2**30, device)
    return batch
