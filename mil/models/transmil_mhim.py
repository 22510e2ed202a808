"""MHIM-MIL's own TransMIL student (official v1 ``SAttention`` inside ``MHIM``), registered as
``transmil_mhim``.

It differs from the standalone TransMIL (:mod:`mil.models.transmil`) in four ways, each read from
the official v1 code (modules/mhim.py, modules/satten.py, modules/emb_position.py,
modules/nystrom_attention.py) and the argument dumps of its run logs:

- ``Dropout(0.25)`` after the instance embedding (``MHIM.dp``, ``--dropout 0.25``);
- no square padding of the sequence before the transformer: the class token and the N instance
  tokens go into layer 1 as they are; PPEG (between the layers, on the instance tokens only)
  folds them into a square by repeating the first ones, zero-pads that square to at least 7 x 7,
  convolves, and strips every added token again;
- the class token starts as ``randn`` (standard normal), not near zero;
- the masking score is the class token's row of layer 1's NYSTROM approximation per head
  (``extras['head_scores']`` [B, heads, N]); MHIM masks by a vote over heads at the current
  ``k`` (:func:`mil.masking.high_mask` / :func:`mil.masking.low_mask` with per-head scores).

Same parameters as the standalone model: 2,672,146 at D=1024, C=2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import ParamCount, register_model
from .output import MILOutput
from .transmil import PPEG, TransMIL, borda_fusion

__all__ = ["TransMILMHIM", "ppeg_unpadded"]

#: PPEG's smallest grid side: below it the official code zero-pads the square to 7 x 7.
MIN_SIDE = 7


def ppeg_unpadded(ppeg: PPEG, tokens: torch.Tensor) -> torch.Tensor:
    """PPEG on instance tokens [B, N, C] of any N, padding internally: -> [B, N, C].

    The tokens are extended to ``side**2`` (``side = ceil(sqrt(N))``) by repeating the first
    ``side**2 - N``, then zero-padded to ``7 x 7`` when ``side < 7``, folded row-major, passed
    through ``x + conv7(x) + conv5(x) + conv3(x)`` and cut back to the N real tokens.
    """
    b, n, c = tokens.shape
    side = math.ceil(math.sqrt(n))
    extra = side * side - n
    x = torch.cat([tokens, tokens[:, :extra]], dim=1) if extra else tokens
    if side < MIN_SIDE:
        x = F.pad(x, (0, 0, 0, MIN_SIDE * MIN_SIDE - side * side))
        side = MIN_SIDE
    grid = x.transpose(1, 2).reshape(b, c, side, side)
    grid = grid + ppeg.proj7(grid) + ppeg.proj5(grid) + ppeg.proj3(grid)
    return grid.flatten(2).transpose(1, 2)[:, :n]


class TransMILMHIM(TransMIL):
    """TransMIL as MHIM-MIL builds its student (module docstring).

    Outputs
    -------
    - ``bag_feature`` [B, 512]: the class token after the final LayerNorm.
    - ``extras['head_scores']`` [B, heads, N]: layer 1's Nystrom class-token row over the N
      instances, per head (what MHIM votes over).
    - ``instance_scores`` [B, N]: ``head_scores`` fused by rank voting (:func:`borda_fusion`),
      for heatmaps and for callers that need one score per instance.
    """

    def __init__(self, in_dim: int, n_classes: int, *, dropout: float = 0.25, **kwargs) -> None:
        super().__init__(in_dim, n_classes, dropout=dropout, **kwargs)
        nn.init.normal_(self.cls_token, std=1.0)  # torch.randn, as the official SAttention

    def _aggregate(self, h: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        b = h.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(h.dtype), h], dim=1)
        x, head_scores = self.layer1(x, return_first_row=True)
        x = torch.cat([x[:, :1], ppeg_unpadded(self.ppeg, x[:, 1:])], dim=1)
        x = self.layer2(x)
        feature = self.norm(x)[:, 0]
        return MILOutput(
            logits=self.classifier(feature),
            bag_feature=feature,
            instance_scores=borda_fusion(head_scores),
            extras={"head_scores": head_scores},
        )


@register_model(
    model_cls=TransMILMHIM,
    param_counts=(ParamCount(2_672_146, {}, "official v1 MHIM(TransMIL): same modules as TransMIL"),),
)
def transmil_mhim(in_dim: int, n_classes: int, **kwargs) -> TransMILMHIM:
    """MHIM-MIL's TransMIL student (Dropout 0.25, no square padding, Nystrom class-token masking)."""
    return TransMILMHIM(in_dim, n_classes, **kwargs)
