"""Global Recycle Network (MHIM-v2): EMA-only queries, k output tokens, training-only use."""

from __future__ import annotations

import math

import pytest
import torch

from extract.errors import ConfigError
from mil.grn import GlobalRecycleNetwork
from mil.mhim import MHIM
from mil.train_config import MHIMConfig

from contract_students import IdStudent, TinyABMIL, ce, gen, id_bag


def small_grn(**kw) -> GlobalRecycleNetwork:
    args = dict(dim=8, n_tokens=3, heads=2, dim_head=4, dropout=0.0, momentum=0.9)
    args.update(kw)
    return GlobalRecycleNetwork(**args)


def test_parameter_count_at_512_and_queries_are_a_buffer():
    grn = GlobalRecycleNetwork(dim=512, n_tokens=10)
    n_params = sum(p.numel() for p in grn.parameters())
    # LayerNorm 1,024 + kv 524,288 + q 262,144 + out 262,656 (REFERENCE: ~1.05M)
    assert n_params == 1_050_112
    assert "queries" in dict(grn.named_buffers())
    assert "queries" in grn.state_dict()
    assert all(p is not grn.queries for p in grn.parameters())
    assert grn.queries.shape == (1, 10, 512)


def test_output_is_k_tokens():
    grn = small_grn()
    assert grn(torch.randn(2, 11, 8)).shape == (2, 3, 8)
    assert grn(torch.randn(5, 8)).shape == (1, 3, 8)
    with pytest.raises(ValueError, match=r"\[B, M, 8\]"):
        grn(torch.randn(1, 4, 7))


def test_queries_move_only_by_ema_never_by_gradient():
    torch.manual_seed(0)
    grn = small_grn(momentum=0.9).train()
    q0 = grn.queries.clone()
    x = torch.randn(2, 6, 8)
    tokens = grn(x)
    expected = 0.9 * q0 + 0.1 * tokens.detach().mean(0, keepdim=True)
    assert torch.allclose(grn.queries, expected, atol=1e-6)
    tokens.sum().backward()
    assert grn.queries.grad is None and not grn.queries.requires_grad
    assert grn.to_q.weight.grad is not None and grn.to_kv.weight.grad is not None
    # eval mode or update=False: no EMA
    q1 = grn.queries.clone()
    grn(x, update=False)
    grn.eval()
    grn(x)
    assert torch.equal(grn.queries, q1)


def test_zero_masked_instances_returns_the_current_tokens():
    grn = small_grn().train()
    q0 = grn.queries.clone()
    out = grn(torch.randn(2, 0, 8))
    assert out.shape == (2, 3, 8)
    assert torch.equal(out[0], q0[0]) and torch.equal(out[1], q0[0])
    assert torch.equal(grn.queries, q0)


@pytest.mark.parametrize(
    "kw", [{"n_tokens": 0}, {"dim": 0}, {"momentum": 1.5}, {"dropout": 1.0}, {"heads": 2.0}]
)
def test_bad_arguments_raise(kw):
    with pytest.raises(ConfigError):
        small_grn(**kw)


def grn_config(**kw) -> MHIMConfig:
    args = dict(mask_ratio_h=0.05, cl_alpha=0.5, grn=True, keep_ratio=0.9, grn_tokens=3,
                grn_heads=2, grn_dim_head=4, grn_dropout=0.0, grn_momentum=0.9)
    args.update(kw)
    return MHIMConfig(**args)


def test_student_sees_kept_plus_k_and_random_split_of_the_remainder():
    n = 100
    x = id_bag(n)
    mhim = MHIM(IdStudent(), grn_config(), generator=gen()).train()
    _, info = mhim.training_step(x, torch.tensor([1]), 0, 10, ce)
    # HAM 5; of the 95 left, ceil(95 * 0.1) = 10 recycled, 85 kept, + 3 tokens
    assert info["n_grn"] == 10 and info["n_masked"] == 15
    assert info["seq_len"] == 85 + 3
    seen = mhim.student.seen[-1]
    assert seen.shape[1] == 88
    ids = seen[0, :85, 0].long().tolist()
    assert ids == sorted(ids)  # the kept real instances stay in order
    top5 = set(torch.topk(x[:, 1], 5).indices.tolist())
    assert top5.isdisjoint(ids)
    # a different draw recycles different instances
    mhim.training_step(x, torch.tensor([1]), 1, 10, ce)
    assert mhim.student.seen[-1][0, :85, 0].long().tolist() != ids


def test_keep_ratio_one_recycles_nothing_but_still_appends_tokens():
    mhim = MHIM(IdStudent(), grn_config(keep_ratio=1.0, mask_ratio_h=0.0), generator=gen()).train()
    _, info = mhim.training_step(id_bag(40), torch.tensor([0]), 0, 10, ce)
    assert info["n_grn"] == 0 and info["seq_len"] == 43


def test_grn_trains_by_gradient_but_queries_by_ema_only():
    torch.manual_seed(0)
    mhim = MHIM(TinyABMIL(), grn_config(), embed_dim=16, generator=gen()).train()
    assert mhim.grn is not None and mhim.grn.dim == 16
    grn_params = {id(p) for p in mhim.grn.parameters()}
    assert grn_params <= {id(p) for p in mhim.trainable_parameters()}
    opt = torch.optim.Adam(mhim.trainable_parameters(), lr=1e-3)
    for step in range(3):
        q_before = mhim.grn.queries.clone()
        loss, info = mhim.training_step(torch.randn(50, 12), torch.tensor([1]), step, 3, ce)
        assert not torch.equal(mhim.grn.queries, q_before)  # EMA in the training forward
        q_after_forward = mhim.grn.queries.clone()
        opt.zero_grad()
        loss.backward()
        assert mhim.grn.queries.grad is None
        assert mhim.grn.to_kv.weight.grad is not None
        opt.step()
        mhim.after_optimizer_step(step, 3)
        assert torch.equal(mhim.grn.queries, q_after_forward)  # optimizer/EMA of teacher: no
        assert torch.isfinite(loss)
    # the teacher never uses the GRN: its copy has none
    assert not any("grn" in k for k in mhim.teacher.state_dict())


def test_embed_dim_found_by_probe_or_attribute():
    assert MHIM(TinyABMIL(dim=16), grn_config()).grn.dim == 16
    assert MHIM(IdStudent(dim=8), grn_config()).grn.dim == 8


def test_eval_has_no_grn_tokens_unless_grn_at_test():
    x = torch.randn(30, 12)
    mhim = MHIM(TinyABMIL(), grn_config()).eval()
    q0 = mhim.grn.queries.clone()
    assert mhim(x).instance_scores.shape == (1, 30)
    mhim_t = MHIM(TinyABMIL(), grn_config(grn_at_test=True)).eval()
    assert mhim_t(x).instance_scores.shape == (1, 33)
    q_t = mhim_t.grn.queries.clone()
    mhim_t.train()
    mhim_t(x)  # a forward outside training_step never moves the memory
    assert torch.equal(mhim_t.grn.queries, q_t)
    assert torch.equal(mhim.grn.queries, q0)


def test_grn_linear_weights_are_xavier_normal_with_zero_biases():
    """The official v2 MHIM initialises every Linear (the GRN's too) Xavier-normal, biases zero."""
    from mil.grn import GlobalRecycleNetwork

    torch.manual_seed(0)
    grn = GlobalRecycleNetwork(dim=512, n_tokens=5)
    for name, m in grn.named_modules():
        if isinstance(m, torch.nn.Linear):
            fan_out, fan_in = m.weight.shape
            expected = math.sqrt(2.0 / (fan_in + fan_out))
            assert float(m.weight.detach().std()) == pytest.approx(expected, rel=0.05), name
            assert float(m.weight.detach().mean()) == pytest.approx(0.0, abs=3 * expected / math.sqrt(m.weight.numel()))
            if m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0, name
