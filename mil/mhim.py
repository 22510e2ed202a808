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

Counting rules (how many instances a ratio masks, R-HAM, union, the never-empty fallback, GRN
keep): :mod:`mil.masking`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from extract.errors import CheckpointError, ConfigError
from mil.checkpoints import OFFICIAL_PREFIXES, from_official_layout
from mil.grn import GlobalRecycleNetwork
from mil.masking import (
    check_ratio,
    empty_index,
    fallback_priority,
    flat_scores,
    high_mask,
    keep_indices,
    low_mask,
    n_masked,
    random_mask,
    randperm,
    union,
)
from mil.train_config import MHIMConfig

__all__ = [
    "MHIM",
    "consistency_loss",
    "cosine_decay",
    "ema_update",
]


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
    check_ratio("momentum", momentum, high_open=False)
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
    ) -> tuple[torch.Tensor, dict[str, Any]]:
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
            ``ce``, ``aux``, ``cl`` (detached 0-d tensors), ``n_instances`` (N), ``n_masked`` (instances the
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
        high = low = empty_index(device)
        if scores is not None:
            high = high_mask(scores, h_ratio, cfg.mask_ratio_hr, self.generator)
            low = low_mask(scores, cfg.mask_ratio_l)
        rnd = random_mask(n, cfg.mask_ratio, self.generator, device)
        masked = union(n, high, low, rnd)
        if scores is not None:
            priority = fallback_priority(flat_scores(scores), high)
        else:  # random masking only: keep a random instance if all are masked
            priority = randperm(n, self.generator, device).float()
        keep = keep_indices(n, masked.to(device), priority)

        # Masked instances are removed, not zeroed (ascending order kept). The embedding is
        # per instance, so embedding only the kept rows gives the same result at a fraction of
        # the cost: this is what makes MHIM no slower than its baseline.
        h_in = self.student.embed(x.index_select(1, keep))  # [1, n_keep, H]
        n_grn = 0
        if self.grn is not None:
            n_left = keep.numel()
            n_grn = min(n_masked(n_left, 1.0 - cfg.keep_ratio), n_left - 1)
            perm = randperm(n_left, self.generator, device)
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
        info = {  # losses as detached 0-d tensors: reading a float would wait for the device
            "ce": ce.detach(),
            "aux": aux,
            "cl": cl.detach(),
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
