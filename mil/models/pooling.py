"""Mean- and max-pooling MIL baselines (as in MHIM-MIL's modules/mean_max.py)."""

from __future__ import annotations

import torch
from torch import nn

from extract.runtime import check_int

from ._base import (
    EMBED_ACTIVATIONS,
    MILModel,
    check_choice,
    check_float,
    class_confidence,
    embedding_activation,
    fill_invalid,
    init_weights,
)
from ._registry import ParamCount, register_model
from .output import MILOutput

__all__ = ["MeanPoolMIL", "MaxPoolMIL"]


class _PoolingMIL(MILModel):
    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        embed_dim: int = 512,
        dropout: float = 0.25,
        act: str = "relu",
        task: str = "classification",
    ) -> None:
        super().__init__(in_dim, n_classes, task=task)
        owner = type(self).__name__
        check_choice("act", act, owner, EMBED_ACTIVATIONS)
        self._embed_dim = check_int("embed_dim", embed_dim, owner)
        check_float("dropout", dropout, owner, low=0.0, high=1.0, high_open=True)
        self.feature = nn.Sequential(nn.Linear(in_dim, embed_dim), embedding_activation(act), nn.Dropout(dropout))
        self.classifier = nn.Linear(embed_dim, n_classes)
        init_weights(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(x)

    def _instance_class_prob(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return class_confidence(self.classifier(h))


class MeanPoolMIL(_PoolingMIL):
    """Mean pooling: ``Linear(D,512)+ReLU+Dropout(0.25)``, mean over instances, ``Linear(512,C)``.

    Equal to MHIM-MIL's MeanMIL (mean of per-instance logits; the classifier is linear).
    525,826 parameters at D=1024, C=2.

    Outputs: ``bag_feature`` [B, 512] the (masked) mean embedding; ``instance_scores`` [B, N]
    the max-class instance logit ``max_c (W h_i + b)_c``; ``instance_class_prob``
    ``max_c softmax_c(W h_i + b)`` (each instance's own prediction, with the bias, since the
    bag's logits are the mean of these). ``extras['instance_logits']`` [B, N, C].
    """

    def _aggregate(self, h: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        if mask is None:
            feature = h.mean(dim=1)
        else:
            w = mask.to(h.dtype).unsqueeze(-1)
            feature = (h * w).sum(dim=1) / w.sum(dim=1)
        ins = self.classifier(h)
        return MILOutput(
            logits=self.classifier(feature),
            bag_feature=feature,
            instance_scores=fill_invalid(ins.amax(dim=-1), mask, float("-inf")),
            extras={"instance_logits": ins},
        )


class MaxPoolMIL(_PoolingMIL):
    """Max pooling of instance logits: ``logits_c = max_i (W h_i + b)_c`` (MHIM-MIL's MaxMIL).

    525,826 parameters at D=1024, C=2.

    Outputs: ``bag_feature`` [B, 512] the embedding of the critical instance (the one whose
    logit is the bag's top logit, so ``classifier(bag_feature)`` reproduces that logit);
    ``instance_scores`` [B, N] the max-class instance logit; ``instance_class_prob``
    ``max_c softmax_c(W h_i + b)``. ``extras['instance_logits']`` [B, N, C] and
    ``extras['critical_instance']`` [B].
    """

    def _aggregate(self, h: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        ins = self.classifier(h)  # [B, N, C]
        valid = ins if mask is None else ins.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        logits, argmax = valid.max(dim=1)  # [B, C]
        top_class = logits.argmax(dim=-1)  # [B]
        critical = argmax.gather(1, top_class.unsqueeze(1)).squeeze(1)  # [B]
        feature = h[torch.arange(h.shape[0], device=h.device), critical]
        return MILOutput(
            logits=logits,
            bag_feature=feature,
            instance_scores=fill_invalid(ins.amax(dim=-1), mask, float("-inf")),
            extras={"instance_logits": ins, "critical_instance": critical},
        )


_POOL_COUNT = (ParamCount(525_826, {}, "MHIM-MIL modules/mean_max.py"),)


@register_model(model_cls=MeanPoolMIL, param_counts=_POOL_COUNT)
def meanpool(in_dim: int, n_classes: int, **kwargs) -> MeanPoolMIL:
    """Mean-pooling MIL baseline."""
    return MeanPoolMIL(in_dim, n_classes, **kwargs)


@register_model(model_cls=MaxPoolMIL, param_counts=_POOL_COUNT)
def maxpool(in_dim: int, n_classes: int, **kwargs) -> MaxPoolMIL:
    """Max-pooling MIL baseline (max of instance logits)."""
    return MaxPoolMIL(in_dim, n_classes, **kwargs)
