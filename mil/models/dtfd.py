"""DTFD-MIL: double-tier feature distillation (Zhang et al., CVPR 2022), AFS variant."""

from __future__ import annotations

import torch
from torch import nn

from extract.runtime import check_int

from ._base import (
    EMBED_ACTIVATIONS,
    MILModel,
    bag_classification_loss,
    check_choice,
    check_float,
    class_confidence,
    embedding_activation,
    init_weights,
)
from ._layers import AttentionScorer
from ._registry import ParamCount, register_model
from .output import MILOutput

__all__ = ["DTFD"]

#: Seed of the fixed pseudo-bag split used in eval mode (predictions must not change between
#: two evaluations of the same bag; the reference shuffles at test time too).
_EVAL_SPLIT_SEED = 0


class DTFD(MILModel):
    """DTFD-MIL with attention-based feature distillation (AFS).

    ``embed``: ``Linear(D, 512, bias=False) + ReLU + Dropout(0.25)``. The bag's instances are
    split at random into ``n_groups`` (5) pseudo-bags (a fixed split in eval mode). Tier 1: a
    gated attention (``tanh/sigmoid 512 -> 128 -> 1``, biases) pools each pseudo-bag, and
    ``tier1_classifier`` (Dropout(0.25) + ``Linear(512, C)``) predicts it. Tier 2: the pooled
    pseudo-bag vectors (AFS distillation) are pooled by a second gated attention and
    ``classifier`` (Dropout(0.25) + ``Linear(512, C)``) gives the bag logits. 789,254
    parameters at D=1024, C=2.

    Loss (explicit): DTFD trains tier 1 on every pseudo-bag with the bag's label and tier 2 on
    the bag; its two optimizers step on the sum of both losses' gradients, so one optimizer on
    ``bag_loss + tier1_loss`` is the same objective. :meth:`auxiliary_loss` returns the tier-1
    loss (mean CE over pseudo-bags); ``bag_loss_weight`` is 1.

    Outputs
    -------
    - ``bag_feature`` [B, 512]: the tier-2 pooled vector.
    - ``instance_scores`` [B, N]: tier-1 attention logits (no softmax).
    - ``instance_class_prob``: ``max_c softmax_c(W1 (a_i h_i))`` with ``a_i`` the tier-1
      attention softmaxed over the whole bag (not per pseudo-bag, whose split is random) and
      ``W1`` the tier-1 classifier weight without bias (DTFD's own instance CAM).
    - ``extras``: ``pseudo_bag_logits`` [B, G, C], ``group_of_instance`` [N] (pseudo-bag index
      of each instance), ``tier2_attention`` [B, G].

    Padded batches are not supported; unpadded batches share one pseudo-bag split.
    """

    supports_padding = False

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        embed_dim: int = 512,
        attn_dim: int = 128,
        n_groups: int = 5,
        dropout: float = 0.25,
        act: str = "relu",
        task: str = "classification",
    ) -> None:
        super().__init__(in_dim, n_classes, task=task)
        owner = type(self).__name__
        check_choice("act", act, owner, EMBED_ACTIVATIONS)
        self._embed_dim = check_int("embed_dim", embed_dim, owner)
        check_int("attn_dim", attn_dim, owner)
        self.n_groups = check_int("n_groups", n_groups, owner)
        check_float("dropout", dropout, owner, low=0.0, high=1.0, high_open=True)

        self.feature = nn.Sequential(
            nn.Linear(in_dim, embed_dim, bias=False), embedding_activation(act), nn.Dropout(dropout)
        )
        self.tier1_attention = AttentionScorer(embed_dim, attn_dim, 1, gated=True, act="tanh")
        self.tier1_dropout = nn.Dropout(dropout)
        self.tier1_classifier = nn.Linear(embed_dim, n_classes)
        self.tier2_attention = AttentionScorer(embed_dim, attn_dim, 1, gated=True, act="tanh")
        self.tier2_dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed_dim, n_classes)
        init_weights(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(x)

    def _groups(self, n: int, device: torch.device) -> torch.Tensor:
        """Pseudo-bag index [N] of each instance: a random split into near-equal groups."""
        g = min(self.n_groups, n)
        if self.training:
            perm = torch.randperm(n)
        else:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_EVAL_SPLIT_SEED))
        # sizes as numpy.array_split: the first n % g groups get one more instance
        sizes = torch.full((g,), n // g, dtype=torch.long)
        sizes[: n % g] += 1
        group = torch.empty(n, dtype=torch.long)
        group[perm] = torch.repeat_interleave(torch.arange(g), sizes)
        return group.to(device)

    def _aggregate(self, h: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        b, n, _ = h.shape
        a_logits = self.tier1_attention(h).squeeze(-1)  # [B, N]
        group = self._groups(n, h.device)
        g = int(group.max()) + 1
        member = group.unsqueeze(0) == torch.arange(g, device=h.device).unsqueeze(1)  # [G, N]
        a = a_logits.unsqueeze(1).masked_fill(~member, float("-inf")).softmax(dim=-1)  # [B,G,N]
        pseudo = a @ h  # [B, G, E]: AFS, the attention-pooled pseudo-bag vectors
        pseudo_logits = self.tier1_classifier(self.tier1_dropout(pseudo))  # [B, G, C]
        a2 = self.tier2_attention(pseudo).squeeze(-1).softmax(dim=-1)  # [B, G]
        feature = (a2.unsqueeze(1) @ pseudo).squeeze(1)  # [B, E]
        return MILOutput(
            logits=self.classifier(self.tier2_dropout(feature)),
            bag_feature=feature,
            instance_scores=a_logits,
            extras={
                "pseudo_bag_logits": pseudo_logits,
                "group_of_instance": group,
                "tier2_attention": a2,
            },
        )

    def _instance_class_prob(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = self.tier1_attention(h).squeeze(-1).softmax(dim=-1)
        contrib = (a.unsqueeze(-1) * h) @ self.tier1_classifier.weight.t()
        return class_confidence(contrib)

    def auxiliary_loss(self, output: MILOutput, target: torch.Tensor) -> torch.Tensor:
        """Tier-1 loss: mean over pseudo-bags of CE(pseudo-bag logits, bag label)."""
        sub = output.extras["pseudo_bag_logits"]  # [B, G, C]
        b, g, c = sub.shape
        return bag_classification_loss(
            sub.reshape(b * g, c), target.reshape(-1).repeat_interleave(g)
        )


@register_model(
    model_cls=DTFD,
    param_counts=(ParamCount(789_254, {}, "official MHIM-MIL modules/dtfd.py (AFS)"),),
)
def dtfd(in_dim: int, n_classes: int, **kwargs) -> DTFD:
    """DTFD-MIL (double-tier feature distillation, AFS)."""
    return DTFD(in_dim, n_classes, **kwargs)
