"""MHIM-MIL's own TransMIL student (transmil_mhim) against the official v1 construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mil.mhim import MHIM
from mil.train_config import MHIMConfig
from mil.models import count_parameters, create_model
from mil.models.nystrom import newton_schulz_pinv
from mil.models.transmil_mhim import ppeg_unpadded


@pytest.mark.parametrize("name", ["transmil", "transmil_mhim"])
def test_exact_parameter_counts(name):
    # official v1 SAttention + patch_to_emb + predictor: the paper's 2.67M, for both variants
    assert count_parameters(create_model(name, 1024, 2)) == 2_672_146


def test_student_differs_from_standalone_as_the_official_code():
    torch.manual_seed(0)
    mhim_student = create_model("transmil_mhim", 1024, 2)
    standalone = create_model("transmil", 1024, 2)
    drop = [m for m in mhim_student.feature if isinstance(m, torch.nn.Dropout)]
    assert len(drop) == 1 and drop[0].p == 0.25
    assert not any(isinstance(m, torch.nn.Dropout) for m in standalone.feature)
    assert 0.8 < float(mhim_student.cls_token.detach().std()) < 1.2  # randn
    assert float(standalone.cls_token.detach().abs().max()) < 1e-4

    # layer 1 sees the class token + the N instances, never a square-padded sequence
    seen = []
    mhim_student.layer1.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    mhim_student.eval()
    out = mhim_student(torch.randn(37, 1024))
    assert seen == [38]
    assert out.extras["head_scores"].shape == (1, 8, 37) and out.instance_scores.shape == (1, 37)


def test_ppeg_pads_internally_to_at_least_seven_by_seven_and_strips_it():
    torch.manual_seed(0)
    model = create_model("transmil_mhim", 16, 2, embed_dim=16, heads=2)
    tokens = torch.randn(1, 5, 16)
    # direct: repeat the first 4 tokens to fill 3x3, zero-pad to 7x7, convolve, cut back to 5
    x = torch.cat([tokens, tokens[:, :4], torch.zeros(1, 49 - 9, 16)], dim=1)
    grid = x.transpose(1, 2).reshape(1, 16, 7, 7)
    p = model.ppeg
    expect = (grid + p.proj7(grid) + p.proj5(grid) + p.proj3(grid)).flatten(2).transpose(1, 2)[:, :5]
    torch.testing.assert_close(ppeg_unpadded(p, tokens), expect)
    big = torch.randn(1, 70, 16)  # 9x9 square: no zero padding, 11 repeats
    assert ppeg_unpadded(p, big).shape == (1, 70, 16)


def _nystrom_cls_row(model, h: torch.Tensor) -> torch.Tensor:
    """Layer 1's Nystrom class-token row over the instances, written out: [heads, N]."""
    attn = model.layer1.attn
    x = torch.cat([model.cls_token, h], dim=1)
    z = model.layer1.norm(x)
    n, m = z.shape[1], attn.num_landmarks
    pad = (-n) % m
    z = F.pad(z, (0, 0, pad, 0))
    q, k, _ = attn.qkv(z)
    g = (n + pad) // m
    ql = q.reshape(1, attn.heads, m, g, -1).mean(3)
    kl = k.reshape(1, attn.heads, m, g, -1).mean(3)
    k1 = (q @ kl.transpose(-1, -2)).softmax(-1)
    k2 = (ql @ kl.transpose(-1, -2)).softmax(-1)
    k3 = (ql @ k.transpose(-1, -2)).softmax(-1)
    row = (k1[:, :, pad : pad + 1] @ newton_schulz_pinv(k2, attn.pinv_iterations)) @ k3
    return row[0, :, 0, pad + 1 :]


def _vote(head_scores: np.ndarray, k: int, largest: bool) -> set[int]:
    """Each head votes for its top (bottom) k; the k with most votes, ties by mean rank."""
    s = head_scores if largest else -head_scores
    heads, n = s.shape
    votes = np.zeros(n)
    for row in s:
        votes[np.argsort(-row, kind="stable")[:k]] += 1
    mean_rank = np.mean([np.argsort(np.argsort(row)) for row in s], axis=0)
    order = np.lexsort((-mean_rank, -votes))
    return set(order[:k].tolist())


def test_masked_set_is_the_head_vote_over_the_nystrom_class_token_row():
    torch.manual_seed(3)
    n, dim = 90, 32
    student = create_model("transmil_mhim", dim, 2, embed_dim=32, heads=4, num_landmarks=16)
    cfg = MHIMConfig(mask_ratio=0.0, mask_ratio_h=0.1, mask_ratio_hr=None, mask_ratio_l=0.3,
                     mrh_schedule="none", teacher_train_mode=False, cl_alpha=0.1)
    mhim = MHIM(student, cfg)
    teacher = mhim.teacher
    with torch.no_grad():
        for p in teacher.parameters():  # a teacher different from the student
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, n, dim)
    seen = []
    hook = mhim.student.feature.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().clone()))
    mhim.train()
    mhim.training_step(x, torch.tensor([1]), 0, 10, lambda logits, y: F.cross_entropy(logits, y))
    hook.remove()
    kept_rows = seen[0][0]
    kept = {int(torch.nonzero((x[0] == r).all(1))[0]) for r in kept_rows}
    masked = set(range(n)) - kept

    teacher.eval()
    with torch.no_grad():
        row = _nystrom_cls_row(teacher, teacher.embed(x)).numpy()
        out = teacher(x)
    np.testing.assert_allclose(out.extras["head_scores"][0].numpy(), row, rtol=1e-4, atol=1e-6)
    high = _vote(row, math.ceil(n * 0.1), largest=True)
    low = _vote(row, math.ceil(n * 0.3), largest=False)
    assert masked == high | low
    assert len(high) == 9 and len(low) == 27
    # the vote is what decides: a fused-then-ranked score would mask a different set here
    fused = out.instance_scores[0].numpy()
    by_fused = set(np.argsort(-fused)[:9].tolist()) | set(np.argsort(fused)[:27].tolist())
    assert masked != by_fused
