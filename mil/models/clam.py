"""CLAM-SB and CLAM-MB (Lu et al., Nature BME 2021) with their instance-level clustering loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

__all__ = ["CLAM", "CLAMSB", "CLAMMB", "smooth_top1_svm_loss"]


def smooth_top1_svm_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0
) -> torch.Tensor:
    """Smooth top-1 multi-class SVM loss (Berrada et al., ICLR 2018), mean over samples.

    ``tau * logsumexp_j((s_j + alpha * [j != y] - s_y) / tau)`` for scores ``s`` [M, K] and
    labels ``y`` [M]; CLAM's ``SmoothTop1SVM(n_classes=2)`` with its defaults
    (``alpha = tau = 1``). ``logsumexp`` is stable for large scores, so the reference's switch
    to the hard hinge above 1e3 is not needed.
    """
    delta = alpha * (1.0 - F.one_hot(target, logits.shape[-1]).to(logits.dtype))
    shifted = logits + delta - logits.gather(1, target.unsqueeze(1))
    return (tau * torch.logsumexp(shifted / tau, dim=1)).mean()


class CLAM(MILModel):
    """CLAM: gated attention MIL plus instance-level clustering on top/bottom-attended instances.

    ``embed``: ``Linear(D, 512) + ReLU + Dropout(0.25)``. Attention: gated, biases,
    ``tanh(Linear(512,256)) * sigmoid(Linear(512,256)) -> Linear(256, K)`` with Dropout(0.25)
    in both branches; ``K = 1`` (single branch, SB) or ``K = C`` (one branch per class, MB).
    SB: ``classifier = Linear(512, C)`` on the pooled vector. MB: class ``c``'s logit is
    ``W_c . M_c + b_c`` with ``M_c`` pooled by branch ``c`` (CLAM's C separate ``Linear(512, 1)``,
    stored as the rows of one ``Linear(512, C)`` ``classifier``). Instance classifiers: one
    ``Linear(512, 2)`` per class.

    Loss (explicit): CLAM trains ``0.7 * bag_loss + 0.3 * instance_loss``; here
    ``bag_loss_weight = bag_weight`` (0.7) and :meth:`auxiliary_loss` returns
    ``(1 - bag_weight) * instance_loss``. The instance loss, per bag: for the bag's class ``y``,
    the ``k_sample`` (8) most and least attended instances (of ``y``'s branch in MB) are
    pseudo-labelled 1 and 0 for instance classifier ``y``; with ``subtyping=True`` every other
    class's classifier also gets its branch's top ``k_sample`` as 0s and the sum is divided by
    C. Loss function: smooth top-1 SVM (``instance_loss='svm'``, CLAM's default) or
    cross-entropy (``'ce'``). ``k_sample`` is capped at the bag size (CLAM itself fails on bags
    under 8 instances). Bags are averaged over the batch. With ``n_classes=1`` the single
    class counts as present when the target is 1.

    Outputs
    -------
    - ``bag_feature``: SB [B, 512] pooled vector; MB [B, C*512] the per-class pooled vectors.
    - ``instance_scores`` [B, N]: attention logits before softmax (MB: max over branches).
    - ``instance_class_prob``: like AB-MIL, ``max_c softmax_c(W (a_i h_i))`` (MB: class ``c``'s
      logit uses branch ``c``'s attention ``a_ci``), classifier weight without bias.
    - ``extras``: ``attention_logits`` [B, K, N], ``attention`` [B, K, N] (softmax),
      ``instance_embeddings`` [B, N, 512] and ``mask`` (inputs of the instance loss).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        multi_branch: bool = False,
        gated: bool = True,
        embed_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        instance_loss: str = "svm",
        subtyping: bool = False,
        bag_weight: float = 0.7,
        act: str = "relu",
        task: str = "classification",
    ) -> None:
        super().__init__(in_dim, n_classes, task=task)
        owner = type(self).__name__
        check_choice("act", act, owner, EMBED_ACTIVATIONS)
        self.multi_branch = check_bool("multi_branch", multi_branch, owner)
        check_bool("gated", gated, owner)
        self._embed_dim = check_int("embed_dim", embed_dim, owner)
        check_int("attn_dim", attn_dim, owner)
        check_float("dropout", dropout, owner, low=0.0, high=1.0, high_open=True)
        self.k_sample = check_int("k_sample", k_sample, owner)
        self.instance_loss = check_choice("instance_loss", instance_loss, owner, ("svm", "ce"))
        self.subtyping = check_bool("subtyping", subtyping, owner)
        self.bag_loss_weight = check_float("bag_weight", bag_weight, owner, low=0.0, high=1.0)

        self.feature = nn.Sequential(nn.Linear(in_dim, embed_dim), embedding_activation(act), nn.Dropout(dropout))
        n_branches = n_classes if multi_branch else 1
        self.attention = AttentionScorer(
            embed_dim, attn_dim, n_branches, gated=gated, bias=True, act="tanh", dropout=dropout
        )
        self.classifier = nn.Linear(embed_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(embed_dim, 2) for _ in range(n_classes)
        )
        init_weights(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(x)

    def _attention(self, h: torch.Tensor, mask: torch.Tensor | None):
        logits = self.attention(h).transpose(1, 2)  # [B, K, N]
        return logits, masked_softmax(logits, None if mask is None else mask.unsqueeze(1))

    def _aggregate(self, h: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        a_logits, a = self._attention(h, mask)
        pooled = a @ h  # [B, K, E]
        if self.multi_branch:
            logits = (pooled * self.classifier.weight).sum(dim=-1) + self.classifier.bias
            feature = pooled.flatten(1)
        else:
            feature = pooled[:, 0]
            logits = self.classifier(feature)
        return MILOutput(
            logits=logits,
            bag_feature=feature,
            instance_scores=fill_invalid(a_logits.amax(dim=1), mask, float("-inf")),
            extras={
                "attention_logits": a_logits,
                "attention": a,
                "instance_embeddings": h,
                "mask": mask,
            },
        )

    def _instance_class_prob(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        _, a = self._attention(h, mask)  # [B, K, N]
        if self.multi_branch:
            # class c's share of instance i: W_c . (a_ci h_i)
            contrib = (h @ self.classifier.weight.t()) * a.transpose(1, 2)  # [B, N, C]
        else:
            contrib = (a[:, 0].unsqueeze(-1) * h) @ self.classifier.weight.t()
        return class_confidence(contrib)

    # ---------------------------------------------------------------- instance loss

    def _instance_term(
        self, classifier: nn.Linear, h: torch.Tensor, a: torch.Tensor, in_class: bool
    ) -> torch.Tensor:
        k = min(self.k_sample, h.shape[0])
        top = a.topk(k).indices
        if in_class:
            bottom = (-a).topk(k).indices
            chosen = torch.cat([top, bottom])
            labels = torch.cat(
                [torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]
            ).to(h.device)
        else:
            chosen = top
            labels = torch.zeros(k, dtype=torch.long, device=h.device)
        logits = classifier(h[chosen])
        if self.instance_loss == "svm":
            return smooth_top1_svm_loss(logits, labels)
        return F.cross_entropy(logits, labels)

    def auxiliary_loss(self, output: MILOutput, target: torch.Tensor) -> torch.Tensor:
        """``(1 - bag_weight) * instance_loss`` (see the class docstring)."""
        h = output.extras["instance_embeddings"]
        a_logits = output.extras["attention_logits"]
        mask = output.extras["mask"]
        target = target.reshape(-1)
        per_bag = []
        for b in range(h.shape[0]):
            valid = slice(None) if mask is None else mask[b]
            hb = h[b][valid]
            if self.n_classes == 1:
                present = [bool(target[b] > 0.5)]
            else:
                present = [int(target[b]) == c for c in range(self.n_classes)]
            total = h.new_zeros(())
            for c, classifier in enumerate(self.instance_classifiers):
                if not present[c] and not self.subtyping:
                    continue
                branch = c if self.multi_branch else 0
                ab = a_logits[b, branch][valid]
                total = total + self._instance_term(classifier, hb, ab, present[c])
            if self.subtyping:
                total = total / self.n_classes
            per_bag.append(total)
        return (1.0 - self.bag_loss_weight) * torch.stack(per_bag).mean()


class CLAMSB(CLAM):
    """CLAM single-branch: one attention branch shared by all classes."""

    fixed_options = ("multi_branch",)

    def __init__(self, in_dim: int, n_classes: int, **kwargs) -> None:
        super().__init__(in_dim, n_classes, multi_branch=False, **kwargs)


class CLAMMB(CLAM):
    """CLAM multi-branch: one attention branch per class."""

    fixed_options = ("multi_branch",)

    def __init__(self, in_dim: int, n_classes: int, **kwargs) -> None:
        super().__init__(in_dim, n_classes, multi_branch=True, **kwargs)


@register_model(
    model_cls=CLAMSB,
    param_counts=(ParamCount(790_791, {}, "CLAM / MHIM-MIL modules/clam.py, size 'small'"),),
)
def clam_sb(in_dim: int, n_classes: int, **kwargs) -> CLAMSB:
    """CLAM-SB (single attention branch, instance clustering loss)."""
    return CLAMSB(in_dim, n_classes, **kwargs)


@register_model(
    model_cls=CLAMMB,
    param_counts=(ParamCount(791_048, {}, "CLAM / MHIM-MIL modules/clam.py, size 'small'"),),
)
def clam_mb(in_dim: int, n_classes: int, **kwargs) -> CLAMMB:
    """CLAM-MB (one attention branch per class, instance clustering loss)."""
    return CLAMMB(in_dim, n_classes, **kwargs)
