"""evaluate reports the MHIM teacher (EMA model) next to the student, as the official code logs it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from mil.checkpoints import load_student
from mil.inference import predict_bags
from tests.helpers import binary_cohort


def test_teacher_is_scored_next_to_the_student(tmp_path):
    from mil.data import load_bags
    from mil.metrics import binary_metrics
    from mil.train_config import TrainConfig
    from pipeline.evaluate_stage import run_evaluation
    from pipeline.train_stage import run_training

    ws, features, manifest, ids, labels = binary_cohort(tmp_path, 12)
    config = TrainConfig(model="abmil", model_kw={"embed_dim": 16, "attn_dim": 8}, epochs=2, folds=2, lr=1e-2,
                         seeds=(0,), device="cpu", patience=None, val_ratio=0.3,
                         mhim={"mask_ratio": 0.5, "teacher_momentum": 0.5}, teacher_init="auto")
    exp = run_training(manifest, ws, features, config, "mhim", progress=False)
    out = run_evaluation(ws, "mhim", n_boot=20, device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["teacher"]["folds"]) == 2 and "auc" in metrics["teacher"]["mean"]
    # the teacher's fold AUC is its own model's, computed directly
    splits = pd.read_csv(exp / "splits.csv", dtype={"slide_id": str})
    test = splits[(splits.fold == 0) & (splits.split == "test")].slide_id.tolist()
    teacher = load_student(exp / "fold_0" / "best.pt", which="teacher")
    student = load_student(exp / "fold_0" / "best.pt")
    assert any(not torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values()))
    bags = load_bags(features, test)
    rows = predict_bags(teacher, bags, "cpu", task="classification")
    y = [labels[ids.index(r["slide_id"])] == "tumor" for r in rows]
    auc = binary_metrics([int(v) for v in y], [r["prob"][1] for r in rows], 0.5)["auc"]
    assert metrics["teacher"]["folds"][0]["auc"] == pytest.approx(auc, abs=1e-6)
    # a baseline checkpoint has no teacher, and says so
    from extract.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no MHIM teacher"):
        load_student(exp / "fold_0" / "baseline" / "best.pt", which="teacher")
