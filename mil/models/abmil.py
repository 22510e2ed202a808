"""AB-MIL: attention-based deep MIL (Ilse et al., ICML 2018) as MHIM-MIL uses it."""

from __future__ import annotations

import torch
from torch import nn

from extract.runtime import check_int

from ._base import (
    EMBED_ACTIVATIONS,
    MILModel,
    check_bool,
    check_choice,
    check_float,
    class_confidence,
    embedding_activation,
    fill_invalid,
    init_weights,
    masked_softmax,
)
from ._layers import AttentionScorer
from ._registry import ParamCount, register_model
from .output import MILOutput

__all__ = ["ABMIL"]


class ABMIL(MILModel):
    """Attention-based MIL: embed, attention, softmax over instances, weighted sum, linear.

    ``embed``: ``Linear(D, 512) + ReLU + Dropout(0.25)``. Attention (no biases by default):
    gated ``act(Linear(512,128)) * sigmoid(Linear(512,128)) -> Linear(128,1)`` (657,026
    parameters at D=1024, C=2, the paper's "657K") or non-gated
    ``Linear(512,128) + act -> Linear(128,1)`` (591,490). Classifier ``Linear(512, C)``.

    The gated branch's activation defaults to ReLU (the MHIM v1 code's ``AttentionGated``
    default), the non-gated one to tanh (Ilse et al. and MHIM's ``DAttention``); set
    ``attn_act`` to choose.

    Outputs
    -------
    - ``bag_feature`` [B, 512]: the attention-pooled embedding ``sum_i a_i h_i``.
    - ``instance_scores`` [B, N]: attention logits before the softmax.
    - ``extras['attention']`` [B, N]: softmax attention ``a_i``.
    - ``instance_class_prob``: ``p_i = max_c softmax_c(W (a_i h_i))`` with ``W`` the
      classifier's weight and no bias: ``W a_i h_i`` is instance ``i``'s additive share of the
      bag logits (the bias belongs to the bag, not to any instance; the official code adds
      ``b[0]`` to every class, which cancels in the softmax, so it computes the same).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        gated: bool = True,
        embed_dim: int = 512,
        attn_dim: int = 128,
        dropout: float = 0.25,
        attn_bias: bool = False,
        attn_act: str | None = None,
        act: str = "relu",
        task: str = "classification",
    ) -> None:
        super().__init__(in_dim, n_classes, task=task)
        owner = type(self).__name__
        check_choice("act", act, owner, EMBED_ACTIVATIONS)
        check_bool("gated", gated, owner)
        self._embed_dim = check_int("embed_dim", embed_dim, owner)
        check_int("attn_dim", attn_dim, owner)
        check_float("dropout", dropout, owner, low=0.0, high=1.0, high_open=True)
        check_bool("attn_bias", attn_bias, owner)
        if attn_act is None:
            attn_act = "relu" if gated else "tanh"
        check_choice("attn_act", attn_act, owner, ("tanh", "relu", "gelu"))
        self.gated = gated

        self.feature = nn.Sequential(nn.Linear(in_dim, embed_dim), embedding_activation(act), nn.Dropout(dropout))
        self.attention = AttentionScorer(
            embed_dim, attn_dim, 1, gated=gated, bias=attn_bias, act=attn_act
        )
        self.classifier = nn.Linear(embed_dim, n_classes)
        init_weights(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(x)

    def _attention(self, h: torch.Tensor, mask: torch.Tensor | None):
        logits = self.attention(h).squeeze(-1)  # [B, N]
        return logits, masked_softmax(logits, mask)

    def _aggregate(self, h: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        a_logits, a = self._attention(h, mask)
        feature = torch.bmm(a.unsqueeze(1), h).squeeze(1)  # [B, H]
        return MILOutput(
            logits=self.classifier(feature),
            bag_feature=feature,
            instance_scores=fill_invalid(a_logits, mask, float("-inf")),
            extras={"attention": a},
        )

    def _instance_class_prob(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        _, a = self._attention(h, mask)
        contrib = (a.unsqueeze(-1) * h) @ self.classifier.weight.t()  # [B, N, C]
        return class_confidence(contrib)


@register_model(
    model_cls=ABMIL,
    param_counts=(
        ParamCount(657_026, {}, "MHIM-MIL paper (657K): gated attention, no attention biases"),
        ParamCount(591_490, {"gated": False}, "REFERENCE.md section 4: non-gated, no biases"),
    ),
)
def abmil(in_dim: int, n_classes: int, **kwargs) -> ABMIL:
    """AB-MIL (gated attention by default; ``gated=False`` for Ilse's plain attention)."""
    return ABMIL(in_dim, n_classes, **kwargs)
