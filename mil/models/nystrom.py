"""Nystrom self-attention (Xiong et al., AAAI 2021), as TransMIL uses it.

Behaviour matches the ``nystrom-attention`` package that TransMIL and MHIM-MIL import (without
a mask): the sequence is zero-padded IN FRONT to a multiple of the landmark count, landmarks are
means of consecutive groups of queries/keys, the pseudo-inverse is Newton-Schulz iterations, and
a depth-wise convolution over the values is added as a residual. One deliberate difference:
the pseudo-inverse's initial scaling uses the largest row/column sums per bag rather than over
the whole batch, so a bag's output never depends on the other bags of its batch (identical for
batch size 1, the way MHIM trains).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NystromAttention", "newton_schulz_pinv", "exact_query_attention"]


def newton_schulz_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Iterative Moore-Penrose pseudo-inverse of ``x`` [B, H, m, m] (Razavi et al. 2014).

    ``z_0 = x^T / (max_i sum_j |x_ij| * max_j sum_i |x_ij|)`` with the maxima taken per bag
    (over heads too), then ``z <- z (13 I - x z (15 I - x z (7 I - x z))) / 4``.
    """
    abs_x = x.abs()
    col = abs_x.sum(dim=-1).flatten(1).amax(dim=1)  # [B]
    row = abs_x.sum(dim=-2).flatten(1).amax(dim=1)
    z = x.transpose(-1, -2) / (col * row).view(-1, *([1] * (x.dim() - 1)))
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nystrom attention ``[B, n, dim] -> [B, n, dim]``.

    Parameters
    ----------
    dim : int
        Token size.
    heads, dim_head : int
        Number of heads and size per head (inner size ``heads * dim_head``).
    num_landmarks : int
        ``m``; sequences are zero-padded in front to a multiple of ``m``.
    pinv_iterations : int
        Newton-Schulz iterations for the pseudo-inverse.
    residual_kernel : int or None
        Kernel (along the sequence) of the depth-wise value convolution added as a residual;
        None disables it.
    dropout : float
        Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int | None = 33,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = None
        if residual_kernel:
            self.res_conv = nn.Conv2d(
                heads,
                heads,
                (residual_kernel, 1),
                padding=(residual_kernel // 2, 0),
                groups=heads,
                bias=False,
            )

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, n, heads * d] -> [B, heads, n, d]``."""
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head ``q`` (scaled by ``dim_head ** -0.5``), ``k``, ``v``, each [B, heads, n, d]."""
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return self.split_heads(q) * self.scale, self.split_heads(k), self.split_heads(v)

    def forward(
        self, x: torch.Tensor, return_qkv: bool = False, return_first_row: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Attend over ``x`` [B, n, dim].

        With ``return_qkv`` also returns ``(q, k, v)`` of the n real tokens (no padding),
        each [B, heads, n, d], ``q`` scaled; TransMIL uses them for its class-token scores.
        With ``return_first_row`` also returns the Nystrom approximation of the attention row
        of the FIRST real token (TransMIL's class token) over the other real tokens,
        ``(kernel1[first] @ pinv(kernel2)) @ kernel3`` restricted to columns 2..n: [B, heads,
        n - 1], not renormalised. This is the row the official MHIM-MIL code masks by (its
        ``attn1[:, :, -n]`` indexes that token in the front-padded sequence).
        """
        b, n, _ = x.shape
        m = self.num_landmarks
        pad = (-n) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))  # in front, as the reference implementation
        q, k, v = self.qkv(x)
        total = n + pad
        group = total // m
        q_land = q.reshape(b, self.heads, m, group, self.dim_head).mean(dim=3)
        k_land = k.reshape(b, self.heads, m, group, self.dim_head).mean(dim=3)

        kernel1 = (q @ k_land.transpose(-1, -2)).softmax(dim=-1)  # [B, h, total, m]
        kernel2 = (q_land @ k_land.transpose(-1, -2)).softmax(dim=-1)  # [B, h, m, m]
        kernel3 = (q_land @ k.transpose(-1, -2)).softmax(dim=-1)  # [B, h, m, total]
        pinv = newton_schulz_pinv(kernel2, self.pinv_iterations)
        out = (kernel1 @ pinv) @ (kernel3 @ v)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, total, self.heads * self.dim_head)
        out = self.to_out(out)[:, -n:]
        if return_first_row:
            row = (kernel1[:, :, pad : pad + 1] @ pinv) @ kernel3  # [B, h, 1, total]
            return out, row[:, :, 0, pad + 1 :]
        if return_qkv:
            return out, (q[:, :, -n:], k[:, :, -n:], v[:, :, -n:])
        return out


def exact_query_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T)`` over the keys for pre-scaled ``q`` [B, h, 1, d] and ``k`` [B, h, n, d].

    Returns [B, h, n]. This is the attention row Nystrom approximates, computed exactly
    (``O(n d)`` per head for one query, so cheaper than the approximation's row).
    """
    return (q @ k.transpose(-1, -2)).squeeze(-2).softmax(dim=-1)

