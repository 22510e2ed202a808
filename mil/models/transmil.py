"""TransMIL (Shao et al., NeurIPS 2021) as MHIM-MIL uses it, with MHIM's class-token scores."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from extract.errors import ConfigError

from extract.runtime import check_int

from ._base import (
    EMBED_ACTIVATIONS,
    MILModel,
    check_choice,
    check_float,
    class_confidence,
    embedding_activation,
    init_weights,
)
from ._registry import ParamCount, register_model
from .nystrom import NystromAttention, exact_query_attention
from .output import MILOutput

__all__ = ["TransMIL", "PPEG", "TransLayer", "borda_fusion", "fuse_heads_by_vote"]


class TransLayer(nn.Module):
    """Pre-norm Nystrom attention with a residual: ``x + attn(LayerNorm(x))``."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int | None = None,
        num_landmarks: int,
        pinv_iterations: int,
        residual_kernel: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim,
            heads=heads,
            dim_head=dim // heads if dim_head is None else dim_head,
            num_landmarks=num_landmarks,
            pinv_iterations=pinv_iterations,
            residual_kernel=residual_kernel,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor, return_qkv: bool = False, return_first_row: bool = False):
        if return_qkv or return_first_row:
            out, extra = self.attn(self.norm(x), return_qkv=return_qkv, return_first_row=return_first_row)
            return x + out, extra
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding: depth-wise 7/5/3 convolutions on the tokens folded to a square.

    The class token (position 0) passes through unchanged; the ``side * side`` instance tokens
    are reshaped row-major to ``[B, dim, side, side]``, zero-padded by each convolution.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls_token, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(b, c, side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


def borda_fusion(head_scores: torch.Tensor) -> torch.Tensor:
    """Fuse per-head scores [B, heads, N] into one score [B, N] by rank voting (Borda count).

    Each head ranks the instances; an instance's score is its rank averaged over heads, scaled
    to [0, 1] (1 = top of every head). It is the threshold-free form of MHIM's voting: an
    instance in the top (or bottom) of most heads lands at the top (or bottom) of the fused
    ranking, for every mask ratio at once. Use :func:`fuse_heads_by_vote` for the official
    vote at one ``k``.
    """
    n = head_scores.shape[-1]
    ranks = head_scores.argsort(dim=-1).argsort(dim=-1).to(head_scores.dtype)
    return ranks.mean(dim=1) / max(n - 1, 1)


def fuse_heads_by_vote(head_scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """MHIM-MIL's head voting: indices [B, k] of the instances chosen by the most heads.

    Every head votes for its own top-``k`` (``largest=False``: bottom-``k``) instances; the
    ``k`` instances with the most votes are returned. Ties are broken by :func:`borda_fusion`
    (the official code breaks them arbitrarily).
    """
    b, h, n = head_scores.shape
    k = max(0, min(int(k), n))
    idx = head_scores.topk(k, dim=-1, largest=largest).indices  # [B, h, k]
    votes = torch.zeros(b, h, n, device=head_scores.device, dtype=head_scores.dtype)
    votes.scatter_(-1, idx, 1.0)
    tie_break = borda_fusion(head_scores if largest else -head_scores)
    fused = votes.sum(dim=1) + tie_break / (h + 1)  # tie_break < 1 never outweighs a vote
    return fused.topk(k, dim=-1).indices


class TransMIL(MILModel):
    """TransMIL: Nystrom transformer over instances with a class token and PPEG.

    ``embed``: ``Linear(D, 512) + ReLU`` (+ Dropout when ``dropout > 0``). ``aggregate``: the
    instance tokens are extended to a square count ``side**2`` by repeating the first ones,
    a class token is prepended, then TransLayer -> PPEG -> TransLayer (8 heads x 64, 256
    landmarks, 6 pseudo-inverse iterations, value-conv kernel 33, dropout 0.1), a final
    LayerNorm, and ``Linear(512, C)`` on the class token: 2,672,146 parameters at D=1024, C=2.

    Outputs
    -------
    - ``bag_feature`` [B, 512]: the class token after the final LayerNorm.
    - ``extras['head_attention']`` [B, heads, N]: the class token's attention over the N real
      instances in layer 1, per head: ``softmax_i(q_cls . k_i / sqrt(64))`` computed EXACTLY
      from layer 1's queries and keys (the row Nystrom approximates; the square-padding
      repeats and the class token itself are left out of the softmax). The official MHIM
      code reads the class token's row of the Nystrom approximation instead; that is what
      ``transmil_mhim`` (:mod:`mil.models.transmil_mhim`) does.
    - ``instance_scores`` [B, N]: ``head_attention`` fused over heads by rank voting
      (:func:`borda_fusion`); :func:`fuse_heads_by_vote` gives MHIM's vote at a given k.
    - ``instance_class_prob``: MHIM-v2's transformer score: per head ``a_hi * v_hi`` (layer-1
      class-token attention times values), heads concatenated, layer 1's output projection
      (``to_out`` linear with bias, no dropout), then the classifier weight ``W`` (no bias),
      softmax over classes, max. This skips PPEG, layer 2 and the final LayerNorm, as
      MHIM-v2 does; it is a per-instance reading of layer 1, not an exact decomposition.

    ``dim_head`` (default ``embed_dim // heads``) sets the per-head size on its own: the official
    code fixes it at ``embed_dim // 8`` = 64 whatever the head count (its TCGA TransMIL run used
    2 heads x 64).

    Padded batches are not supported (the square folding and Nystrom landmarks would mix
    padding into real tokens); unpadded batches of equal-length bags work.
    """

    supports_padding = False

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        embed_dim: int = 512,
        heads: int = 8,
        dim_head: int | None = None,
        num_landmarks: int | None = None,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        attn_dropout: float = 0.1,
        dropout: float = 0.0,
        act: str = "relu",
        task: str = "classification",
    ) -> None:
        super().__init__(in_dim, n_classes, task=task)
        owner = type(self).__name__
        check_choice("act", act, owner, EMBED_ACTIVATIONS)
        self._embed_dim = check_int("embed_dim", embed_dim, owner)
        check_int("heads", heads, owner)
        if embed_dim % heads:
            raise ConfigError(
                f"The 'embed_dim' parameter of {owner} ({embed_dim}) must be divisible by "
                f"'heads' ({heads})."
            )
        num_landmarks = embed_dim // 2 if num_landmarks is None else num_landmarks
        check_int("num_landmarks", num_landmarks, owner)
        check_int("pinv_iterations", pinv_iterations, owner)
        check_int("residual_kernel", residual_kernel, owner)
        check_float("attn_dropout", attn_dropout, owner, low=0.0, high=1.0, high_open=True)
        check_float("dropout", dropout, owner, low=0.0, high=1.0, high_open=True)

        feature: list[nn.Module] = [nn.Linear(in_dim, embed_dim), embedding_activation(act)]
        if dropout:
            feature.append(nn.Dropout(dropout))
        self.feature = nn.Sequential(*feature)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if dim_head is not None:
            check_int("dim_head", dim_head, owner)
        layer_kw = dict(
            heads=heads,
            dim_head=dim_head,
            num_landmarks=num_landmarks,
            pinv_iterations=pinv_iterations,
            residual_kernel=residual_kernel,
            dropout=attn_dropout,
        )
        self.layer1 = TransLayer(embed_dim, **layer_kw)
        self.ppeg = PPEG(embed_dim)
        self.layer2 = TransLayer(embed_dim, **layer_kw)
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, n_classes)
        init_weights(self)
        nn.init.normal_(self.cls_token, std=1e-6)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(x)

    def _tokens(self, h: torch.Tensor) -> tuple[torch.Tensor, int]:
        """[cls, h_1..h_N, repeats of h_1.. up to a square count] and the square's side."""
        b, n, _ = h.shape
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            fill = torch.arange(extra, device=h.device) % n
            h = torch.cat([h, h[:, fill]], dim=1)
        return torch.cat([self.cls_token.expand(b, -1, -1).to(h.dtype), h], dim=1), side

    def _aggregate(self, h: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        n = h.shape[1]
        x, side = self._tokens(h)
        x, (q, k, _) = self.layer1(x, return_qkv=True)
        x = self.ppeg(x, side)
        x = self.layer2(x)
        feature = self.norm(x)[:, 0]
        head_attention = exact_query_attention(q[:, :, :1], k[:, :, 1 : n + 1])
        return MILOutput(
            logits=self.classifier(feature),
            bag_feature=feature,
            instance_scores=borda_fusion(head_attention),
            extras={"head_attention": head_attention},
        )

    def _instance_class_prob(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = h.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(h.dtype), h], dim=1)
        attn = self.layer1.attn
        q, k, v = attn.qkv(self.layer1.norm(x))
        a = exact_query_attention(q[:, :, :1], k[:, :, 1:])  # [B, heads, N]
        weighted = (a.unsqueeze(-1) * v[:, :, 1:]).transpose(1, 2).reshape(b, n, -1)
        projected = F.linear(weighted, attn.to_out[0].weight, attn.to_out[0].bias)
        return class_confidence(projected @ self.classifier.weight.t())


@register_model(
    model_cls=TransMIL,
    param_counts=(ParamCount(2_672_146, {}, "MHIM-MIL paper (2.67M) and official modules"),),
)
def transmil(in_dim: int, n_classes: int, **kwargs) -> TransMIL:
    """TransMIL (Nystrom attention, class token, PPEG)."""
    return TransMIL(in_dim, n_classes, **kwargs)
