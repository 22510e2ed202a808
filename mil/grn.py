"""Global Recycle Network (GRN) of MHIM-v2.

MHIM-v2 masks a large random share of each training bag. Instead of throwing those instances
away, the GRN "recycles" them: ``k`` global query tokens cross-attend to the randomly masked
instance embeddings and the ``k`` output tokens are appended to the kept instances before the
student aggregates the bag. The query tokens are not trained by gradient; after each training
forward they are moved towards the tokens they produced by an exponential moving average, so
they become a memory of what the masked parts of past bags looked like. There is no
reconstruction loss. The GRN is used in training only (optionally at test time, where it reads
the whole bag), never by the teacher.

Parameters at ``dim=512`` (8 heads x 64): shared LayerNorm 1,024 + key/value projection
524,288 + query projection 262,144 + output projection 262,656 = **1,050,112** trainable
parameters (REFERENCE: "~1.05M train-time params"); the ``k x dim`` query buffer is not a
parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from extract.errors import ConfigError
from extract.runtime import check_int

__all__ = ["GlobalRecycleNetwork"]


def _check_unit(name: str, value: object, *, closed_high: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and 0.0 <= value and (value <= 1.0 if closed_high else value < 1.0)
    if not ok:
        interval = "[0, 1]" if closed_high else "[0, 1)"
        raise ConfigError(
            f"The '{name}' parameter of GlobalRecycleNetwork must be a float in {interval}. "
            f"Got {value!r} instead."
        )


class GlobalRecycleNetwork(nn.Module):
    """Cross-attention from ``k`` EMA-updated global query tokens to masked instances.

    Parameters
    ----------
    dim : int
        Instance embedding size ``H`` (the student's ``embed`` output width).
    n_tokens : int
        Number of global query tokens ``k`` (= number of output tokens); REFERENCE grid 1/5/10.
    heads, dim_head : int
        Multi-head cross-attention shape (8 x 64 in MHIM-v2).
    dropout : float
        Dropout on the attention weights and after the output projection.
    momentum : float
        EMA momentum of the query tokens: ``q = m * q + (1 - m) * mean_batch(tokens)``.
        ``1.0`` freezes the queries.

    Notes
    -----
    * ``queries`` is a registered buffer ``[1, k, dim]`` (saved in ``state_dict``, moved with
      ``.to()``, never returned by ``parameters()``), initialised uniformly in ``+-sqrt(6 /
      (3 * 16 * 16 + dim))`` as in the official code (the VPT prompt initialisation).
    * One LayerNorm is shared by the queries and the keys/values.
    * Zero masked instances (``M == 0``): there is nothing to attend to, so the current query
      tokens themselves are returned (expanded to ``[B, k, dim]``, no gradient) and no EMA
      update happens. This keeps the student's sequence length at ``kept + k`` in every step.
    """

    def __init__(
        self,
        dim: int = 512,
        n_tokens: int = 1,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.1,
        momentum: float = 0.9999,
    ) -> None:
        super().__init__()
        check_int("dim", dim, "GlobalRecycleNetwork")
        check_int("n_tokens", n_tokens, "GlobalRecycleNetwork")
        check_int("heads", heads, "GlobalRecycleNetwork")
        check_int("dim_head", dim_head, "GlobalRecycleNetwork")
        _check_unit("dropout", dropout, closed_high=False)
        _check_unit("momentum", momentum, closed_high=True)
        self.dim = dim
        self.n_tokens = n_tokens
        self.heads = heads
        self.dim_head = dim_head
        self.momentum = float(momentum)
        inner = heads * dim_head
        self.scale = dim_head**-0.5

        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

        # Xavier-normal weights, zero biases: the official v2 MHIM applies its initialize_weights to
        # every Linear, the GRN's included
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        bound = math.sqrt(6.0 / float(3 * 16 * 16 + dim))
        self.register_buffer("queries", torch.empty(1, n_tokens, dim).uniform_(-bound, bound))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, L, heads*dim_head] -> [B, heads, L, dim_head]``."""
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, update: bool | None = None) -> torch.Tensor:
        """Recycle masked instances into ``k`` tokens.

        Parameters
        ----------
        x : Tensor
            Masked instance embeddings ``[B, M, dim]`` (``[M, dim]`` is one bag); ``M`` may be 0.
        update : bool, optional
            Whether to EMA-update the query buffer after this forward; defaults to
            ``self.training``. Pass ``False`` for a training-mode forward that must not move
            the memory (e.g. the GRN at test time).

        Returns
        -------
        Tensor
            ``[B, k, dim]`` tokens.
        """
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"GlobalRecycleNetwork expects masked embeddings of shape [B, M, {self.dim}]; "
                f"got {tuple(x.shape)}."
            )
        b, m, _ = x.shape
        if m == 0:
            return self.queries.detach().expand(b, -1, -1).to(dtype=x.dtype).clone()

        # a copy: the EMA below updates the buffer in place, and autograd saved this input
        queries = self.queries.clone().to(x.dtype)
        q = self._split(self.to_q(self.norm(queries)))  # [1, h, k, dh], broadcast over B
        k, v = self.to_kv(self.norm(x)).chunk(2, dim=-1)
        k, v = self._split(k), self._split(v)  # [B, h, M, dh]
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        out = torch.matmul(self.attn_drop(attn), v)  # [B, h, k, dh]
        out = out.transpose(1, 2).reshape(b, self.n_tokens, self.heads * self.dim_head)
        tokens = self.to_out(out)  # [B, k, dim]

        if self.training if update is None else update:
            self.update_queries(tokens)
        return tokens

    @torch.no_grad()
    def update_queries(self, tokens: torch.Tensor) -> None:
        """EMA step ``q = m * q + (1 - m) * mean_over_batch(tokens)`` (no gradient)."""
        new = tokens.detach().mean(dim=0, keepdim=True).to(self.queries.dtype)
        self.queries.mul_(self.momentum).add_(new, alpha=1.0 - self.momentum)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_tokens={self.n_tokens}, heads={self.heads}, "
            f"dim_head={self.dim_head}, momentum={self.momentum}"
        )
