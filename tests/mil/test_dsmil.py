"""DSMIL as the official MHIM-MIL code predicts with it (v1 and v2) and its consistency loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mil.mhim import MHIM
from mil.train_config import MHIMConfig
from mil.models import count_parameters, create_model
from mil.inference import predict_bags


@pytest.mark.parametrize("prediction", ["v1", "v2"])
def test_exact_parameter_count(prediction):
    # official modules/datten.py DSMIL + patch_to_emb + predictor-free bag classifier (Conv1d)
    assert count_parameters(create_model("dsmil", 1024, 2, prediction=prediction)) == 872_708


def test_v1_reports_the_mean_of_bag_and_max_instance_softmaxes():
    torch.manual_seed(0)
    model = create_model("dsmil", 32, 2).eval()
    bags = [(f"b{i}", torch.randn(20 + i, 32)) for i in range(3)]
    rows = predict_bags(model, bags, "cpu", task="classification")
    for (sid, x), row in zip(bags, rows):
        with torch.no_grad():
            out = model(x)
        expect = 0.5 * out.extras["bag_logits"].softmax(-1) + 0.5 * out.extras["max_instance_logits"].softmax(-1)
        assert row["prob"] == pytest.approx(expect[0].numpy(), abs=1e-6)
        assert row["prob"] != pytest.approx(out.logits.softmax(-1)[0].numpy(), abs=1e-4)  # not the bag stream alone
        # training: 0.5 CE(bag) + 0.5 CE(max instance)
        y = torch.tensor([1])
        loss = model.training_loss(out, y, F.cross_entropy(out.logits, y))
        direct = 0.5 * F.cross_entropy(out.extras["bag_logits"], y) + 0.5 * F.cross_entropy(
            out.extras["max_instance_logits"], y)
        assert float(loss) == pytest.approx(float(direct), rel=1e-6)


def test_v2_trains_and_evaluates_on_the_averaged_logits():
    torch.manual_seed(0)
    model = create_model("dsmil", 32, 2, prediction="v2").eval()
    x = torch.randn(25, 32)
    with torch.no_grad():
        out = model(x)
    avg = 0.5 * (out.extras["bag_logits"] + out.extras["max_instance_logits"])
    torch.testing.assert_close(out.logits, avg)
    y = torch.tensor([0])
    ce = F.cross_entropy(out.logits, y)
    assert float(model.training_loss(out, y, ce)) == pytest.approx(float(ce))
    row = predict_bags(model, [("b", x)], "cpu", task="classification")[0]
    assert row["prob"] == pytest.approx(avg.softmax(-1)[0].numpy(), abs=1e-6)


def test_consistency_loss_is_per_class_softmax_averaged_over_classes():
    torch.manual_seed(1)
    student = create_model("dsmil", 32, 2)
    cfg = MHIMConfig(mask_ratio=0.0, mask_ratio_h=0.0, cl_alpha=0.5, teacher_train_mode=False)
    mhim = MHIM(student, cfg)
    with torch.no_grad():
        for p in mhim.teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mhim.eval()  # deterministic student too: no dropout, so the direct computation matches
    x = torch.randn(1, 30, 32)
    _, info = mhim.training_step(x, torch.tensor([1]), 0, 10, lambda lg, y: F.cross_entropy(lg, y))
    with torch.no_grad():
        s = mhim.student(x).bag_feature.reshape(1, 2, -1)
        t = mhim.teacher(x).bag_feature.reshape(1, 2, -1)
    per_class = torch.sum(-F.softmax(t / 0.1, -1) * F.log_softmax(s, -1), dim=-1)  # [1, C]
    assert float(info["cl"]) == pytest.approx(float(per_class.mean()), rel=1e-5)
    flat = torch.sum(-F.softmax(t.flatten(1) / 0.1, -1) * F.log_softmax(s.flatten(1), -1), -1)
    assert float(info["cl"]) != pytest.approx(float(flat.mean()), rel=1e-3)

