"""The one output type every MIL student returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MILOutput"]


@dataclass(frozen=True)
class MILOutput:
    """What a MIL student computes for a batch of ``B`` bags of ``N`` instances.

    Attributes
    ----------
    logits : Tensor [B, C]
        Bag logits, no softmax/sigmoid applied (the trainer picks the loss: softmax CE for
        classification, the discrete-time hazard NLL for survival, ...).
    bag_feature : Tensor [B, H']
        The pooled vector right before the final bag classifier (``model.classifier``); MHIM's
        consistency loss is computed on it. ``H'`` is the embedding size (512 by default) except
        for DSMIL and CLAM-MB, whose bag vector is one ``H``-vector per class, flattened to
        ``C * H``.
    instance_scores : Tensor [B, N]
        The per-instance score MHIM ranks instances by (see each model's docstring); higher
        means more salient. Positions where the mask is False hold ``-inf``.
    extras : dict[str, Any]
        Model-specific tensors (attention maps, instance logits, inputs of the auxiliary loss).
        Keys are documented per model.
    """

    logits: torch.Tensor
    bag_feature: torch.Tensor
    instance_scores: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
