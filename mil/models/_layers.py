"""Attention scorers shared by AB-MIL, CLAM and DTFD (Ilse et al. 2018)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AttentionScorer", "make_activation"]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def make_activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


class AttentionScorer(nn.Module):
    """Per-instance attention logits ``[..., N, D] -> [..., N, K]`` (no softmax).

    Non-gated: ``Linear(D, A) -> act -> Linear(A, K)``.
    Gated: ``(act(Linear(D, A)) * sigmoid(Linear(D, A))) -> Linear(A, K)``.

    Parameters
    ----------
    dim, hidden, n_out : int
        ``D``, ``A`` and ``K`` (one attention branch per output).
    gated : bool
        Gated attention (Ilse et al.'s "gated attention").
    bias : bool
        Biases in all three layers.
    act : {'tanh', 'relu', 'gelu'}
        Activation of the first (non-sigmoid) branch.
    dropout : float
        Dropout after each branch's activation (CLAM uses 0.25).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_out: int = 1,
        *,
        gated: bool = True,
        bias: bool = True,
        act: str = "tanh",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        branch_a: list[nn.Module] = [nn.Linear(dim, hidden, bias=bias), make_activation(act)]
        if dropout:
            branch_a.append(nn.Dropout(dropout))
        self.branch_a = nn.Sequential(*branch_a)
        self.gated = gated
        if gated:
            branch_b: list[nn.Module] = [nn.Linear(dim, hidden, bias=bias), nn.Sigmoid()]
            if dropout:
                branch_b.append(nn.Dropout(dropout))
            self.branch_b = nn.Sequential(*branch_b)
        self.out = nn.Linear(hidden, n_out, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.branch_a(h)
        if self.gated:
            a = a * self.branch_b(h)
        return self.out(a)
