"""mil.trainer: real training on generated MIL bags stored as HDF5, checkpoints, exact resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.errors import CheckpointError, ConfigError
from mil.data import LabelMap, Targets, load_bags
from mil.checkpoints import load_student, read_checkpoint
from mil.inference import predict_bags
from mil.train_config import TrainConfig
from mil.trainer import EarlyStopping, train_fold
from tests.helpers import synthetic_bags, write_bags

MHIM = {"mask_ratio": 0.5, "mask_ratio_h": 0.01, "mask_ratio_hr": 0.5, "mrh_schedule": "cosine", "cl_alpha": 0.1}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread on a shared 2-core box


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """60 bags (80-160 instances, 32-d) as real HDF5 files; positives carry 1-3 % witnesses."""
    feats, labels = synthetic_bags(60, (80, 160), 32, witness_ratio=(0.01, 0.03), shift=5.0, seed=0)
    folder = write_bags(tmp_path_factory.mktemp("features"), feats, attrs={"backbone": "synthetic"})
    ids = list(feats)
    bags = load_bags(folder, ids)
    targets = Targets("classification", y=labels, labels=LabelMap(("0", "1")))
    split = {"train": ids[:40], "val": ids[40:], "test": []}
    return bags, targets, split


def config(**kw) -> TrainConfig:
    base = dict(model="abmil", epochs=5, lr=1e-3, patience=None, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_abmil_baseline_learns_and_writes_its_files(cohort, tmp_path):
    bags, targets, split = cohort
    res = train_fold(bags, split, config(), tmp_path / "fold_0", targets=targets, seed=1, fold=0)
    assert res.status == "done" and res.metric == "auc"
    assert res.best_value > 0.9, res
    for name in ("last.pt", "best.pt", "history.csv", "done.json"):
        assert (tmp_path / "fold_0" / name).is_file()
    rows = history(tmp_path / "fold_0" / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert {"train_loss", "train_ce", "train_cl", "train_aux", "kept_ratio", "val_auc", "val_loss", "seconds"} <= set(rows[0])
    assert float(rows[0]["kept_ratio"]) == 1.0
    done = json.loads((tmp_path / "fold_0" / "done.json").read_text())
    assert done["best_epoch"] == res.best_epoch and done["val_metrics"]["auc"] == res.best_value

    # best.pt is enough to rebuild the student for evaluation
    ckpt = read_checkpoint(tmp_path / "fold_0" / "best.pt")
    assert {"model", "model_kw", "in_dim", "n_classes", "task", "classes", "bin_edges", "student",
            "val_threshold", "config", "software"} <= set(ckpt)
    assert ckpt["epoch"] == res.best_epoch and ckpt["classes"] == ["0", "1"]
    model = load_student(tmp_path / "fold_0" / "best.pt")
    assert not model.training and model.wsi_meta["task"] == "classification"
    out = predict_bags(model, [(s, bags.host(s)) for s in split["val"][:3]], "cpu")
    assert [o["slide_id"] for o in out] == split["val"][:3]
    assert out[0]["prob"].shape == (2,) and math.isclose(float(out[0]["prob"].sum()), 1.0, rel_tol=1e-5)
    assert out[0]["instance_scores"].shape == (bags.n_instances(split["val"][0]),)
    assert out[0]["attention"].shape == out[0]["instance_scores"].shape
    # the same result through a BagSet
    again = predict_bags(model, bags.subset(split["val"][:3]), "cpu", instance_scores=False)
    np.testing.assert_allclose(again[2]["prob"], out[2]["prob"], rtol=1e-5)

    # a finished fold is skipped and left untouched
    stamp = (tmp_path / "fold_0" / "last.pt").stat().st_mtime_ns
    again = train_fold(bags, split, config(), tmp_path / "fold_0", targets=targets, seed=1, fold=0)
    assert again.status == "skipped" and again.best_epoch == res.best_epoch
    assert (tmp_path / "fold_0" / "last.pt").stat().st_mtime_ns == stamp
    # ... but never silently reused under other settings
    with pytest.raises(CheckpointError, match="other settings"):
        train_fold(bags, split, config(lr=5e-4), tmp_path / "fold_0", targets=targets, seed=1, fold=0)


def test_mhim_abmil_with_teacher_from_its_baseline_learns(cohort, tmp_path):
    bags, targets, split = cohort
    fold_dir = tmp_path / "fold_0"
    res = train_fold(bags, split, config(mhim=MHIM), fold_dir, targets=targets, seed=1, fold=0)
    assert res.baseline is not None and (fold_dir / "baseline" / "done.json").is_file()
    assert res.best_value > 0.9, res
    rows = history(fold_dir / "history.csv")
    assert all(0.4 < float(r["kept_ratio"]) < 0.6 for r in rows)  # r = 0.5 random masking + HAM
    assert all(float(r["train_cl"]) > 0 for r in rows)
    done = json.loads((fold_dir / "done.json").read_text())
    assert done["teacher_from"].endswith("baseline/best.pt")
    # the teacher started from the baseline's best student: after a few EMA steps it is still close
    teacher = read_checkpoint(fold_dir / "last.pt")["teacher"]
    base = read_checkpoint(fold_dir / "baseline" / "best.pt")["student"]
    assert all(torch.allclose(teacher[k], base[k], atol=0.05) for k in base)


class Kill(Exception):
    pass


def test_resume_after_a_kill_reaches_the_same_weights(cohort, tmp_path):
    bags, targets, split = cohort
    cfg = config(epochs=4, mhim=MHIM)
    ref = train_fold(bags, split, cfg, tmp_path / "ref", targets=targets, seed=3, fold=1)

    kills = {("baseline", 2), ("run", 3)}

    def hook(fold_dir, epoch, row):
        key = ("baseline" if fold_dir.name == "baseline" else "run", epoch)
        if key in kills:
            kills.discard(key)
            raise Kill(key)

    run = tmp_path / "run"
    with pytest.raises(Kill):  # killed in the teacher's baseline after epoch 2
        train_fold(bags, split, cfg, run, targets=targets, seed=3, fold=1, on_epoch_end=hook)
    with pytest.raises(CheckpointError, match="--resume"):  # no silent restart
        train_fold(bags, split, cfg, run, targets=targets, seed=3, fold=1)
    with pytest.raises(Kill):  # resumed, killed again in the MHIM run after epoch 3
        train_fold(bags, split, cfg, run, resume=True, targets=targets, seed=3, fold=1, on_epoch_end=hook)
    assert read_checkpoint(run / "last.pt")["epoch"] == 3 and not (run / "done.json").exists()
    res = train_fold(bags, split, cfg, run, resume=True, targets=targets, seed=3, fold=1, on_epoch_end=hook)

    for sub in ("baseline", ""):
        a, b = read_checkpoint(tmp_path / "ref" / sub / "last.pt"), read_checkpoint(run / sub / "last.pt")
        for key in ("student", "teacher"):
            if a[key] is None:
                continue
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), (sub, key, name)
        ha, hb = history(tmp_path / "ref" / sub / "history.csv"), history(run / sub / "history.csv")
        strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
        assert strip(ha) == strip(hb)
    assert res.best_epoch == ref.best_epoch and res.best_value == ref.best_value


def test_survival_task_trains_and_predicts_risks(cohort, tmp_path):
    bags, _, split = cohort
    rng = np.random.default_rng(0)
    ids = split["train"] + split["val"]
    time_ = {s: float(rng.uniform(1, 20)) for s in ids}
    event = {s: int(rng.random() < 0.7) for s in ids}
    targets = Targets("survival", time=time_, event=event)
    res = train_fold(bags, split, config(task="survival", epochs=2, model="meanpool"), tmp_path / "surv",
                     targets=targets, seed=0, fold=0)
    assert res.metric == "c_index" and 0.0 <= res.best_value <= 1.0
    ckpt = read_checkpoint(tmp_path / "surv" / "best.pt")
    assert ckpt["task"] == "survival" and ckpt["n_classes"] == 4 and len(ckpt["bin_edges"]) == 5
    out = predict_bags(load_student(tmp_path / "surv" / "best.pt"), bags.subset(split["val"][:2]), "cpu")
    assert isinstance(out[0]["risk"], float) and out[0]["survival"].shape == (4,)
    assert np.all(np.diff(out[0]["survival"]) <= 0)


def test_teacher_from_another_split_is_refused(cohort, tmp_path):
    bags, targets, split = cohort
    train_fold(bags, split, config(epochs=1), tmp_path / "base", targets=targets, seed=1, fold=0)
    other = {"train": split["train"][5:] + split["val"][:5], "val": split["val"][5:] + split["train"][:5], "test": []}
    cfg = config(epochs=1, mhim=MHIM, teacher_init=str(tmp_path / "base"))
    with pytest.raises(CheckpointError, match="another split"):
        train_fold(bags, other, cfg, tmp_path / "mhim", targets=targets, seed=1, fold=0)
    gated = config(epochs=1, mhim=MHIM, teacher_init=str(tmp_path / "base"), model_kw={"gated": False})
    with pytest.raises(CheckpointError, match="gated"):
        train_fold(bags, split, gated, tmp_path / "mhim2", targets=targets, seed=1, fold=0)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_student(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_student(tmp_path / "bad.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a wsi-pipeline checkpoint"):
        load_student(tmp_path / "foreign.pt")


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="The 'lr' parameter of TrainConfig must be a float > 0. Got 0"):
        TrainConfig(lr=0)
    with pytest.raises(ConfigError, match="'model' parameter.*abmil"):
        TrainConfig(model="resnet")
    with pytest.raises(ConfigError, match="mhim.mask_ratioo"):
        TrainConfig(mhim={"mask_ratioo": 0.5})
    with pytest.raises(ConfigError, match="mask_ratio"):
        TrainConfig(mhim={"mask_ratio": 1.5})
    with pytest.raises(ConfigError, match="student_init"):
        TrainConfig(student_init="fc")
    with pytest.raises(ConfigError, match="c_index"):
        TrainConfig(task="survival", selection="auc")
    assert TrainConfig(task="survival").selection_metric == "c_index"
    assert TrainConfig(mhim={}).baseline().mhim is None
    assert dataclasses.replace(TrainConfig(), epochs=3).epochs == 3


def test_early_stopping_counts_patience_after_min_epochs():
    stop = EarlyStopping(patience=2, min_epochs=5)
    scores = [0.6, 0.7, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6]
    stopped = None
    for epoch, s in enumerate(scores, start=1):
        stop.update(epoch, s, loss=1.0 / epoch)
        if stop.should_stop(epoch):
            stopped = epoch
            break
    # epoch 3 ties the AUC with a lower loss: it is the best; the counter runs from epoch 6 on
    assert stop.best_epoch == 3 and stopped == 7
    nan = EarlyStopping(patience=None)
    assert nan.update(1, float("nan"), 0.5) and nan.update(2, float("nan"), 0.4) and not nan.update(3, float("nan"), 0.6)


def test_grn_at_test_model_is_rebuilt_with_its_grn(cohort, tmp_path):
    bags, targets, split = cohort
    mhim = {"mask_score": "class_prob", "mask_ratio_h": 0.03, "grn": True, "keep_ratio": 0.8, "grn_tokens": 2,
            "grn_at_test": True}
    small = {"train": split["train"][:10], "val": split["val"][:6], "test": []}
    train_fold(bags, small, config(epochs=1, mhim=mhim, teacher_init="none"), tmp_path / "grn",
               targets=targets, seed=0, fold=0)
    assert read_checkpoint(tmp_path / "grn" / "best.pt")["grn"] is not None
    model = load_student(tmp_path / "grn" / "best.pt")
    assert model.grn is not None and model.wsi_meta["model"] == "abmil"
    (out,) = predict_bags(model, bags.subset(small["val"][:1]), "cpu")
    assert out["prob"].shape == (2,) and len(out["instance_scores"]) == bags.n_instances(small["val"][0])


def test_balanced_class_weights_change_the_loss_of_a_single_bag():
    import torch.nn.functional as F

    from mil.trainer import balanced_class_weights, weighted_cross_entropy

    weight = balanced_class_weights([0] * 8 + [1] * 2, 2)
    assert torch.allclose(weight, torch.tensor([10 / 16, 10 / 4]))
    logits = torch.tensor([[0.3, -0.2]])
    target = torch.tensor([1])
    plain = F.cross_entropy(logits, target)
    # the minority class's bag counts 2.5x: the weight survives a batch of one bag
    assert torch.allclose(weighted_cross_entropy(logits, target, weight), 2.5 * plain)
    assert torch.allclose(weighted_cross_entropy(logits, target, None), plain)
    with pytest.raises(ConfigError, match="class_weights"):
        TrainConfig(class_weights="inverse")


def test_standardized_features_are_learned_and_reapplied_at_inference(cohort, tmp_path):
    bags, targets, split = cohort
    # a large common offset and scale, as random-weight or some foundation-model features have
    from mil.data import BagSet

    shifted = BagSet({s: bags.host(s).float() * 7.0 + 40.0 for s in bags.slide_ids})
    mean, std = shifted.feature_stats(split["train"])
    train_x = torch.cat([shifted.host(s) for s in split["train"]])
    assert torch.allclose(mean, train_x.mean(0), atol=1e-3) and torch.allclose(std, train_x.std(0, unbiased=False), rtol=1e-3)

    res = train_fold(shifted, split, config(feature_norm="standardize"), tmp_path / "std", targets=targets, seed=1, fold=0)
    assert res.best_value > 0.9
    ckpt = read_checkpoint(tmp_path / "std" / "best.pt")
    assert len(ckpt["feature_mean"]) == 32 and ckpt["feature_mean"][0] == pytest.approx(float(mean[0]), rel=1e-5)

    # evaluate gets RAW bags: the loaded student standardizes them with the training statistics
    model = load_student(tmp_path / "std" / "best.pt")
    sid = split["val"][0]
    (raw,) = predict_bags(model, [(sid, shifted.get(sid))], "cpu")
    with torch.no_grad():
        manual = model(((shifted.get(sid) - mean) / std).unsqueeze(0)).logits[0].numpy()
    np.testing.assert_allclose(raw["logits"], manual, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="feature_norm"):
        TrainConfig(feature_norm="minmax")


def test_bf16_on_the_cpu_trains_under_bf16_autocast(cohort, tmp_path):
    """One autocast rule everywhere (extract.runtime.autocast_dtype): an explicit bf16 is honoured
    on the CPU too, as extraction does, instead of silently training in fp32."""
    bags, targets, split = cohort
    seen = set()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.add(o.dtype) if isinstance(m, torch.nn.Linear) and m.training else None)
    try:
        res = train_fold(bags, split, config(epochs=1, precision="bf16"), tmp_path / "fold_0", targets=targets)
    finally:
        handle.remove()
    assert res.status == "done" and math.isfinite(float(history(tmp_path / "fold_0" / "history.csv")[0]["train_loss"]))
    assert torch.bfloat16 in seen
