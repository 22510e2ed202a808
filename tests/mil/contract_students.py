"""Small students of the student contract (docs/ARCHITECTURE.md) for the MHIM and GRN tests.

They are not mocks of our models: MHIM takes any module with embed / aggregate /
instance_class_prob / auxiliary_loss, and these two make what MHIM does visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Out:
    logits: torch.Tensor
    bag_feature: torch.Tensor
    instance_scores: torch.Tensor


class TinyABMIL(nn.Module):
    """Small AB-MIL of the student contract (embed / aggregate / instance_class_prob / ...)."""

    def __init__(self, in_dim: int = 12, dim: int = 16, n_classes: int = 2, dropout: float = 0.25):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, 1))
        self.classifier = nn.Linear(dim, n_classes)

    def embed(self, x):
        return self.fc(x if x.dim() == 3 else x.unsqueeze(0))

    def aggregate(self, h, mask=None):
        a = self.attention(h).squeeze(-1)
        z = torch.einsum("bn,bnh->bh", torch.softmax(a, dim=-1), h)
        return Out(self.classifier(z), z, a)

    def instance_class_prob(self, h):
        w = torch.softmax(self.attention(h).squeeze(-1), dim=-1)
        return torch.softmax(self.classifier(w.unsqueeze(-1) * h), dim=-1).amax(-1)

    def auxiliary_loss(self, output, target):
        return None

    def forward(self, x, mask=None):
        return self.aggregate(self.embed(x), mask)


class IdStudent(nn.Module):
    """Student whose embedding is the identity (times a learnable gain of 1).

    Column 0 of an instance carries its identity, column 1 is the attention score it gets and
    column 2 its class probability, so tests can see exactly which instances the student got.
    """

    def __init__(self, dim: int = 8, n_classes: int = 2):
        super().__init__()
        self.embed_dim = dim
        self.gain = nn.Parameter(torch.ones(dim))
        self.proj = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, n_classes)
        self.seen: list[torch.Tensor] = []
        self.aux_targets: list[object] = []

    def embed(self, x):
        return (x if x.dim() == 3 else x.unsqueeze(0)) * self.gain

    def aggregate(self, h, mask=None):
        self.seen.append(h.detach().clone())
        z = self.proj(h.mean(1))
        return Out(self.classifier(z), z, h[..., 1])

    def instance_class_prob(self, h):
        return h[..., 2]

    def auxiliary_loss(self, output, target):
        self.aux_targets.append(target)
        return torch.tensor(0.25)

    def forward(self, x, mask=None):
        return self.aggregate(self.embed(x), mask)


def id_bag(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """[N, dim] bag: col 0 = index, col 1 = attention (a permutation), col 2 = class prob."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, dim, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    x[:, 1] = torch.randperm(n, generator=g).float()
    x[:, 2] = torch.randperm(n, generator=g).float()
    return x


def ce(logits, target):
    return F.cross_entropy(logits, target)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
