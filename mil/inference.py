"""Inference of a trained student on full bags: :func:`predict_bags` and the bag iteration.

    model = load_student(fold_dir / "best.pt")          # mil.checkpoints
    rows = predict_bags(model, bags, "cpu")              # one dict per bag, input order

Used by training (validation every epoch) and by evaluation (test, external sets, heatmaps).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from extract.errors import ConfigError
from extract.runtime import autocast
from mil.data import BagSet

__all__ = ["predict_bags", "iter_bags"]


def iter_bags(bag_list: Any, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """``(slide_id, features [N, D] float on device)`` of a BagSet or of ``(slide_id, x)`` pairs."""
    if isinstance(bag_list, BagSet):
        for sid in bag_list.slide_ids:
            yield sid, bag_list.get(sid, device)
        return
    for item in bag_list:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            sid, x = item
        elif hasattr(item, "slide_id") and hasattr(item, "features"):
            sid, x = item.slide_id, item.features
        else:
            raise ConfigError(
                "The 'bag_list' parameter of predict_bags must be a BagSet or an iterable of "
                f"(slide_id, features [N, D]) pairs. Got an item of type {type(item).__name__} instead."
            )
        x = torch.as_tensor(x)
        yield str(sid), x.to(device, non_blocking=True).float()


@torch.no_grad()
def predict_bags(
    model: nn.Module,
    bag_list: Any,
    device: str | torch.device = "cpu",
    task: str | None = None,
    instance_scores: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> list[dict]:
    """Run ``model`` (eval mode, no_grad) on full bags.

    Parameters
    ----------
    model : a student (or MHIM wrapper) returning ``MILOutput``; see :func:`load_student`.
    bag_list : a :class:`~mil.data.BagSet` or an iterable of ``(slide_id, features [N, D])``.
    device : where to run.
    task : 'classification' or 'survival'; default ``model.wsi_meta['task']`` or classification.
    instance_scores : also return the per-instance scores (and attention where the model has it).
    autocast_dtype : run under autocast in this dtype (:func:`extract.runtime.autocast_dtype`), or
        None for fp32.

    Returns
    -------
    list of dict, one per bag, in input order:
        ``slide_id``; ``logits`` ndarray [C]; classification: ``prob`` ndarray [C] (the
        student's ``class_probabilities``: softmax of the logits, DSMIL v1 its two-stream mean);
        survival: ``risk`` float (higher = earlier event) and ``survival`` ndarray [K];
        ``instance_scores`` ndarray [N] (what MHIM ranks by: attention logits for AB-MIL) and
        ``attention`` ndarray [N] when the model reports one.
    """
    device = torch.device(device)
    if task is None:
        task = (getattr(model, "wsi_meta", None) or {}).get("task") or "classification"
    was_training = model.training
    model.eval()
    ids: list[str] = []
    logits: list[torch.Tensor] = []
    per_bag: list[dict] = []
    ctx = autocast(device, autocast_dtype)
    meta = getattr(model, "wsi_meta", None) or {}
    head = getattr(model, "student", model)  # an MHIM wrapper predicts with its student
    norm = None
    if meta.get("feature_mean") is not None:  # the checkpoint was trained on standardized features
        norm = (torch.tensor(meta["feature_mean"], device=device), torch.tensor(meta["feature_std"], device=device))
    try:
        for sid, x in iter_bags(bag_list, device):
            if norm is not None:
                x = (x.float() - norm[0]) / norm[1]
            with ctx:
                out = model(x.unsqueeze(0) if x.dim() == 2 else x)
            ids.append(sid)
            logits.append(out.logits[0].float())
            extra = {}
            if task != "survival" and hasattr(head, "class_probabilities"):
                extra["prob"] = head.class_probabilities(out)[0].float().cpu().numpy()
            if instance_scores:
                # With grn_at_test the GRN's k tokens are appended after the N instances: keep
                # the instances' scores only, one per patch coordinate.
                extra["instance_scores"] = out.instance_scores[0, : x.shape[-2]].float().cpu().numpy()
                att = (out.extras or {}).get("attention") if hasattr(out, "extras") else None
                if isinstance(att, torch.Tensor) and att.dim() >= 2 and att.shape[-1] == x.shape[-2]:
                    extra["attention"] = att.reshape(-1, att.shape[-1])[0].float().cpu().numpy()
            per_bag.append(extra)
    finally:
        model.train(was_training)
    if not ids:
        return []
    stacked = torch.stack(logits)  # one transfer for the whole list
    rows: list[dict] = []
    if task == "survival":
        from mil.survival import risk_from_logits

        risk, surv = risk_from_logits(stacked)
        risk, surv = risk.cpu().numpy(), surv.cpu().numpy()
    else:
        prob = stacked.softmax(dim=1).cpu().numpy()
    lg = stacked.cpu().numpy()
    for i, sid in enumerate(ids):
        row = {"slide_id": sid, "logits": lg[i]}
        if task == "survival":
            row["risk"] = float(risk[i])
            row["survival"] = surv[i]
        else:
            row["prob"] = prob[i]  # softmax(logits), unless the student reports its own below
        row.update(per_bag[i])
        rows.append(row)
    return rows
