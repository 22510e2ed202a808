"""MHIM-MIL: masked hard instance mining with a momentum teacher (ICCV 2023 + MHIM-v2).

One training step on one bag of ``N`` instances:

1. the teacher (a copy of the student, updated only by EMA) scores the FULL bag under
   ``no_grad`` (in train mode, dropout on, as the official code does, unless configured off):
   raw attention (``instance_scores``) or the MHIM-v2 class-aware probability
   (``instance_class_prob``);
2. masks are index sets, unioned: HAM (top ``ceil(N*h)``; R-HAM: a random ``hr`` share of the
   top ``ceil(N*h/hr)``), L-HAM (lowest ``ceil(N*l)``), random (``ceil(N*r)``); ``h`` may decay
   by a per-iteration cosine to 0;
3. the kept instances are gathered (removed, not zeroed; original order kept) from the
   student's embedded bag; with the GRN (v2) only a random ``keep_ratio`` share of them stays
   and the rest is recycled into ``k`` tokens that are appended;
4. loss = ``student.training_loss(out, target, loss_fn(logits, target))`` (the student's bag
   loss weight and auxiliary loss; survival students add none; students without that hook:
   ``loss_fn(...) + student.auxiliary_loss(...)``) +
   ``cl_alpha * consistency(student bag feature, teacher bag feature)``;
5. after ``optimizer.step()``: ``after_optimizer_step`` moves the teacher by EMA.

At inference only the student runs, on the full bag.

Counting rules (all "ceil of a product", see :func:`n_masked`):

* ``n_masked(n, r) = ceil(n * r)`` with the product rounded to 9 decimals first, so floating
  point noise never adds an instance (``100 * 0.07 = 7.000000000000001`` masks 7, where the
  official ``np.ceil`` masks 8); 0 for ``r = 0``; never more than ``n``.
* R-HAM as the official ``select_mask_fn``: ``top = n_masked(N, h / hr)`` candidates, of which a
  uniformly random ``n_masked(top, hr)`` are masked; when ``h / hr > 1`` the candidates are the
  whole bag and ``n_masked(N, h)`` of them are masked.
  E.g. N=1000, h=0.01: HAM 10; hr=0.5: 10 of the top 20; N=101, h=0.01, hr=0.5: 2 of the top 3.
* Union: an instance in several masks is counted once.
* Never empty: if the union covers the whole bag, one instance is kept: the highest-scoring
  instance outside the high-score mask, or, when the high-score mask itself covers the bag,
  the lowest-scoring one (see :func:`fallback_priority`).
* GRN keep: of the ``L`` instances left after the union, ``n_masked(L, 1 - keep_ratio)`` random
  ones go to the GRN (the official ``int(L * keep)`` kept), at least one real instance stays.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from extract.errors import CheckpointError, ConfigError
from mil.grn import GlobalRecycleNetwork
from mil.checkpoints import OFFICIAL_PREFIXES, from_official_layout

__all__ = [
    "MHIM",
    "MHIMConfig",
    "consistency_loss",
    "cosine_decay",
    "ema_update",
    "fallback_priority",
    "high_mask",
    "keep_indices",
    "low_mask",
    "n_masked",
    "random_mask",
    "union",
]


# --------------------------------------------------------------------------------------------
# Pure masking functions (one bag, index based)
# --------------------------------------------------------------------------------------------


def _empty_index(device: torch.device | str | None) -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device=device)


def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``randperm`` drawn on the generator's device (required by torch), returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


def _check_ratio(name: str, value: float, *, high_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and 0.0 <= value and (value < 1.0 if high_open else value <= 1.0)
    if not ok:
        interval = "[0, 1)" if high_open else "[0, 1]"
        raise ValueError(f"'{name}' must be a float in {interval}; got {value!r}.")


def n_masked(n: int, ratio: float) -> int:
    """Number of instances a ratio masks: ``ceil(n * ratio)``, 0 when ``ratio`` is 0.

    The product is rounded to 9 decimals before the ceiling so that floating point noise
    (``100 * 0.07 = 7.000000000000001``) does not mask one instance more; the result is
    clipped to ``[0, n]``.
    """
    if n < 0:
        raise ValueError(f"'n' must be >= 0; got {n}.")
    if not ratio > 0.0:
        return 0
    return min(n, math.ceil(round(n * float(ratio), 9)))


def _check_scores(func: str, scores: torch.Tensor) -> None:
    if scores.dim() not in (1, 2):
        raise ValueError(f"{func} takes the [N] (or per-head [heads, N]) scores of one bag; "
                         f"got {tuple(scores.shape)}.")


def _top(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Indices of the top (or bottom) ``k``: by score for [N], by the head vote for [heads, N]."""
    if scores.dim() == 1:
        return torch.topk(scores, k, largest=largest).indices
    from mil.models.transmil import fuse_heads_by_vote

    return fuse_heads_by_vote(scores.unsqueeze(0), k, largest=largest)[0]


def flat_scores(scores: torch.Tensor) -> torch.Tensor:
    """One score per instance ``[N]``: per-head scores ``[heads, N]`` fused by rank voting."""
    if scores.dim() == 1:
        return scores
    from mil.models.transmil import borda_fusion

    return borda_fusion(scores.unsqueeze(0))[0]


def high_mask(
    scores: torch.Tensor,
    ratio_h: float,
    ratio_hr: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """HAM / R-HAM: indices of the hard (highest-scoring) instances to mask.

    Parameters
    ----------
    scores : Tensor
        ``[N]`` teacher scores of one bag (higher = more salient), or ``[heads, N]`` per-head
        scores: then every choice of ``k`` instances is MHIM's vote over heads at that ``k``
        (each head votes for its own top ``k``; the ``k`` with most votes win, ties broken by
        rank; :func:`mil.models.fuse_heads_by_vote`), as the official code masks TransMIL.
    ratio_h : float
        ``h`` in ``[0, 1)``; 0 masks nothing.
    ratio_hr : float, optional
        R-HAM sub-ratio ``hr`` in ``(0, 1]``; ``None`` or 1.0 is plain HAM (top ``ceil(N*h)``).
        Otherwise the top ``ceil(N*h/hr)`` are candidates and a uniformly random
        ``ceil(top*hr)`` of them are masked (if ``h/hr > 1``: all ``N`` are candidates and
        ``ceil(N*h)`` are masked, as the official code).
    generator : torch.Generator, optional
        Source of randomness for R-HAM.

    Returns
    -------
    LongTensor
        ``[n_high]`` indices (unordered, unique) on ``scores.device``.
    """
    _check_scores("high_mask", scores)
    _check_ratio("ratio_h", ratio_h)
    hr = 1.0 if ratio_hr is None else ratio_hr
    if not (isinstance(hr, (int, float)) and 0.0 < hr <= 1.0):
        raise ValueError(f"'ratio_hr' must be None or a float in (0, 1]; got {ratio_hr!r}.")
    n = scores.shape[-1]
    if ratio_h <= 0.0 or n == 0:
        return _empty_index(scores.device)
    if hr >= 1.0:
        return _top(scores, n_masked(n, ratio_h), largest=True)
    if ratio_h / hr >= 1.0:
        top, count = n, n_masked(n, ratio_h)
    else:
        top = n_masked(n, ratio_h / hr)
        count = n_masked(top, hr)
    candidates = _top(scores, top, largest=True)
    return candidates[_randperm(top, generator, scores.device)[:count]]


def low_mask(scores: torch.Tensor, ratio_l: float) -> torch.Tensor:
    """L-HAM: indices of the lowest ``ceil(N * l)`` instances by score (``[N]`` -> ``[n_low]``).

    Per-head scores ``[heads, N]`` are fused by the vote over each head's bottom ``k``.
    """
    _check_scores("low_mask", scores)
    _check_ratio("ratio_l", ratio_l)
    count = n_masked(scores.shape[-1], ratio_l)
    if count == 0:
        return _empty_index(scores.device)
    return _top(scores, count, largest=False)


def random_mask(
    n: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniformly random ``ceil(n * ratio)`` distinct indices out of ``range(n)``."""
    _check_ratio("ratio", ratio)
    count = n_masked(n, ratio)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if count == 0:
        return _empty_index(device)
    return _randperm(n, generator, device)[:count]


def union(n: int, *masks: torch.Tensor) -> torch.Tensor:
    """Union of index sets over ``range(n)``: sorted, unique LongTensor (overlaps count once)."""
    device = next((m.device for m in masks if m is not None), torch.device("cpu"))
    flags = torch.zeros(n, dtype=torch.bool, device=device)
    for m in masks:  # a loop over the (at most three) masks, not over instances
        if m is not None and m.numel():
            flags[m.to(device=device, dtype=torch.long)] = True
    return flags.nonzero().flatten()


def fallback_priority(scores: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Priority ``[N]`` for the one instance kept when every instance is masked.

    Instances outside the high-score mask rank above every high-masked one, and among them the
    highest score wins; among high-masked instances the lowest score wins (it is the least
    "hard" of the hard ones, so keeping it undoes as little of HAM as possible).
    """
    n = scores.numel()
    rank = torch.empty(n, device=scores.device)
    ranks = torch.arange(n, device=scores.device, dtype=rank.dtype) / max(n, 1)
    rank[torch.argsort(scores)] = ranks
    is_high = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if high.numel():
        is_high[high] = True
    return torch.where(is_high, -1.0 - rank, rank)


def keep_indices(
    n: int, masked: torch.Tensor, priority: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices NOT in ``masked``, ascending (instance order preserved), never empty.

    Parameters
    ----------
    n : int
        Bag size ``N`` (>= 1).
    masked : LongTensor
        Masked indices (any order, duplicates allowed).
    priority : Tensor, optional
        ``[N]``; if every instance is masked, ``argmax(priority)`` is kept (see
        :func:`fallback_priority`); without it instance 0 is kept.
    """
    if n < 1:
        raise ValueError("keep_indices needs a bag with at least one instance; got n=0.")
    device = masked.device
    is_masked = torch.zeros(n, dtype=torch.bool, device=device)
    if masked.numel():
        is_masked[masked] = True
    keep = (~is_masked).nonzero().flatten()
    if keep.numel() == 0:
        if priority is not None:
            keep = priority.argmax().reshape(1).to(device)
        else:
            keep = torch.zeros(1, dtype=torch.long, device=device)
    return keep


# --------------------------------------------------------------------------------------------
# Schedules, consistency loss, EMA
# --------------------------------------------------------------------------------------------


def cosine_decay(start: float, step: int, total_steps: int, end: float = 0.0) -> float:
    """Cosine schedule from ``start`` (step 0) to ``end`` (step ``total_steps`` and later).

    ``end + (start - end) * (1 + cos(pi * step / total_steps)) / 2``, the per-iteration DINO
    scheduler the official code uses for ``h`` (to 0 over the planned epochs) and for the EMA
    momentum (``m`` to 1.0 over all iterations).
    """
    if total_steps < 1:
        raise ValueError(f"'total_steps' must be >= 1; got {total_steps}.")
    if step < 0:
        raise ValueError(f"'step' must be >= 0; got {step}.")
    progress = min(step, total_steps) / total_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def consistency_loss(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    t_teacher: float = 0.1,
    t_student: float = 1.0,
) -> torch.Tensor:
    """Soft-target cross-entropy between bag features (MHIM's consistency loss).

    ``mean_b sum_j -softmax(F_t / t_teacher)_j * log_softmax(F_s / t_student)_j``; the teacher
    side is detached. Both inputs are ``[B, H]`` pooled bag features (not logits), or
    ``[B, G, H]`` groups of them (DSMIL: one per class), each softmaxed on its own and the loss
    averaged over batch and groups.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            "consistency_loss needs student and teacher bag features of the same shape; got "
            f"{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}."
        )
    target = F.softmax(teacher_feat.detach() / t_teacher, dim=-1)
    return torch.sum(-target * F.log_softmax(student_feat / t_student, dim=-1), dim=-1).mean()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t = m * theta_t + (1 - m) * theta_s`` for every parameter; buffers are copied.

    Parameters and buffers are matched by name; both modules must have the same structure.
    """
    _check_ratio("momentum", momentum, high_open=False)
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("ema_update: teacher and student have different parameters.")
    for name, p_t in t_params.items():
        p_t.mul_(momentum).add_(s_params[name].detach(), alpha=1.0 - momentum)
    s_buffers = dict(student.named_buffers())
    for name, b_t in teacher.named_buffers():
        b_t.copy_(s_buffers[name])


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

_CHOICES = {
    "mrh_schedule": ("none", "cosine"),
    "mask_score": ("attention", "class_prob"),
    "momentum_schedule": ("constant", "cosine"),
}


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class MHIMConfig:
    """MHIM-MIL settings (REFERENCE names); validated on construction (raises ``ConfigError``).

    Attributes
    ----------
    mask_ratio : float
        Random masking ratio ``r`` in ``[0, 1)`` (v1).
    mask_ratio_h : float
        High-score (HAM) ratio ``h`` in ``[0, 1)``.
    mask_ratio_hr : float or None
        R-HAM random sub-ratio ``hr`` in ``(0, 1]``; ``None`` = plain HAM.
    mask_ratio_l : float
        Low-score (L-HAM) ratio ``l`` in ``[0, 1)`` (v1).
    mrh_schedule : {'none', 'cosine'}
        ``'cosine'``: ``h`` decays per iteration from ``mask_ratio_h`` to 0 over the planned steps.
    mask_score : {'attention', 'class_prob'}
        What the teacher ranks by: ``instance_scores`` (v1) or ``instance_class_prob`` (v2).
    teacher_momentum : float
        EMA momentum ``m`` in ``[0, 1]``.
    momentum_schedule : {'constant', 'cosine'}
        ``'cosine'``: momentum goes from ``m`` to 1.0 over all iterations.
    cl_alpha : float
        Consistency loss weight (>= 0; 0 skips it).
    t_teacher, t_student : float
        Softmax temperatures of the consistency loss (> 0).
    teacher_train_mode : bool
        Run the teacher in train mode (dropout on) as the official code does.
    grn : bool
        MHIM-v2 random masking + Global Recycle Network.
    keep_ratio : float
        v2: share in ``(0, 1]`` of the instances left after the masks that the student keeps;
        the others go through the GRN.
    grn_tokens : int
        Number ``k`` of GRN tokens (>= 1).
    grn_momentum : float
        EMA momentum of the GRN query tokens in ``[0, 1]``.
    grn_at_test : bool
        Append GRN tokens (computed from the whole bag) at inference too.
    grn_heads, grn_dim_head : int
        GRN cross-attention shape.
    grn_dropout : float
        GRN dropout in ``[0, 1)``.
    """

    mask_ratio: float = 0.0
    mask_ratio_h: float = 0.01
    mask_ratio_hr: float | None = None
    mask_ratio_l: float = 0.0
    mrh_schedule: str = "none"
    mask_score: str = "attention"
    teacher_momentum: float = 0.9999
    momentum_schedule: str = "constant"
    cl_alpha: float = 0.1
    t_teacher: float = 0.1
    t_student: float = 1.0
    teacher_train_mode: bool = True
    grn: bool = False
    keep_ratio: float = 0.9
    grn_tokens: int = 1
    grn_momentum: float = 0.9999
    grn_at_test: bool = False
    grn_heads: int = 8
    grn_dim_head: int = 64
    grn_dropout: float = 0.1

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(
                f"The '{name}' parameter of MHIMConfig must be {expected}. "
                f"Got {getattr(self, name)!r} instead."
            )

        for name in ("mask_ratio", "mask_ratio_h", "mask_ratio_l", "grn_dropout"):
            v = getattr(self, name)
            if not (_is_number(v) and 0.0 <= v < 1.0):
                raise bad(name, "a float in [0, 1)")
        for name in ("teacher_momentum", "grn_momentum"):
            v = getattr(self, name)
            if not (_is_number(v) and 0.0 <= v <= 1.0):
                raise bad(name, "a float in [0, 1]")
        hr = self.mask_ratio_hr
        if hr is not None and not (_is_number(hr) and 0.0 < hr <= 1.0):
            raise bad("mask_ratio_hr", "None or a float in (0, 1]")
        if not (_is_number(self.keep_ratio) and 0.0 < self.keep_ratio <= 1.0):
            raise bad("keep_ratio", "a float in (0, 1]")
        if not (_is_number(self.cl_alpha) and self.cl_alpha >= 0.0):
            raise bad("cl_alpha", "a float >= 0")
        for name in ("t_teacher", "t_student"):
            v = getattr(self, name)
            if not (_is_number(v) and v > 0.0):
                raise bad(name, "a float > 0")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise bad(name, "one of " + ", ".join(repr(c) for c in choices))
        for name in ("teacher_train_mode", "grn", "grn_at_test"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        for name in ("grn_tokens", "grn_heads", "grn_dim_head"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "an int >= 1")
        if self.grn_at_test and not self.grn:
            raise ConfigError(
                "The 'grn_at_test' parameter of MHIMConfig needs 'grn: true' (there is no GRN "
                "to run at test time). Set grn: true or grn_at_test: false."
            )


# --------------------------------------------------------------------------------------------
# The MHIM wrapper
# --------------------------------------------------------------------------------------------


def _unwrap_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Our state dict from ``state_dict`` or ``{'model': state_dict}``, official key names mapped.

    The official MHIM-MIL checkpoints (``patch_to_emb.*``, ``online_encoder.*``, ...) are
    renamed by :func:`mil.checkpoints.from_official_layout`; the load after it stays strict.
    """
    inner = state_dict.get("model") if isinstance(state_dict, Mapping) else None
    if isinstance(inner, Mapping):
        state_dict = inner
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            "Expected a state dict (a mapping of names to tensors); got "
            f"{type(state_dict).__name__}."
        )
    return from_official_layout(state_dict)


def _load_exact(module: nn.Module, state_dict: Mapping[str, Any], what: str) -> None:
    """Strict load with one message naming missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{label}: {', '.join(keys[:8])}{more}")
        hint = ""
        if any(k.startswith(OFFICIAL_PREFIXES) for k in unexpected):
            hint = (" The unexpected keys are official MHIM-MIL names no key map covers for this "
                    "model: the file was saved from another architecture (e.g. gated vs non-gated).")
        if any(k.startswith(("student.", "teacher.")) for k in unexpected):
            hint = " It looks like an MHIM checkpoint: pass the 'student.' part of it."
        raise CheckpointError(
            f"Cannot initialise the {what}: the checkpoint does not match the model "
            f"({'; '.join(parts)}). Use a checkpoint of the same model name, input size and "
            f"number of classes.{hint}"
        )
    module.load_state_dict(state_dict, strict=True)


def _first_linear_in_features(module: nn.Module) -> int | None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    return None


def _probe_input(student: nn.Module) -> torch.Tensor:
    """A ``[1, 2, D]`` bag of ones for probing ``embed`` (D from ``in_dim`` or the first Linear).

    Ones, not random numbers, so that building an MHIM never consumes the global RNG.
    """
    in_dim = getattr(student, "in_dim", None) or _first_linear_in_features(student)
    if not in_dim:
        raise ConfigError(
            "Cannot tell the student's input size (no 'in_dim' attribute and no nn.Linear). "
            "Pass embed_dim= to MHIM."
        )
    p = next(iter(student.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.ones(1, 2, int(in_dim), device=device)


class MHIM(nn.Module):
    """MHIM-MIL training wrapper around a student (see the module docstring for one step).

    Parameters
    ----------
    student : nn.Module
        A model of the student contract (``embed``, ``aggregate``, ``instance_class_prob``,
        ``classifier``, ``auxiliary_loss``), e.g. ``create_model('abmil', 1024, 2)``.
    config : MHIMConfig, optional
        Defaults to ``MHIMConfig()``.
    embed_dim : int, optional
        Width ``H`` of ``student.embed``; only needed for the GRN and only if the student has no
        ``embed_dim`` attribute (otherwise it is found by one probe forward).
    generator : torch.Generator, optional
        Randomness of R-HAM, random masking and the GRN split (dropout uses the global RNG).

    Attributes
    ----------
    student, teacher : nn.Module
        The teacher is a deep copy of the student at construction, ``requires_grad=False``,
        never in :meth:`trainable_parameters`; only :meth:`after_optimizer_step` (EMA) and the
        ``init_*`` methods change it.
    grn : GlobalRecycleNetwork or None
    """

    def __init__(
        self,
        student: nn.Module,
        config: MHIMConfig | None = None,
        *,
        embed_dim: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else MHIMConfig()
        self.student = student
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.generator = generator
        self._teacher_loaded = False
        self.grn: GlobalRecycleNetwork | None = None
        if self.config.grn:
            dim = embed_dim or getattr(student, "embed_dim", None) or self._probe_embed_dim()
            cfg = self.config
            self.grn = GlobalRecycleNetwork(
                dim=int(dim),
                n_tokens=cfg.grn_tokens,
                heads=cfg.grn_heads,
                dim_head=cfg.grn_dim_head,
                dropout=cfg.grn_dropout,
                momentum=cfg.grn_momentum,
            )
            p = next(iter(student.parameters()), None)
            if p is not None:
                self.grn.to(p.device)

    # -- set-up -----------------------------------------------------------------------------

    def _probe_embed_dim(self) -> int:
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                h = self.student.embed(_probe_input(self.student))
        finally:
            self.student.train(was_training)
        return int(h.shape[-1])

    def _embed_parameter_names(self) -> list[str]:
        """Names of the student parameters ``embed`` depends on (the official 'fc' init)."""
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.enable_grad():
                out = self.student.embed(_probe_input(self.student))
                grads = torch.autograd.grad(
                    out.sum(), [p for _, p in named], allow_unused=True
                )
        finally:
            self.student.train(was_training)
        return [n for (n, _), g in zip(named, grads) if g is not None]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: the student's and the GRN's parameters (never the teacher)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.grn is not None:
            params += [p for p in self.grn.parameters() if p.requires_grad]
        return params

    def init_teacher_from(self, state_dict: Mapping[str, Any]) -> None:
        """Load the teacher from a baseline model's state dict (strict; ``CheckpointError``).

        ``{'model': state_dict}`` is accepted too. Without this call the teacher is a copy of
        the initial student (``teacher_init: none``).
        """
        _load_exact(self.teacher, _unwrap_state_dict(state_dict), "teacher")
        self.teacher.requires_grad_(False)
        self._teacher_loaded = True

    def init_student_from(self, state_dict: Mapping[str, Any], mode: str = "none") -> None:
        """Initialise the student from a baseline model's state dict.

        Parameters
        ----------
        state_dict : mapping
            Same architecture's ``state_dict`` (or ``{'model': ...}``).
        mode : {'none', 'fc', 'all'}
            ``'all'``: every tensor (strict). ``'fc'``: as the official ``init_stu_type=fc``, only
            the instance-embedding layer (``patch_to_emb`` there; here: every parameter that
            ``student.embed`` depends on, found by one probe forward), each required to be
            present with the same shape. ``'none'``: nothing.

        Unless the teacher was loaded with :meth:`init_teacher_from`, the teacher is re-copied
        from the initialised student (official order: student init, then teacher = copy).
        """
        if mode not in ("none", "fc", "all"):
            raise ConfigError(
                f"The 'mode' parameter of MHIM.init_student_from must be one of 'none', 'fc', "
                f"'all'. Got {mode!r} instead."
            )
        if mode == "none":
            return
        sd = _unwrap_state_dict(state_dict)
        if mode == "all":
            _load_exact(self.student, sd, "student")
        else:
            names = self._embed_parameter_names()
            params = dict(self.student.named_parameters())
            problems = [
                n if n not in sd else f"{n} {tuple(sd[n].shape)} vs {tuple(params[n].shape)}"
                for n in names
                if n not in sd or tuple(sd[n].shape) != tuple(params[n].shape)
            ]
            if problems:
                raise CheckpointError(
                    "Cannot initialise the student's embedding layer (student_init: fc): "
                    f"missing or mis-shaped in the checkpoint: {', '.join(problems)}. Use a "
                    "checkpoint of the same model name and input size."
                )
            with torch.no_grad():
                for n in names:
                    params[n].copy_(sd[n])
        if not self._teacher_loaded:
            self.teacher.load_state_dict(self.student.state_dict())
            self.teacher.requires_grad_(False)

    # -- one training step ------------------------------------------------------------------

    def current_mask_ratio_h(self, step: int, total_steps: int) -> float:
        """``h`` at this iteration (cosine-decayed to 0 when ``mrh_schedule == 'cosine'``)."""
        h = self.config.mask_ratio_h
        if self.config.mrh_schedule == "cosine":
            h = cosine_decay(h, step, total_steps, end=0.0)
        return h

    def current_momentum(self, step: int, total_steps: int) -> float:
        """Teacher EMA momentum at this iteration (cosine from ``m`` to 1.0 if scheduled)."""
        m = self.config.teacher_momentum
        if self.config.momentum_schedule == "cosine":
            m = cosine_decay(m, step, total_steps, end=1.0)
        return m

    def _teacher_scores(
        self, x: torch.Tensor, need_scores: bool, need_feat: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not (need_scores or need_feat):
            return None, None
        self.teacher.train(self.config.teacher_train_mode)
        with torch.no_grad():
            h_t = self.teacher.embed(x)
            out_t = self.teacher.aggregate(h_t)
            scores = None
            if need_scores:
                head_scores = (getattr(out_t, "extras", None) or {}).get("head_scores")
                if self.config.mask_score == "class_prob":
                    scores = self.teacher.instance_class_prob(h_t)
                elif head_scores is not None:  # [1, heads, N]: masked by the head vote
                    scores = head_scores
                else:
                    scores = out_t.instance_scores
                if scores is None or scores.shape[-1] != x.shape[1]:
                    got = None if scores is None else tuple(scores.shape)
                    raise ValueError(
                        f"The teacher's '{self.config.mask_score}' scores must be [1, N] with "
                        f"N={x.shape[1]} instances; got {got}."
                    )
                scores = (scores[0] if scores.dim() == 3 else scores.reshape(-1)).float()
        return scores, (out_t.bag_feature if need_feat else None)

    def training_step(
        self,
        x: torch.Tensor,
        target: Any,
        step: int,
        total_steps: int,
        loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and loss of one MHIM training iteration on one bag (no backward).

        Parameters
        ----------
        x : Tensor
            One bag ``[N, D]`` or ``[1, N, D]``.
        target : any
            Passed unchanged to ``loss_fn`` and ``student.auxiliary_loss``.
        step, total_steps : int
            Global iteration index (0-based) and the planned number of iterations; drive the
            ``h`` schedule.
        loss_fn : callable
            ``loss_fn(logits [1, C], target) -> scalar`` (CE for classification, NLL for
            survival).

        Returns
        -------
        loss : Tensor
            Scalar ``ce + aux + cl_alpha * cl`` where ``ce + aux`` is
            ``student.training_loss(out, target, ce)`` (so ``aux`` includes the student's bag
            loss re-weighting, e.g. CLAM's 0.7/0.3).
        info : dict
            ``ce``, ``aux``, ``cl`` (floats), ``n_instances`` (N), ``n_masked`` (instances the
            student does not see: masks + GRN-recycled), ``n_grn`` (recycled), ``kept_ratio``
            (real instances seen / N), ``seq_len`` (kept + k), ``mask_ratio_h`` (h used).
        """
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[0] != 1:
            raise ValueError(
                f"MHIM trains on one bag at a time: x must be [N, D] or [1, N, D]; got "
                f"{tuple(x.shape)}."
            )
        n = x.shape[1]
        if n == 0:
            raise ValueError("MHIM cannot train on an empty bag (N = 0).")
        x = self._as_param_dtype(x)
        cfg = self.config
        h_ratio = self.current_mask_ratio_h(step, total_steps)
        need_scores = h_ratio > 0.0 or cfg.mask_ratio_l > 0.0
        scores, t_feat = self._teacher_scores(x, need_scores, cfg.cl_alpha > 0.0)

        device = x.device
        high = low = _empty_index(device)
        if scores is not None:
            high = high_mask(scores, h_ratio, cfg.mask_ratio_hr, self.generator)
            low = low_mask(scores, cfg.mask_ratio_l)
        rnd = random_mask(n, cfg.mask_ratio, self.generator, device)
        masked = union(n, high, low, rnd)
        if scores is not None:
            priority = fallback_priority(flat_scores(scores), high)
        else:  # random masking only: keep a random instance if all are masked
            priority = _randperm(n, self.generator, device).float()
        keep = keep_indices(n, masked.to(device), priority)

        # Masked instances are removed, not zeroed (ascending order kept). The embedding is
        # per instance, so embedding only the kept rows gives the same result at a fraction of
        # the cost: this is what makes MHIM no slower than its baseline.
        h_in = self.student.embed(x.index_select(1, keep))  # [1, n_keep, H]
        n_grn = 0
        if self.grn is not None:
            n_left = keep.numel()
            n_grn = min(n_masked(n_left, 1.0 - cfg.keep_ratio), n_left - 1)
            perm = _randperm(n_left, self.generator, device)
            recycled = h_in.index_select(1, perm[:n_grn])
            stay = torch.sort(perm[n_grn:]).values
            tokens = self.grn(recycled)  # [1, k, H]; EMA of its queries in train mode
            h_in = torch.cat([h_in.index_select(1, stay), tokens.to(h_in.dtype)], dim=1)
        n_seen = keep.numel() - n_grn

        out = self.student.aggregate(h_in)
        ce = loss_fn(out.logits, target)
        if hasattr(self.student, "training_loss"):  # MILModel's one loss hook (weights, survival)
            task = self.student.training_loss(out, target, ce)
        else:
            aux = self.student.auxiliary_loss(out, target)
            task = ce if aux is None else ce + aux
        aux = (task - ce).detach()
        if t_feat is not None:
            s_feat = out.bag_feature
            if getattr(self.student, "consistency_per_class", False):
                # DSMIL: one 512-d bag vector per class, a softmax over each, mean over classes
                s_feat = s_feat.reshape(s_feat.shape[0], out.logits.shape[-1], -1)
                t_feat = t_feat.reshape(s_feat.shape)
            cl = consistency_loss(s_feat, t_feat, cfg.t_teacher, cfg.t_student)
        else:
            cl = torch.zeros((), device=ce.device)
        loss = task + cfg.cl_alpha * cl
        info = {
            "ce": float(ce.detach()),
            "aux": float(aux),
            "cl": float(cl.detach()),
            "n_instances": n,
            "n_masked": n - n_seen,
            "n_grn": n_grn,
            "kept_ratio": n_seen / n,
            "seq_len": int(h_in.shape[1]),
            "mask_ratio_h": h_ratio,
        }
        return loss, info

    def _as_param_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """Bags are often stored as float16: match the student's weights (``embed`` is called
        directly here, bypassing the students' own input cast), except under autocast."""
        p = next(iter(self.student.parameters()), None)
        if p is not None and x.is_floating_point() and x.dtype != p.dtype:
            if not torch.is_autocast_enabled():
                x = x.to(p.dtype)
        return x

    def after_optimizer_step(self, step: int, total_steps: int) -> float:
        """EMA-update the teacher from the student; returns the momentum used.

        Call once after every ``optimizer.step()`` with the same ``step`` as the training step.
        """
        m = self.current_momentum(step, total_steps)
        ema_update(self.teacher, self.student, m)
        return m

    # -- inference ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Any:
        """Inference: the student alone on the full bag(s); returns its ``MILOutput``.

        With ``grn_at_test`` the GRN's ``k`` tokens, computed from the whole bag (no EMA update),
        are appended, so ``instance_scores`` then has ``N + k`` entries (the first ``N`` are the
        instances'); that path takes unpadded bags only (``mask`` None).
        """
        if self.grn is None or not self.config.grn_at_test:
            return self.student(x) if mask is None else self.student(x, mask)
        if mask is not None:
            raise ValueError("MHIM with grn_at_test runs on unpadded bags only (mask=None).")
        h = self.student.embed(self._as_param_dtype(x if x.dim() == 3 else x.unsqueeze(0)))
        tokens = self.grn(h, update=False)
        return self.student.aggregate(torch.cat([h, tokens.to(h.dtype)], dim=1))
