"""mil.survival: bins from quantiles, the NLL loss against hand values and the reference code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from extract.errors import ConfigError
from mil.metrics import concordance_index
from mil.survival import assign_bins, make_time_bins, nll_survival_loss, risk_from_logits


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _reference_nll(hazards, S, Y, c, alpha, eps=1e-7):
    """The NLLSurvLoss of MCAT/PORPOISE as published (c = censorship, 1 = censored)."""
    batch_size = len(Y)
    Y = Y.view(batch_size, 1)
    c = c.view(batch_size, 1).float()
    S_padded = torch.cat([torch.ones_like(c), S], 1)
    uncensored_loss = -(1 - c) * (
        torch.log(torch.gather(S_padded, 1, Y).clamp(min=eps))
        + torch.log(torch.gather(hazards, 1, Y).clamp(min=eps))
    )
    censored_loss = -c * torch.log(torch.gather(S_padded, 1, Y + 1).clamp(min=eps))
    neg_l = censored_loss + uncensored_loss
    return ((1 - alpha) * neg_l + alpha * uncensored_loss).mean()


# ------------------------------------------------------------------------------------------
# bins
# ------------------------------------------------------------------------------------------


def test_make_time_bins_from_uncensored_quantiles():
    time = np.array([1, 2, 3, 4, 5, 6, 7, 8, 0.5, 100, 200], dtype=float)
    event = np.array([1] * 8 + [0] * 3)
    edges = make_time_bins(time, event, n_bins=4)
    # linear quantiles of 1..8 at 1/4, 1/2, 3/4; censored times play no part
    np.testing.assert_allclose(edges, [0.0, 2.75, 4.5, 6.25, np.inf])
    np.testing.assert_allclose(make_time_bins(time, event, n_bins=1), [0.0, np.inf])


def test_make_time_bins_errors():
    with pytest.raises(ConfigError, match="at least n_bins=4 uncensored times.*got 3 events"):
        make_time_bins([1, 2, 3, 4, 5], [1, 1, 1, 0, 0], n_bins=4)
    with pytest.raises(ConfigError, match="repeated edges.*Use fewer bins"):
        make_time_bins([5, 5, 5, 5, 5, 9], [1] * 6, n_bins=4)
    with pytest.raises(ConfigError, match="The 'n_bins' parameter of make_time_bins must be an int >= 1"):
        make_time_bins([1, 2], [1, 1], n_bins=0)


def test_assign_bins_right_open_and_outer_bins_open():
    edges = np.array([0.0, 2.75, 4.5, 6.25, np.inf])
    time = [0, 2.74, 2.75, 4.5, 6.0, 6.25, 1e6]
    np.testing.assert_array_equal(assign_bins(time, edges), [0, 0, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(assign_bins([12.0], [0, 5, 10]), [1])  # past a finite last edge
    assert assign_bins([3.0], edges).dtype == np.int64
    with pytest.raises(ConfigError, match="strictly increasing"):
        assign_bins([1.0], [0, 2, 2, 5])
    with pytest.raises(ConfigError, match="The 'time' parameter of assign_bins"):
        assign_bins([-1.0], edges)


def test_bins_balance_uncensored_times():
    rng = np.random.default_rng(0)
    time = rng.exponential(50, 400)
    event = rng.integers(0, 2, 400)
    bins = assign_bins(time[event == 1], make_time_bins(time, event, 4))
    counts = np.bincount(bins, minlength=4)
    assert counts.min() >= counts.sum() // 4 - 1


# ------------------------------------------------------------------------------------------
# loss
# ------------------------------------------------------------------------------------------

LOGITS = [0.0, 1.0, -1.0, 2.0]


def test_nll_loss_hand_computed_cases():
    logits = torch.tensor([LOGITS], dtype=torch.float64)
    h = [_sig(x) for x in LOGITS]
    # censored in bin 1: survived bins 0 and 1
    censored = -math.log((1 - h[0]) * (1 - h[1]))
    loss = nll_survival_loss(logits, torch.tensor([1]), torch.tensor([0]))
    assert loss.item() == pytest.approx(censored, rel=1e-12)
    # event in bin 2: survived bins 0, 1, then the event in bin 2
    uncensored = -math.log((1 - h[0]) * (1 - h[1])) - math.log(h[2])
    loss = nll_survival_loss(logits, torch.tensor([2]), torch.tensor([1]))
    assert loss.item() == pytest.approx(uncensored, rel=1e-12)
    # event in bin 0: S(-1) = 1
    loss = nll_survival_loss(logits, torch.tensor([0]), torch.tensor([1]))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
    # batch mean and alpha weighting of the uncensored term
    both = torch.tensor([LOGITS, LOGITS], dtype=torch.float64)
    loss = nll_survival_loss(both, torch.tensor([1, 2]), torch.tensor([0, 1]), alpha=0.4)
    assert loss.item() == pytest.approx((0.6 * (censored + uncensored) + 0.4 * uncensored) / 2)


def test_nll_loss_matches_reference_implementation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4, generator=gen) * 3
    logits[:4] = torch.tensor([30.0, -30.0, 30.0, 30.0])  # the eps clamp is reached
    y = torch.randint(0, 4, (64,), generator=gen)
    event = torch.randint(0, 2, (64,), generator=gen)
    hazards = torch.sigmoid(logits)
    S = torch.cumprod(1 - hazards, dim=1)
    for alpha in (0.0, 0.4):
        ours = nll_survival_loss(logits, y, event, alpha=alpha)
        ref = _reference_nll(hazards, S, y, 1 - event, alpha)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_nll_loss_gradients_flow_and_stay_finite():
    logits = torch.tensor([[0.3, -0.2, 0.1, 0.5], [50.0, -50.0, 0.0, 1.0]], requires_grad=True)
    loss = nll_survival_loss(logits, torch.tensor([3, 1]), torch.tensor([True, False]), eps=0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[0].abs().min() > 0  # every bin up to the event bin gets a gradient
    # an event in bin 3 after survival: pushes hazard of bin 3 up, earlier hazards down
    assert logits.grad[0, 3] < 0 and (logits.grad[0, :3] > 0).all()


def test_nll_loss_validation():
    logits = torch.zeros(2, 4)
    with pytest.raises(ConfigError, match=r"The 'bin' parameter of nll_survival_loss must be bin indices in \[0, 3\]"):
        nll_survival_loss(logits, torch.tensor([0, 4]), torch.tensor([1, 0]))
    with pytest.raises(ConfigError, match="The 'event' parameter"):
        nll_survival_loss(logits, torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="The 'bin' parameter"):
        nll_survival_loss(logits, torch.tensor([0.0, 1.0]), torch.tensor([1, 0]))
    with pytest.raises(ConfigError, match=r"The 'logits' parameter of nll_survival_loss must be a float tensor \[B, K\] with B, K >= 1"):
        nll_survival_loss(torch.zeros(4), torch.tensor([0]), torch.tensor([1]))


# ------------------------------------------------------------------------------------------
# risk
# ------------------------------------------------------------------------------------------


def test_risk_from_logits_values_and_ordering():
    logits = torch.tensor([[-2.0, -2.0, -2.0, -2.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    risk, surv = risk_from_logits(logits)
    assert risk.shape == (3,) and surv.shape == (3, 4)
    expected = torch.cumprod(1 - torch.sigmoid(logits), dim=1)
    torch.testing.assert_close(surv, expected)
    torch.testing.assert_close(risk, -expected.sum(1))
    assert risk[0] < risk[1] < risk[2]  # higher hazards, higher risk
    assert (surv[:, 1:] <= surv[:, :-1]).all()
    # a hazard raised in one bin only still raises risk
    bumped = logits[1:2].clone()
    bumped[0, 2] = 3.0
    assert risk_from_logits(bumped)[0] > risk[1]


def test_risk_orientation_matches_concordance_index():
    # subjects with higher hazards die earlier: C-index of the risk is 1
    logits = torch.linspace(-3, 3, 8)[:, None].repeat(1, 4)
    risk, _ = risk_from_logits(logits)
    time = np.arange(8, 0, -1, dtype=float)
    assert concordance_index(time, np.ones(8), risk.numpy()) == 1.0
