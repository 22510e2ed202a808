"""Pure evaluation (mil.evaluation): thresholds from validation, per-fold metrics of every task,
ensembles and the summary table, from prediction tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from extract.errors import ConfigError
from mil.evaluation import PROTOCOLS, ensemble_predictions, evaluate_predictions, format_table
from mil.metrics import binary_metrics, concordance_index, multiclass_metrics, youden_threshold

CLASSES = ["normal", "tumor"]


def _binary_table(rows: list[tuple[str, int, str, str, float]], seed=2021) -> pd.DataFrame:
    """(slide_id, fold, split, label, p_tumor) -> predictions table."""
    return pd.DataFrame(
        [{"slide_id": s, "seed": seed, "fold": f, "split": sp, "label": lab,
          "prob_normal": 1 - p, "prob_tumor": p} for s, f, sp, lab, p in rows])


def _two_folds() -> pd.DataFrame:
    """Fold 0: validation puts the Youden cut at 0.7; on test the best cut would be 0.35."""
    val0 = [("v0", "normal", 0.1), ("v1", "normal", 0.5), ("v2", "normal", 0.6),
            ("v3", "tumor", 0.7), ("v4", "tumor", 0.9)]
    test0 = [("t0", "normal", 0.1), ("t1", "normal", 0.3), ("t2", "tumor", 0.35),
             ("t3", "tumor", 0.4), ("t4", "tumor", 0.8), ("t5", "normal", 0.2)]
    val1 = [("w0", "normal", 0.2), ("w1", "tumor", 0.4), ("w2", "tumor", 0.8), ("w3", "normal", 0.3)]
    test1 = [("u0", "normal", 0.25), ("u1", "tumor", 0.45), ("u2", "tumor", 0.6), ("u3", "normal", 0.5),
             ("u4", "normal", 0.05)]
    rows = [(s, 0, "val", lab, p) for s, lab, p in val0] + [(s, 0, "test", lab, p) for s, lab, p in test0]
    rows += [(s, 1, "val", lab, p) for s, lab, p in val1] + [(s, 1, "test", lab, p) for s, lab, p in test1]
    return _binary_table(rows)


# -- pure: metrics from a predictions table -----------------------------------------------------

def test_threshold_comes_from_validation_not_test():
    pred = _two_folds()
    metrics, out = evaluate_predictions(pred, "classification", CLASSES, n_boot=200, threshold="youden")
    f0 = metrics["folds"][0]
    val = pred[(pred.fold == 0) & (pred.split == "val")]
    test = pred[(pred.fold == 0) & (pred.split == "test")]
    y_val, y_test = (val.label == "tumor").astype(int), (test.label == "tumor").astype(int)
    assert f0["threshold"] == youden_threshold(y_val, val.prob_tumor) == 0.7
    assert youden_threshold(y_test, test.prob_tumor) == 0.35  # what a test-tuned cut would be
    expected = binary_metrics(y_test, test.prob_tumor, 0.7)
    for k in ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity"):
        assert f0[k] == pytest.approx(expected[k], nan_ok=True)
    assert f0["sensitivity"] == pytest.approx(1 / 3) and f0["n_test"] == 6
    assert f0["threshold_from"].startswith("validation: Youden") and f0["threshold_rule"] == "youden"
    # decisions in the table use each fold's own validation threshold
    t = out[(out.fold == 0) & (out.split == "test")]
    assert t.prediction.tolist() == ["normal", "normal", "normal", "normal", "tumor", "normal"]
    assert metrics["protocol"] == PROTOCOLS["default"] and metrics["task"] == "classification"
    assert metrics["positive_class"] == "tumor"


def _cohort_fold(n_val_per_class: int, seed: int = 0) -> pd.DataFrame:
    """One fold whose validation cut (Youden) is far from 0.5: a model shifted towards 'tumor'."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("val", n_val_per_class), ("test", 40)):
        for k in range(2 * n):
            y = k % 2
            p = float(1 / (1 + np.exp(-(rng.normal(2.0 * y - 1.0, 1.0) + 2.0))))  # logit shifted by +2
            rows.append((f"{split}{k}", 0, split, CLASSES[y], p))
    return _binary_table(rows)


@pytest.mark.parametrize("n_per_class, rule", [(4, "argmax"), (9, "argmax"), (10, "youden"), (25, "youden")])
def test_auto_threshold_uses_youden_only_with_enough_validation_bags_of_each_class(n_per_class, rule):
    from mil.evaluation import MIN_PER_CLASS_FOR_YOUDEN

    assert MIN_PER_CLASS_FOR_YOUDEN == 10
    pred = _cohort_fold(n_per_class)
    metrics, out = evaluate_predictions(pred, "classification", CLASSES, n_boot=20)
    f0 = metrics["folds"][0]
    val = pred[pred.split == "val"]
    test = pred[pred.split == "test"]
    y_val, y_test = (val.label == "tumor").astype(int), (test.label == "tumor").astype(int)
    youden = youden_threshold(y_val, val.prob_tumor)
    assert f0["threshold_rule"] == rule
    assert f0["threshold"] == (youden if rule == "youden" else 0.5)
    assert (f0["n_threshold_set_pos"], f0["n_threshold_set_neg"]) == (n_per_class, n_per_class)
    # both families are reported whatever the rule, each equal to a direct computation
    for cut, name in ((0.5, "argmax"), (youden, "youden")):
        direct = binary_metrics(y_test, test.prob_tumor, cut)
        for k in ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity"):
            assert f0[f"{k}_at_{name}"] == pytest.approx(direct[k])
    assert f0["youden_threshold"] == youden
    assert f0["accuracy"] == f0[f"accuracy_at_{rule}"]
    assert metrics["threshold_setting"] == "auto" and ">= 10 positive" in metrics["threshold_rule"]
    assert "accuracy_at_argmax" in metrics["mean"] and "accuracy_at_youden" in metrics["mean"]
    t = out[out.split == "test"]
    assert ((t.prediction == "tumor") == (t.prob_tumor >= f0["threshold"])).all()


def test_threshold_rules_can_be_forced_and_bad_ones_are_refused():
    pred = _cohort_fold(4)
    metrics, _ = evaluate_predictions(pred, "classification", CLASSES, n_boot=20, threshold="youden")
    assert metrics["folds"][0]["threshold_rule"] == "youden"
    metrics, _ = evaluate_predictions(_cohort_fold(25), "classification", CLASSES, n_boot=20, threshold="argmax")
    assert metrics["folds"][0]["threshold"] == 0.5
    with pytest.raises(ConfigError, match="'threshold' parameter"):
        evaluate_predictions(pred, "classification", CLASSES, n_boot=20, threshold="best")


def test_paper_protocol_chooses_threshold_on_the_test_fold_and_says_so():
    metrics, _ = evaluate_predictions(_two_folds(), "classification", CLASSES, protocol="paper", n_boot=50)
    assert metrics["protocol"] == "paper (optimistic: threshold and model selection on the test fold)"
    assert metrics["folds"][0]["threshold"] == 0.35
    assert metrics["folds"][0]["sensitivity"] == 1.0
    assert "test fold" in metrics["folds"][0]["threshold_from"]


def test_mean_std_over_folds_and_bootstrap_intervals_contain_the_estimate():
    metrics, _ = evaluate_predictions(_two_folds(), "classification", CLASSES, n_boot=300)
    for k in ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity"):
        vals = [f[k] for f in metrics["folds"]]
        assert metrics["mean"][k] == pytest.approx(np.mean(vals))
        assert metrics["std"][k] == pytest.approx(np.std(vals, ddof=1))
        for f in metrics["folds"]:
            lo, hi = f[f"{k}_ci"]
            assert lo <= f[k] + 1e-12 and f[k] <= hi + 1e-12, (k, f[k], lo, hi)


def test_single_class_validation_falls_back_to_half_and_records_it(caplog):
    rows = [("v0", 0, "val", "normal", 0.2), ("v1", 0, "val", "normal", 0.4),
            ("t0", 0, "test", "normal", 0.3), ("t1", 0, "test", "tumor", 0.6)]
    metrics, _ = evaluate_predictions(_binary_table(rows), "classification", CLASSES, n_boot=20)
    assert metrics["folds"][0]["threshold"] == 0.5
    assert "one class" in metrics["folds"][0]["threshold_from"]
    assert "one class" in caplog.text


def test_multiclass_metrics_per_fold():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    rows = []
    for i in range(30):
        p = rng.dirichlet([1, 1, 1])
        rows.append({"slide_id": f"s{i}", "seed": 1, "fold": i % 2, "split": "test" if i % 3 else "val",
                     "label": classes[i % 3], **{f"prob_{c}": v for c, v in zip(classes, p)}})
    pred = pd.DataFrame(rows)
    metrics, out = evaluate_predictions(pred, "classification", classes, n_boot=100)
    assert metrics["kind"] == "multiclass"
    test = pred[(pred.fold == 0) & (pred.split == "test")]
    y = test.label.map(classes.index).to_numpy()
    m = multiclass_metrics(y, test[[f"prob_{c}" for c in classes]].to_numpy())
    f0 = metrics["folds"][0]
    for k in ("auc", "accuracy", "balanced_accuracy", "f1_macro", "kappa"):
        assert f0[k] == pytest.approx(m[k])
        lo, hi = f0[f"{k}_ci"]
        assert lo <= f0[k] + 1e-12 and f0[k] <= hi + 1e-12
    assert set(out.prediction) <= set(classes)


def test_survival_metrics_split_test_at_median_validation_risk():
    rng = np.random.default_rng(3)
    rows = []
    for f in (0, 1):
        for split, n in (("val", 9), ("test", 14)):
            for i in range(n):
                rows.append({"slide_id": f"f{f}{split}{i}", "seed": 7, "fold": f, "split": split,
                             "risk": rng.normal(), "time": rng.uniform(1, 50), "event": int(rng.integers(0, 2))})
    pred = pd.DataFrame(rows)
    pred.loc[pred.split == "test", "event"] = [1, 0] * 14
    metrics, out = evaluate_predictions(pred, "survival", None, n_boot=100)
    for k, f in enumerate(metrics["folds"]):
        val = pred[(pred.fold == k) & (pred.split == "val")]
        test = pred[(pred.fold == k) & (pred.split == "test")]
        assert f["risk_threshold"] == pytest.approx(np.median(val.risk))
        assert f["c_index"] == pytest.approx(concordance_index(test.time, test.event, test.risk))
        lo, hi = f["c_index_ci"]
        assert lo <= f["c_index"] <= hi
        groups = out[(out.fold == k) & (out.split == "test")].risk_group
        assert (groups == "high").tolist() == (test.risk > f["risk_threshold"]).tolist()
    assert metrics["km"]["n_high"] + metrics["km"]["n_low"] == 28
    assert 0 <= metrics["km"]["logrank_p"] <= 1


def test_ensemble_is_the_mean_over_models_with_mean_threshold():
    rows = []
    for f, ps in enumerate([(0.2, 0.9), (0.4, 0.5), (0.3, 0.7)]):
        for sid, p in zip(("a", "b"), ps):
            rows.append({"slide_id": sid, "seed": 1, "fold": f, "split": "external", "label": "tumor",
                         "prob_normal": 1 - p, "prob_tumor": p})
    ens = ensemble_predictions(pd.DataFrame(rows), "classification", CLASSES, [0.3, 0.5, 0.4])
    assert ens.slide_id.tolist() == ["a", "b"]
    np.testing.assert_allclose(ens.prob_tumor, [0.3, 0.7])
    assert ens.threshold.iloc[0] == pytest.approx(0.4)
    assert ens.prediction.tolist() == ["normal", "tumor"] and (ens.fold == "ensemble").all()
    assert (ens.n_models == 3).all()


def test_format_table_has_fold_rows_and_mean_std():
    metrics, _ = evaluate_predictions(_two_folds(), "classification", CLASSES, n_boot=20)
    text = format_table(metrics)
    lines = text.splitlines()
    assert "auc" in lines[1] and len(lines) == 2 + 2 + 1
    assert "±" in lines[-1] and "default" in lines[0]
