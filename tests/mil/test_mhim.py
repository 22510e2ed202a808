"""MHIM-MIL: masking counts, union, removal by gather, schedules, consistency, EMA teacher."""

from __future__ import annotations

import math
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from extract.errors import CheckpointError, ConfigError
from mil.masking import (
    fallback_priority,
    high_mask,
    keep_indices,
    low_mask,
    n_masked,
    random_mask,
    union,
)
from mil.mhim import MHIM, consistency_loss, cosine_decay, ema_update
from mil.train_config import MHIMConfig


from contract_students import IdStudent, TinyABMIL, ce, gen, id_bag


# --------------------------------------------------------------------------------------------
# Counting rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, ratio, expected",
    [(1000, 0.01, 10), (1000, 0.0, 0), (100, 0.07, 7), (10, 0.25, 3), (5, 0.99, 5), (1, 0.01, 1),
     (0, 0.5, 0), (999, 0.02, 20), (1000, 0.06, 60)],
)
def test_n_masked_is_ceil_without_float_noise(n, ratio, expected):
    assert n_masked(n, ratio) == expected


def test_high_mask_takes_top_ceil_n_h():
    scores = torch.randperm(1000, generator=gen()).float()
    idx = high_mask(scores, 0.01)
    assert idx.numel() == 10
    assert set(idx.tolist()) == set(torch.topk(scores, 10).indices.tolist())


@pytest.mark.parametrize(
    "n, h, hr, top, count",
    [(1000, 0.01, 0.5, 20, 10), (101, 0.01, 0.5, 3, 2), (1000, 0.03, 0.3, 100, 30),
     (50, 0.01, 0.5, 1, 1), (10, 0.6, 0.5, 10, 6)],
)
def test_r_ham_counts_and_candidates(n, h, hr, top, count):
    scores = torch.randperm(n, generator=gen(1)).float()
    candidates = set(torch.topk(scores, top).indices.tolist())
    picked_any = set()
    for seed in range(20):
        idx = high_mask(scores, h, hr, generator=gen(seed))
        assert idx.numel() == count
        assert len(set(idx.tolist())) == count
        assert set(idx.tolist()) <= candidates
        picked_any |= set(idx.tolist())
    if top > count:  # random sub-selection: over seeds more than `count` candidates are hit
        assert len(picked_any) > count


def test_r_ham_is_reproducible_with_a_generator():
    scores = torch.rand(500, generator=gen(3))
    a = high_mask(scores, 0.02, 0.5, generator=gen(7))
    b = high_mask(scores, 0.02, 0.5, generator=gen(7))
    assert torch.equal(a, b)
    assert torch.equal(high_mask(scores, 0.02, 1.0), high_mask(scores, 0.02, None))


def test_low_and_random_masks():
    scores = torch.randperm(200, generator=gen(2)).float()
    low = low_mask(scores, 0.2)
    assert set(low.tolist()) == set(torch.topk(scores, 40, largest=False).indices.tolist())
    assert low_mask(scores, 0.0).numel() == 0
    r = random_mask(200, 0.55, generator=gen(4))
    assert r.numel() == 110 and r.unique().numel() == 110 and int(r.max()) < 200
    assert torch.equal(r, random_mask(200, 0.55, generator=gen(4)))
    assert random_mask(200, 0.0).numel() == 0


def test_bad_ratios_raise():
    s = torch.rand(10)
    with pytest.raises(ValueError, match="ratio_h"):
        high_mask(s, 1.0)
    with pytest.raises(ValueError, match="ratio_hr"):
        high_mask(s, 0.1, 0.0)
    with pytest.raises(ValueError, match="one bag"):
        high_mask(torch.rand(1, 2, 10), 0.1)  # [heads, N] is per-head scores; 3-D is not one bag


def test_union_counts_overlaps_once_and_sorts():
    u = union(10, torch.tensor([7, 2, 3]), torch.tensor([3, 9]), torch.tensor([], dtype=torch.long))
    assert u.tolist() == [2, 3, 7, 9]


def test_keep_indices_complement_in_order_and_never_empty():
    assert keep_indices(6, torch.tensor([4, 1, 1])).tolist() == [0, 2, 3, 5]
    everything = torch.arange(5)
    assert keep_indices(5, everything).tolist() == [0]
    scores = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3])
    # high mask = {1, 3}: best non-high instance (score 0.5, index 0) is kept
    pr = fallback_priority(scores, torch.tensor([1, 3]))
    assert keep_indices(5, everything, pr).tolist() == [0]
    # high mask covers the bag: the lowest-scoring instance (index 2) is kept
    pr = fallback_priority(scores, everything)
    assert keep_indices(5, everything, pr).tolist() == [2]


# --------------------------------------------------------------------------------------------
# Schedules, consistency loss, EMA
# --------------------------------------------------------------------------------------------


def test_cosine_decay_start_middle_end():
    assert cosine_decay(0.01, 0, 100) == pytest.approx(0.01)
    assert cosine_decay(0.01, 50, 100) == pytest.approx(0.005)
    assert cosine_decay(0.01, 25, 100) == pytest.approx(0.005 * (1 + math.cos(math.pi / 4)))
    assert cosine_decay(0.01, 100, 100) == pytest.approx(0.0, abs=1e-15)
    assert cosine_decay(0.01, 150, 100) == pytest.approx(0.0, abs=1e-15)
    # EMA momentum: cosine from m to 1.0
    assert cosine_decay(0.9999, 0, 10, end=1.0) == pytest.approx(0.9999)
    assert cosine_decay(0.9999, 5, 10, end=1.0) == pytest.approx(0.99995)
    assert cosine_decay(0.9999, 10, 10, end=1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cosine_decay(0.1, 0, 0)


def test_consistency_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], requires_grad=True)
    t = torch.tensor([[0.3, 0.1, 0.2], [0.5, -0.5, 0.0]], requires_grad=True)

    def by_hand(sr, tr):
        pt = [math.exp(v / 0.1) for v in tr]
        pt = [v / sum(pt) for v in pt]
        lse = math.log(sum(math.exp(v / 1.0) for v in sr))
        return sum(-p * (v / 1.0 - lse) for p, v in zip(pt, sr))

    expected = (by_hand([1, 2, 3], [0.3, 0.1, 0.2]) + by_hand([0, 0, 1], [0.5, -0.5, 0.0])) / 2
    loss = consistency_loss(s, t, t_teacher=0.1, t_student=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert s.grad is not None and t.grad is None  # teacher side detached
    with pytest.raises(ValueError, match="same shape"):
        consistency_loss(torch.zeros(1, 3), torch.zeros(1, 4))


def test_ema_update_arithmetic_by_hand():
    teacher = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    student = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        teacher[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        teacher[0].bias.fill_(0.5)
        student[0].weight.copy_(torch.tensor([[3.0, -2.0]]))
        student[0].bias.fill_(1.5)
        student[1].running_mean.fill_(7.0)
    ema_update(teacher, student, 0.9)
    assert teacher[0].weight[0].tolist() == pytest.approx([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2])
    assert teacher[0].bias.item() == pytest.approx(0.9 * 0.5 + 0.1 * 1.5)
    assert teacher[1].running_mean.item() == 7.0  # buffers copied
    with pytest.raises(ValueError):
        ema_update(teacher, nn.Linear(2, 1), 0.9)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("mask_ratio", 1.0), ("mask_ratio_h", -0.1), ("mask_ratio_hr", 0.0), ("mask_ratio_l", "x"),
     ("mrh_schedule", "linear"), ("mask_score", "attn"), ("teacher_momentum", 1.5),
     ("momentum_schedule", "cos"), ("cl_alpha", -1.0), ("t_teacher", 0.0),
     ("teacher_train_mode", 1), ("keep_ratio", 0.0), ("grn_tokens", 0), ("grn", "yes"),
     ("grn_momentum", 2.0), ("mask_ratio_h", True)],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"'{field}' parameter of MHIMConfig"):
        MHIMConfig(**{field: value})


def test_config_is_frozen_and_grn_at_test_needs_grn():
    cfg = MHIMConfig()
    with pytest.raises(Exception):
        cfg.mask_ratio = 0.5  # type: ignore[misc]
    with pytest.raises(ConfigError, match="grn_at_test"):
        MHIMConfig(grn_at_test=True)


# --------------------------------------------------------------------------------------------
# The MHIM wrapper
# --------------------------------------------------------------------------------------------


def test_masked_instances_are_removed_and_order_kept():
    n = 100
    x = id_bag(n)
    mhim = MHIM(IdStudent(), MHIMConfig(mask_ratio_h=0.05, cl_alpha=0.0), generator=gen())
    loss, info = mhim.training_step(x, torch.tensor([1]), 0, 10, ce)
    seen = mhim.student.seen[-1][0, :, 0].long()
    top5 = set(torch.topk(x[:, 1], 5).indices.tolist())
    assert seen.tolist() == sorted(set(range(n)) - top5)  # removed (not zeroed), ascending
    assert info["n_masked"] == 5 and info["kept_ratio"] == pytest.approx(0.95)
    assert info["seq_len"] == 95
    assert torch.isfinite(loss)


def test_union_of_high_low_random_in_the_step():
    n = 200
    x = id_bag(n, seed=3)
    cfg = MHIMConfig(mask_ratio=0.3, mask_ratio_h=0.05, mask_ratio_l=0.2, cl_alpha=0.0)
    mhim = MHIM(IdStudent(), cfg, generator=gen(5))
    _, info = mhim.training_step(x, torch.tensor([0]), 0, 10, ce)
    seen = set(mhim.student.seen[-1][0, :, 0].long().tolist())
    high = set(torch.topk(x[:, 1], 10).indices.tolist())
    low = set(torch.topk(x[:, 1], 40, largest=False).indices.tolist())
    assert not seen & (high | low)
    # the random 60 fall partly on high/low: the union is counted once
    masked = set(range(n)) - seen
    assert len(masked) == info["n_masked"]
    assert len(high | low) < len(masked) <= 10 + 40 + 60


def test_class_prob_mask_score_masks_top_class_probability():
    n = 100
    x = id_bag(n, seed=1)
    cfg = MHIMConfig(mask_ratio_h=0.1, mask_score="class_prob", cl_alpha=0.0)
    mhim = MHIM(IdStudent(), cfg, generator=gen())
    mhim.training_step(x, torch.tensor([1]), 0, 10, ce)
    seen = set(mhim.student.seen[-1][0, :, 0].long().tolist())
    by_prob = set(torch.topk(x[:, 2], 10).indices.tolist())
    by_attn = set(torch.topk(x[:, 1], 10).indices.tolist())
    assert by_prob.isdisjoint(seen) and by_prob != by_attn


def test_h_decays_per_iteration():
    x = id_bag(1000)
    cfg = MHIMConfig(mask_ratio_h=0.02, mrh_schedule="cosine", cl_alpha=0.0)
    mhim = MHIM(IdStudent(), cfg, generator=gen())
    steps = (0, 50, 100)
    counts = [mhim.training_step(x, torch.tensor([1]), s, 100, ce)[1]["n_masked"] for s in steps]
    assert counts == [20, 10, 0]


def test_everything_masked_keeps_one_instance():
    cfg = MHIMConfig(mask_ratio=0.5, mask_ratio_h=0.5, cl_alpha=0.0)
    mhim = MHIM(IdStudent(), cfg, generator=gen())
    x = id_bag(1)
    _, info = mhim.training_step(x, torch.tensor([1]), 0, 10, ce)
    assert info["seq_len"] == 1 and info["n_masked"] == 0


def test_loss_is_ce_plus_aux_plus_weighted_consistency_and_target_passes_through():
    x = id_bag(50)
    cfg = MHIMConfig(mask_ratio_h=0.0, cl_alpha=0.5)
    mhim = MHIM(IdStudent(), cfg, generator=gen())
    target = (torch.tensor([1]), "censor-info")  # survival-style targets pass unchanged
    def nll_like(logits, t):
        return F.cross_entropy(logits, t[0])

    loss, info = mhim.training_step(x, target, 0, 10, nll_like)
    assert mhim.student.aux_targets[-1] is target
    assert float(info["aux"]) == pytest.approx(0.25)
    assert loss.item() == pytest.approx(float(info["ce"]) + 0.25 + 0.5 * float(info["cl"]), rel=1e-5)
    # identical student and teacher, nothing masked: consistency is the entropy-like target
    s_feat = mhim.student.proj(x.unsqueeze(0).mean(1))
    assert float(info["cl"]) == pytest.approx(consistency_loss(s_feat, s_feat).item(), rel=1e-5)


def test_teacher_skipped_when_nothing_needs_it():
    calls = []
    mhim = MHIM(IdStudent(), MHIMConfig(mask_ratio=0.5, mask_ratio_h=0.0, cl_alpha=0.0))
    mhim.teacher.embed = lambda x: calls.append(1) or x  # type: ignore[method-assign]
    mhim.training_step(id_bag(20), torch.tensor([0]), 0, 10, ce)
    assert calls == []


def test_teacher_gets_no_gradient_and_moves_only_by_ema():
    torch.manual_seed(0)
    cfg = MHIMConfig(mask_ratio=0.5, mask_ratio_h=0.05, cl_alpha=0.5)
    mhim = MHIM(TinyABMIL(), cfg, generator=gen())
    teacher_ids = {id(p) for p in mhim.teacher.parameters()}
    assert all(not p.requires_grad for p in mhim.teacher.parameters())
    assert teacher_ids.isdisjoint(id(p) for p in mhim.trainable_parameters())
    opt = torch.optim.Adam(mhim.trainable_parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in mhim.teacher.state_dict().items()}
    x = torch.randn(40, 12)
    loss, _ = mhim.training_step(x, torch.tensor([1]), 0, 10, ce)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in mhim.teacher.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in mhim.teacher.state_dict().items())
    student_after = {k: v.clone() for k, v in mhim.student.state_dict().items()}
    m = mhim.after_optimizer_step(0, 10)
    assert m == 0.9999
    for k, v in mhim.teacher.state_dict().items():
        assert torch.allclose(v, 0.9999 * before[k] + 0.0001 * student_after[k])
    assert not torch.equal(mhim.teacher.fc[0].weight, before["fc.0.weight"])


def test_momentum_schedule_and_teacher_mode():
    cfg = MHIMConfig(momentum_schedule="cosine", teacher_momentum=0.99, teacher_train_mode=False)
    mhim = MHIM(TinyABMIL(), cfg)
    assert mhim.current_momentum(0, 10) == pytest.approx(0.99)
    assert mhim.current_momentum(10, 10) == pytest.approx(1.0)
    mhim.train()
    mhim.training_step(torch.randn(30, 12), torch.tensor([0]), 0, 10, ce)
    assert not mhim.teacher.training and mhim.student.training
    mhim2 = MHIM(TinyABMIL(), MHIMConfig())
    mhim2.eval()
    mhim2.training_step(torch.randn(30, 12), torch.tensor([0]), 0, 10, ce)
    assert mhim2.teacher.training  # official: teacher scores in train mode


def test_inference_is_the_student_on_the_full_bag():
    torch.manual_seed(0)
    mhim = MHIM(TinyABMIL(), MHIMConfig(mask_ratio=0.7, mask_ratio_h=0.1)).eval()
    x = torch.randn(25, 12)
    out = mhim(x)
    ref = mhim.student(x)
    assert out.instance_scores.shape == (1, 25)
    assert torch.equal(out.logits, ref.logits)


def test_float16_bags_are_cast_to_the_students_dtype():
    mhim = MHIM(TinyABMIL(), MHIMConfig(mask_ratio=0.5))
    loss, _ = mhim.training_step(torch.randn(20, 12).half(), torch.tensor([0]), 0, 10, ce)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_rejects_batches_and_empty_bags():
    mhim = MHIM(TinyABMIL())
    with pytest.raises(ValueError, match="one bag"):
        mhim.training_step(torch.randn(2, 5, 12), torch.tensor([0, 1]), 0, 10, ce)
    with pytest.raises(ValueError, match="empty"):
        mhim.training_step(torch.randn(0, 12), torch.tensor([0]), 0, 10, ce)


def test_init_teacher_and_student_from_checkpoints():
    torch.manual_seed(0)
    baseline = TinyABMIL()
    mhim = MHIM(TinyABMIL())
    # fc: only the embedding layer comes from the baseline; teacher follows the student
    mhim.init_student_from({"model": baseline.state_dict()}, mode="fc")
    assert torch.equal(mhim.student.fc[0].weight, baseline.fc[0].weight)
    assert torch.equal(mhim.student.fc[0].bias, baseline.fc[0].bias)
    assert not torch.equal(mhim.student.classifier.weight, baseline.classifier.weight)
    assert torch.equal(mhim.teacher.classifier.weight, mhim.student.classifier.weight)
    # teacher from the baseline; a later student init no longer overwrites it
    mhim.init_teacher_from(baseline.state_dict())
    assert torch.equal(mhim.teacher.classifier.weight, baseline.classifier.weight)
    assert all(not p.requires_grad for p in mhim.teacher.parameters())
    mhim.init_student_from(TinyABMIL().state_dict(), mode="all")
    assert torch.equal(mhim.teacher.classifier.weight, baseline.classifier.weight)
    # loud errors
    with pytest.raises(CheckpointError, match="missing"):
        mhim.init_teacher_from(
            {k: v for k, v in baseline.state_dict().items() if "classifier" not in k}
        )
    with pytest.raises(CheckpointError, match="shape"):
        mhim.init_teacher_from(TinyABMIL(n_classes=3).state_dict())
    with pytest.raises(CheckpointError, match="MHIM checkpoint"):
        mhim.init_teacher_from(mhim.state_dict())
    with pytest.raises(CheckpointError, match="embedding layer"):
        mhim.init_student_from(TinyABMIL(in_dim=7).state_dict(), mode="fc")
    with pytest.raises(ConfigError, match="mode"):
        mhim.init_student_from(baseline.state_dict(), mode="head")


def test_tiny_abmil_trains_a_few_steps():
    torch.manual_seed(0)
    cfg = MHIMConfig(mask_ratio=0.5, mask_ratio_h=0.02, mask_ratio_hr=0.5, mask_ratio_l=0.2,
                     mrh_schedule="cosine", momentum_schedule="cosine", cl_alpha=0.5)
    mhim = MHIM(TinyABMIL(), cfg, generator=gen())
    opt = torch.optim.Adam(mhim.trainable_parameters(), lr=1e-3)
    mhim.train()
    for step in range(6):
        x = torch.randn(int(torch.randint(30, 80, ())), 12)
        loss, info = mhim.training_step(x, torch.tensor([step % 2]), step, 6, ce)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mhim.after_optimizer_step(step, 6)
        assert torch.isfinite(loss) and 0 < info["kept_ratio"] < 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_on_cuda_with_a_cpu_generator():
    cfg = MHIMConfig(mask_ratio=0.5, mask_ratio_h=0.05, mask_ratio_hr=0.5, mask_ratio_l=0.1,
                     grn=True, grn_tokens=2, grn_heads=2, grn_dim_head=4)
    mhim = MHIM(TinyABMIL(), cfg, generator=gen()).cuda().train()
    x, y = torch.randn(64, 12, device="cuda"), torch.tensor([1], device="cuda")
    loss, info = mhim.training_step(x, y, 0, 5, ce)
    loss.backward()
    mhim.after_optimizer_step(0, 5)
    assert torch.isfinite(loss) and info["seq_len"] < 64 + 2


# --------------------------------------------------------------------------------------------
# On top of the registry's students (once mil.models is there)
# --------------------------------------------------------------------------------------------

REGISTRY_STUDENTS = ["abmil", "transmil", "dsmil"]
#: narrow versions keep the tests fast on two CPU cores (full sizes are the students' tests)
SMALL = {
    "abmil": dict(embed_dim=64, attn_dim=16),
    "transmil": dict(embed_dim=64, num_landmarks=16),
    "dsmil": dict(embed_dim=64, q_dim=16),
}

#: v1: random + L-HAM + R-HAM on attention; v2: class-aware probability + GRN (also at test)
VARIANTS = {
    "v1": dict(mask_ratio=0.5, mask_ratio_h=0.05, mask_ratio_hr=0.5, mask_ratio_l=0.1,
               mrh_schedule="cosine", momentum_schedule="cosine", cl_alpha=0.5),
    "v2": dict(mask_ratio_h=0.05, mask_score="class_prob", grn=True, keep_ratio=0.8,
               grn_tokens=2, grn_heads=4, grn_dim_head=16, grn_at_test=True,
               teacher_momentum=0.9997, cl_alpha=0.5),
}


def registry_student(name: str, in_dim: int = 64):
    try:
        from mil.models import create_model, list_models
    except ImportError:
        pytest.skip("mil.models (the students) not there yet")
    if name not in list_models():
        pytest.skip(f"student {name!r} not registered yet")
    return create_model(name, in_dim, 2, **SMALL[name])


@pytest.mark.parametrize("name", REGISTRY_STUDENTS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mhim_on_registry_students_trains(name, variant):
    torch.manual_seed(0)
    mhim = MHIM(registry_student(name), MHIMConfig(**VARIANTS[variant]), generator=gen())
    opt = torch.optim.Adam(mhim.trainable_parameters(), lr=2e-4, weight_decay=1e-5)
    mhim.train()
    t0 = {k: v.clone() for k, v in mhim.teacher.state_dict().items()}
    for step in range(3):
        loss, info = mhim.training_step(torch.randn(60, 64), torch.tensor([step % 2]), step, 3, ce)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mhim.after_optimizer_step(step, 3)
        assert torch.isfinite(loss), info
        assert info["n_masked"] > 0
        assert info["seq_len"] == 60 - info["n_masked"] + (2 if variant == "v2" else 0)
    assert any(not torch.equal(t0[k], v) for k, v in mhim.teacher.state_dict().items())
    mhim.eval()
    with torch.no_grad():
        out = mhim(torch.randn(40, 64))
    assert out.logits.shape == (1, 2)
    assert out.instance_scores.shape == (1, 40 + (2 if variant == "v2" else 0))


@pytest.mark.parametrize("name", REGISTRY_STUDENTS)
def test_student_init_fc_loads_exactly_the_embedding(name):
    torch.manual_seed(0)
    baseline = registry_student(name).eval()
    mhim = MHIM(registry_student(name))
    mhim.init_student_from(baseline.state_dict(), mode="fc")
    x = torch.randn(1, 9, 64)
    with torch.no_grad():
        assert torch.allclose(mhim.student.eval().embed(x), baseline.embed(x))
    assert not torch.equal(mhim.student.classifier.weight, baseline.classifier.weight)
    assert torch.equal(mhim.teacher.classifier.weight, mhim.student.classifier.weight)
