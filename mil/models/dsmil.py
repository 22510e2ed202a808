"""DSMIL: dual-stream MIL (Li et al., CVPR 2021) as MHIM-MIL uses it."""

from __future__ import annotations

import math

import torch
from torch import nn

from extract.runtime import check_int

from ._base import (
    EMBED_ACTIVATIONS,
    MILModel,
    bag_classification_loss,
    check_choice,
    check_float,
    embedding_activation,
    fill_invalid,
    init_weights,
    masked_softmax,
)
from ._registry import ParamCount, register_model
from .output import MILOutput

__all__ = ["DSMIL"]


class DSMIL(MILModel):
    """Dual-stream MIL: a max-instance stream and a bag stream attending from critical instances.

    ``embed``: ``Linear(D, 512) + ReLU + Dropout(0.25)``. Instance stream: ``Linear(512, C)``
    per instance, max over instances. Bag stream: for each class the critical instance (the
    highest instance logit of that class) queries all instances with
    ``q = Linear(512,128)-ReLU-Linear(128,128)-Tanh``, ``softmax_i(q_i . q_crit / sqrt(128))``
    pools ``v = Linear(512,512)-ReLU``, giving one 512-vector per class; DSMIL's
    ``Conv1d(C, C, kernel_size=512)`` on those C vectors is exactly ``Linear(C*512, C)`` on
    their concatenation, which is ``classifier`` here (same parameters, 872,708 in all at
    D=1024, C=2).

    Prediction and loss, two variants (``prediction``), both read from the official code:

    - ``'v1'`` (default; MHIM-MIL v1 main.py): ``logits`` are the BAG-STREAM logits; training
      ``loss = 0.5 * CE(bag) + 0.5 * CE(max instance)`` (``bag_loss_weight`` 0.5 and
      :meth:`auxiliary_loss`); validation and test report
      ``0.5 * softmax(bag) + 0.5 * softmax(max instance)`` (:meth:`class_probabilities`).
    - ``'v2'`` (MHIM-v2 engines/common_mil.py): ``logits = 0.5 * (bag + max instance)``,
      trained with the plain task loss and evaluated by their softmax.

    ``extras['bag_logits']`` and ``extras['max_instance_logits']`` [B, C] hold both streams.
    MHIM's consistency loss compares the per-class bag vectors one class at a time (softmax over
    each 512-d vector, averaged over classes), as the official code does
    (``consistency_per_class``).

    Outputs
    -------
    - ``bag_feature`` [B, C*512]: the per-class bag vectors, concatenated.
    - ``instance_scores`` [B, N]: the max-class instance logit ``max_c (W_ins h_i)_c``.
    - ``instance_class_prob``: MHIM-v2's class-aware score for DSMIL, the max-class instance
      LOGIT ``max_c (W_ins h_i + b_ins)_c`` (official v2 code; not a softmax probability).
    - ``extras``: ``instance_logits`` [B, N, C], ``max_instance_logits`` [B, C],
      ``bag_attention`` [B, N, C] (softmax over instances, one column per class).
    """

    bag_loss_weight = 0.5
    #: MHIM's consistency loss over ``bag_feature`` viewed as [B, C, 512] (one softmax per class).
    consistency_per_class = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        embed_dim: int = 512,
        q_dim: int = 128,
        dropout: float = 0.25,
        dropout_v: float = 0.0,
        prediction: str = "v1",
        act: str = "relu",
        task: str = "classification",
    ) -> None:
        super().__init__(in_dim, n_classes, task=task)
        owner = type(self).__name__
        check_choice("act", act, owner, EMBED_ACTIVATIONS)
        self.prediction = check_choice("prediction", prediction, owner, ("v1", "v2"))
        if prediction == "v2":
            self.bag_loss_weight = 1.0  # the averaged logits carry both streams
        self._embed_dim = check_int("embed_dim", embed_dim, owner)
        check_int("q_dim", q_dim, owner)
        check_float("dropout", dropout, owner, low=0.0, high=1.0, high_open=True)
        check_float("dropout_v", dropout_v, owner, low=0.0, high=1.0, high_open=True)
        self.q_dim = q_dim

        self.feature = nn.Sequential(nn.Linear(in_dim, embed_dim), embedding_activation(act), nn.Dropout(dropout))
        self.instance_classifier = nn.Linear(embed_dim, n_classes)
        self.query = nn.Sequential(
            nn.Linear(embed_dim, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh()
        )
        self.value = nn.Sequential(
            nn.Dropout(dropout_v), nn.Linear(embed_dim, embed_dim), nn.ReLU()
        )
        self.classifier = nn.Linear(n_classes * embed_dim, n_classes)
        init_weights(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(x)

    def _aggregate(self, h: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        b, n, e = h.shape
        ins = self.instance_classifier(h)  # [B, N, C]
        ins_valid = ins if mask is None else ins.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        critical = ins_valid.argmax(dim=1)  # [B, C]
        crit_h = torch.gather(h, 1, critical.unsqueeze(-1).expand(-1, -1, e))  # [B, C, E]
        q = self.query(h)  # [B, N, Q]
        q_crit = self.query(crit_h)  # [B, C, Q]
        scores = q @ q_crit.transpose(1, 2) / math.sqrt(self.q_dim)  # [B, N, C]
        attention = masked_softmax(scores, None if mask is None else mask.unsqueeze(-1), dim=1)
        bag = attention.transpose(1, 2) @ self.value(h)  # [B, C, E]
        feature = bag.flatten(1)
        bag_logits = self.classifier(feature)
        max_logits = ins_valid.amax(dim=1)
        return MILOutput(
            logits=bag_logits if self.prediction == "v1" else 0.5 * (bag_logits + max_logits),
            bag_feature=feature,
            instance_scores=fill_invalid(ins.amax(dim=-1), mask, float("-inf")),
            extras={
                "instance_logits": ins,
                "max_instance_logits": max_logits,
                "bag_logits": bag_logits,
                "bag_attention": attention,
            },
        )

    def _instance_class_prob(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.instance_classifier(h).amax(dim=-1)

    def class_probabilities(self, output: MILOutput) -> torch.Tensor:
        """v1: ``0.5 softmax(bag) + 0.5 softmax(max instance)``; v2: ``softmax(logits)``."""
        if self.prediction == "v2" or self.task != "classification":
            return super().class_probabilities(output)
        return 0.5 * (output.extras["bag_logits"].float().softmax(-1)
                      + output.extras["max_instance_logits"].float().softmax(-1))

    def auxiliary_loss(self, output: MILOutput, target: torch.Tensor) -> torch.Tensor | None:
        """v1: ``0.5 * CE(max_instance_logits, target)`` (BCE for one logit); v2: none."""
        if self.prediction == "v2":
            return None
        return (1.0 - self.bag_loss_weight) * bag_classification_loss(
            output.extras["max_instance_logits"], target
        )


@register_model(
    model_cls=DSMIL,
    param_counts=(ParamCount(872_708, {}, "official MHIM-MIL modules/dsmil.py (MILNet)"),),
)
def dsmil(in_dim: int, n_classes: int, **kwargs) -> DSMIL:
    """DSMIL (dual-stream: max-instance stream + critical-instance bag stream)."""
    return DSMIL(in_dim, n_classes, **kwargs)
