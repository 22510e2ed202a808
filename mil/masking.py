"""MHIM's masks on one bag: pure index-set functions (high / low / random, union, keep).

Every function takes instance scores ``[N]`` (or per-head ``[H, N]``) or a bag size and returns
sorted ``int64`` index tensors; nothing here holds state. :class:`mil.mhim.MHIM` combines them
into one training step; the TransMIL-MHIM student uses them per attention head.

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

import math

import torch

__all__ = ["check_ratio", "empty_index", "fallback_priority", "flat_scores", "high_mask", "keep_indices",
           "low_mask", "n_masked", "randperm", "random_mask", "union"]


def empty_index(device: torch.device | str | None) -> torch.Tensor:
    """An empty ``int64`` index set on ``device``."""
    return torch.empty(0, dtype=torch.long, device=device)


def randperm(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``randperm`` drawn on the generator's device (required by torch), returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


def check_ratio(name: str, value: float, *, high_open: bool = True) -> None:
    """``value`` in ``[0, 1)`` (or ``[0, 1]``), else ValueError naming ``name``."""
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
    check_ratio("ratio_h", ratio_h)
    hr = 1.0 if ratio_hr is None else ratio_hr
    if not (isinstance(hr, (int, float)) and 0.0 < hr <= 1.0):
        raise ValueError(f"'ratio_hr' must be None or a float in (0, 1]; got {ratio_hr!r}.")
    n = scores.shape[-1]
    if ratio_h <= 0.0 or n == 0:
        return empty_index(scores.device)
    if hr >= 1.0:
        return _top(scores, n_masked(n, ratio_h), largest=True)
    if ratio_h / hr >= 1.0:
        top, count = n, n_masked(n, ratio_h)
    else:
        top = n_masked(n, ratio_h / hr)
        count = n_masked(top, hr)
    candidates = _top(scores, top, largest=True)
    return candidates[randperm(top, generator, scores.device)[:count]]


def low_mask(scores: torch.Tensor, ratio_l: float) -> torch.Tensor:
    """L-HAM: indices of the lowest ``ceil(N * l)`` instances by score (``[N]`` -> ``[n_low]``).

    Per-head scores ``[heads, N]`` are fused by the vote over each head's bottom ``k``.
    """
    _check_scores("low_mask", scores)
    check_ratio("ratio_l", ratio_l)
    count = n_masked(scores.shape[-1], ratio_l)
    if count == 0:
        return empty_index(scores.device)
    return _top(scores, count, largest=False)


def random_mask(
    n: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniformly random ``ceil(n * ratio)`` distinct indices out of ``range(n)``."""
    check_ratio("ratio", ratio)
    count = n_masked(n, ratio)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if count == 0:
        return empty_index(device)
    return randperm(n, generator, device)[:count]


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
