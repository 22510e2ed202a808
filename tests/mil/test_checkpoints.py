"""Official MHIM-MIL checkpoints (written here in the official layout) load into our teacher."""

from __future__ import annotations

import pytest
import torch

from extract.errors import CheckpointError
from mil.checkpoints import from_official_layout, is_official_layout
from mil.mhim import MHIM
from mil.train_config import MHIMConfig
from mil.models import create_model


def _official_abmil(gated: bool, gen: torch.Generator) -> dict:
    """The key layout of the official v1 MHIM(baseline='attn') state dict (released C16 teachers:
    patch_to_emb.0, online_encoder.attention.attention.{0,2}, predictor; no attention biases)."""
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    sd = {"patch_to_emb.0.weight": r(512, 1024), "patch_to_emb.0.bias": r(512)}
    if gated:
        sd.update({"online_encoder.attention.attention_a.0.weight": r(128, 512),
                   "online_encoder.attention.attention_b.0.weight": r(128, 512),
                   "online_encoder.attention.attention_c.weight": r(1, 128)})
    else:
        sd.update({"online_encoder.attention.attention.0.weight": r(128, 512),
                   "online_encoder.attention.attention.2.weight": r(1, 128)})
    sd.update({"predictor.weight": r(2, 512), "predictor.bias": r(2)})
    return sd


def _official_transmil(gen: torch.Generator) -> dict:
    """Official v1 MHIM(baseline='selfattn'): SAttention under online_encoder, PPEG as pos_embedding."""
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    sd = {"patch_to_emb.0.weight": r(512, 1024), "patch_to_emb.0.bias": r(512),
          "online_encoder.cls_token": r(1, 1, 512)}
    for layer in ("layer1", "layer2"):
        p = f"online_encoder.{layer}."
        sd.update({p + "norm.weight": r(512), p + "norm.bias": r(512), p + "attn.to_qkv.weight": r(1536, 512),
                   p + "attn.to_out.0.weight": r(512, 512), p + "attn.to_out.0.bias": r(512),
                   p + "attn.res_conv.weight": r(8, 1, 33, 1)})
    for name, k in (("proj", 7), ("proj1", 5), ("proj2", 3)):
        sd[f"online_encoder.pos_embedding.{name}.weight"] = r(512, 1, k, k)
        sd[f"online_encoder.pos_embedding.{name}.bias"] = r(512)
    sd.update({"online_encoder.norm.weight": r(512), "online_encoder.norm.bias": r(512),
               "predictor.weight": r(2, 512), "predictor.bias": r(2)})
    return sd


def _official_dsmil(gen: torch.Generator) -> dict:
    """Official v1 MHIM(baseline='dsmil'): datten.DSMIL under online_encoder (no predictor)."""
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    p = "online_encoder."
    return {"patch_to_emb.0.weight": r(512, 1024), "patch_to_emb.0.bias": r(512),
            p + "i_classifier.0.weight": r(2, 512), p + "i_classifier.0.bias": r(2),
            p + "b_classifier.q.0.weight": r(128, 512), p + "b_classifier.q.0.bias": r(128),
            p + "b_classifier.q.2.weight": r(128, 128), p + "b_classifier.q.2.bias": r(128),
            p + "b_classifier.v.1.weight": r(512, 512), p + "b_classifier.v.1.bias": r(512),
            p + "b_classifier.fcc.weight": r(2, 2, 512), p + "b_classifier.fcc.bias": r(2)}


CASES = {
    "abmil": (dict(gated=False), lambda g: _official_abmil(False, g)),
    "abmil_gated": (dict(gated=True), lambda g: _official_abmil(True, g)),
    "transmil_mhim": ({}, _official_transmil),
    "dsmil": ({}, _official_dsmil),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_official_checkpoint_loads_into_the_teacher_with_every_tensor(case, tmp_path):
    kw, make = CASES[case]
    name = case.replace("_gated", "")
    official = make(torch.Generator().manual_seed(0))
    path = tmp_path / "fold_0_model_best_auc.pt"
    torch.save(official, path)  # the released files are plain state dicts like this one
    loaded = torch.load(path, weights_only=True)
    assert is_official_layout(loaded)
    student = create_model(name, 1024, 2, **kw)
    mhim = MHIM(student, MHIMConfig())
    mhim.init_teacher_from(loaded)
    ours = mhim.teacher.state_dict()
    assert len(ours) == len(official)  # every official tensor has one place, every place is filled
    mapped = from_official_layout(official)
    for key, value in ours.items():
        torch.testing.assert_close(value, mapped[key].reshape(value.shape))
    torch.testing.assert_close(ours["feature.0.weight"], official["patch_to_emb.0.weight"])
    if name == "dsmil":  # Conv1d(C, C, 512) on the C class vectors == Linear(C*512, C) on their concat
        torch.testing.assert_close(ours["classifier.weight"], official["online_encoder.b_classifier.fcc.weight"].reshape(2, -1))
        bag = torch.randn(1, 2, 512)
        conv = torch.nn.functional.conv1d(bag, official["online_encoder.b_classifier.fcc.weight"],
                                          official["online_encoder.b_classifier.fcc.bias"]).view(1, -1)
        torch.testing.assert_close(mhim.teacher.classifier(bag.flatten(1)), conv)
    # the student's embedding from the same file (student_init: fc)
    mhim.init_student_from({"model": official}, mode="fc")
    torch.testing.assert_close(mhim.student.feature[0].weight, official["patch_to_emb.0.weight"])


def test_a_checkpoint_of_another_architecture_fails_naming_the_unmatched_keys():
    gated_file = _official_abmil(True, torch.Generator().manual_seed(0))
    mhim = MHIM(create_model("abmil", 1024, 2, gated=False), MHIMConfig())
    with pytest.raises(CheckpointError) as err:
        mhim.init_teacher_from(gated_file)
    msg = str(err.value)
    assert "unexpected: attention.branch_b.0.weight" in msg  # the gated branch has no place here
    # a tensor the map does not know stays under its official name and is named
    odd = _official_abmil(False, torch.Generator().manual_seed(0))
    odd["online_encoder.attention.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"online_encoder\.attention\.extra\.weight"):
        mhim.init_teacher_from(odd)
    # a missing tensor is named too
    short = _official_abmil(False, torch.Generator().manual_seed(0))
    del short["predictor.bias"]
    with pytest.raises(CheckpointError, match=r"missing: classifier\.bias"):
        mhim.init_teacher_from(short)


def test_our_own_state_dicts_pass_unchanged():
    sd = create_model("abmil", 64, 2).state_dict()
    assert not is_official_layout(sd)
    assert from_official_layout(sd).keys() == sd.keys()


def test_teacher_init_finds_a_released_teacher_folder(tmp_path):
    from mil.checkpoints import teacher_source
    from mil.train_config import TrainConfig

    folder = tmp_path / "c16_3fold_init_abmil_seed2021"
    folder.mkdir()
    for k in range(3):
        torch.save(_official_abmil(False, torch.Generator().manual_seed(k)), folder / f"fold_{k}_model_best_auc.pt")
    cfg = TrainConfig(model="abmil", model_kw={"gated": False}, mhim={}, teacher_init=str(folder))
    assert teacher_source(cfg, tmp_path / "fold_1", 2021, 1) == folder / "fold_1_model_best_auc.pt"
