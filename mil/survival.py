"""Discrete-time survival: time bins, the NLL survival loss and risk (MHIM-v2, REFERENCE.md 6).

The model emits K logits per bag, one per time bin. ``hazard_k = sigmoid(logit_k)`` is the
probability of the event in bin k given survival to its start; ``S_k = prod_{m<=k} (1 - h_m)``
is the probability of surviving past bin k. Bins come from quantiles of the uncensored training
times (:func:`make_time_bins`), and a subject's label is the bin of its time
(:func:`assign_bins`), censored or not.

Pure functions: NumPy for the bins, torch (differentiable, any device) for loss and risk.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from extract.errors import ConfigError
from mil.metrics import _describe, _fail, _numeric, _survival_inputs

__all__ = ["make_time_bins", "assign_bins", "nll_survival_loss", "risk_from_logits"]


def make_time_bins(time: Any, event: Any, n_bins: int = 4) -> np.ndarray:
    """Edges of ``n_bins`` time bins from the quantiles of the UNCENSORED times.

    The inner edges are the ``k / n_bins`` quantiles (k = 1 .. n_bins-1, numpy's linear
    interpolation, as ``pandas.qcut`` in PORPOISE/MCAT) of the times with ``event == 1``. The
    outer edges are extended so that every time, censored or not and including later test
    times, falls in a bin: ``edges[0] = 0`` (times are >= 0) and ``edges[-1] = +inf``. Bins are
    right-open: bin k is ``[edges[k], edges[k+1])``. Fit the edges on the training split only.

    Parameters
    ----------
    time, event : array-like, shape [n]
        Follow-up times (>= 0) and event flags, as in :func:`mil.metrics.concordance_index`.
    n_bins : int
        Number of bins, >= 1 (MHIM-v2 uses 4).

    Returns
    -------
    ndarray of float64, shape [n_bins + 1]
        Strictly increasing edges, ``0`` first and ``inf`` last.

    Raises
    ------
    ConfigError
        On bad inputs, when there are fewer uncensored times than bins, or when tied uncensored
        times make two inner edges equal (an empty bin): use fewer bins.
    """
    func = "make_time_bins"
    if not isinstance(n_bins, numbers.Integral) or isinstance(n_bins, bool) or n_bins < 1:
        raise _fail("n_bins", func, "an int >= 1", repr(n_bins))
    t, e = _survival_inputs(time, event, func)
    uncensored = t[e == 1]
    if len(uncensored) < n_bins:
        raise ConfigError(
            f"make_time_bins needs at least n_bins={n_bins} uncensored times to place quantile "
            f"edges; got {len(uncensored)} events among {len(t)} subjects. Use fewer bins or "
            "more training cases with observed events."
        )
    inner = np.quantile(uncensored, np.arange(1, n_bins) / n_bins)
    edges = np.concatenate([[0.0], inner, [np.inf]])
    if not np.all(np.diff(edges) > 0):
        raise ConfigError(
            f"make_time_bins got repeated edges {edges.tolist()} from {len(uncensored)} "
            f"uncensored times with ties (or at 0): some of the {n_bins} bins would be empty. "
            "Use fewer bins."
        )
    return edges


def assign_bins(time: Any, edges: Any) -> np.ndarray:
    """Bin index of each time: ``k`` such that ``edges[k] <= time < edges[k+1]``.

    Only the inner edges decide: the first and last bins are open-ended, so a time beyond a
    finite last edge goes to the last bin (the outer edges of :func:`make_time_bins` are 0 and
    inf anyway).

    Parameters
    ----------
    time : array-like of float, shape [n]
        Times, >= 0.
    edges : array-like of float, shape [K + 1]
        Strictly increasing bin edges, K >= 1, e.g. from :func:`make_time_bins`.

    Returns
    -------
    ndarray of int64, shape [n]
        Values in ``0 .. K-1``.
    """
    func = "assign_bins"
    expected = "a 1-D array of at least 2 strictly increasing edges"
    e = np.asarray(edges)
    if e.ndim != 1 or len(e) < 2 or e.dtype.kind not in "iuf" or np.isnan(e).any():
        raise _fail("edges", func, expected, _describe(e))
    e = e.astype(np.float64)
    if not np.all(np.diff(e) > 0):
        raise _fail("edges", func, expected, repr(e.tolist()))
    t = _numeric(time, "time", func, 1, "a 1-D array of finite times >= 0")
    if (t < 0).any():
        raise _fail("time", func, "a 1-D array of finite times >= 0", f"minimum {t.min()!r}")
    return np.searchsorted(e[1:-1], t, side="right").astype(np.int64)


def _tensor_desc(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(type(x))


def _check_logits(logits: Any, func: str) -> torch.Tensor:
    ok = (
        isinstance(logits, torch.Tensor)
        and logits.ndim == 2
        and logits.is_floating_point()
        and min(logits.shape) >= 1
    )
    if not ok:
        raise _fail("logits", func, "a float tensor [B, K] with B, K >= 1", _tensor_desc(logits))
    return logits


def nll_survival_loss(
    logits: torch.Tensor,
    bin: torch.Tensor,
    event: torch.Tensor,
    alpha: float = 0.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Discrete-time negative log-likelihood survival loss (NLLSurvLoss of MCAT/PORPOISE).

    With ``h = sigmoid(logits)``, ``S_k = prod_{m<=k} (1 - h_m)`` and ``S_{-1} = 1``:

    - censored in bin y (survived at least to bin y): ``-log S_y``;
    - event in bin y: ``-log S_{y-1} - log h_y``;

    ``loss_i = (1 - alpha) * (censored_i + uncensored_i) + alpha * uncensored_i``, averaged over
    the batch (``alpha`` up-weights the uncensored term, as the reference code).

    The logs are computed stably as ``logsigmoid`` and cumulative sums, then floored at
    ``log(eps)`` exactly where the reference clamps ``S`` and ``h`` at ``eps``, so the values
    match the reference; ``eps=0`` removes the floor.

    Parameters
    ----------
    logits : torch.Tensor of float, shape [B, K]
        One logit per time bin.
    bin : torch.Tensor of int, shape [B]
        Bin index of each subject's time, ``0 .. K-1`` (:func:`assign_bins`).
    event : torch.Tensor of {0, 1} or bool, shape [B]
        1 = event observed, 0 = censored (note: the reference code takes the censorship
        indicator, the opposite).
    alpha : float in [0, 1]
        Weight of the extra uncensored term.
    eps : float >= 0
        Floor of the probabilities inside the logs.

    Returns
    -------
    torch.Tensor
        Scalar, differentiable with respect to ``logits``.
    """
    func = "nll_survival_loss"
    logits = _check_logits(logits, func)
    b, k = logits.shape
    if not isinstance(bin, torch.Tensor) or bin.shape != (b,) or bin.is_floating_point():
        raise _fail("bin", func, f"an integer tensor of shape ({b},)", _tensor_desc(bin))
    lo, hi = int(bin.min()), int(bin.max())
    if lo < 0 or hi >= k:
        raise _fail("bin", func, f"bin indices in [0, {k - 1}]", f"range [{lo}, {hi}]")
    if not isinstance(event, torch.Tensor) or event.shape != (b,):
        raise _fail("event", func, f"a tensor of 0/1 of shape ({b},)", _tensor_desc(event))
    ev = event.to(logits.dtype)
    if not bool(((ev == 0) | (ev == 1)).all()):
        values = torch.unique(ev).tolist()[:5]
        raise _fail("event", func, "a tensor of 0/1 (1 = event, 0 = censored)", f"values {values}")
    if not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise _fail("alpha", func, "a float in [0, 1]", repr(alpha))
    if not isinstance(eps, numbers.Real) or not 0 <= eps < 1:
        raise _fail("eps", func, "a float in [0, 1)", repr(eps))
    floor = math.log(eps) if eps > 0 else -math.inf

    y = bin.long().view(b, 1)
    log_h = F.logsigmoid(logits)
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=1)
    log_s_padded = torch.cat([log_s.new_zeros(b, 1), log_s], dim=1)  # log S_{-1} = 0
    log_s_prev = torch.gather(log_s_padded, 1, y).squeeze(1).clamp(min=floor)
    log_s_this = torch.gather(log_s_padded, 1, y + 1).squeeze(1).clamp(min=floor)
    log_h_this = torch.gather(log_h, 1, y).squeeze(1).clamp(min=floor)
    uncensored = -ev * (log_s_prev + log_h_this)
    censored = -(1 - ev) * log_s_this
    loss = (1 - alpha) * (censored + uncensored) + alpha * uncensored
    return loss.mean()


def risk_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Risk score and survival curve from per-bin logits.

    Parameters
    ----------
    logits : torch.Tensor of float, shape [B, K]
        One logit per time bin.

    Returns
    -------
    risk : torch.Tensor, shape [B]
        ``-sum_k S_k``: minus the expected number of bins survived; higher = earlier event,
        the orientation :func:`mil.metrics.concordance_index` expects.
    survival : torch.Tensor, shape [B, K]
        ``S_k = prod_{m<=k} (1 - sigmoid(logit_m))``, non-increasing along K.
    """
    logits = _check_logits(logits, "risk_from_logits")
    survival = torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1))
    return -survival.sum(dim=1), survival
