"""The evaluate stage end to end on really trained experiments (the pure metrics: tests/mil/test_evaluation.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from extract.errors import CheckpointError, ConfigError
from mil.metrics import binary_metrics, concordance_index, multiclass_metrics, youden_threshold
from mil.evaluation import PROTOCOLS
from pipeline.evaluate_stage import parse_heatmaps
from tests.helpers import PATCH0, write_cohort

def test_parse_heatmaps():
    assert parse_heatmaps(None) == 0 and parse_heatmaps("3") == 3 and parse_heatmaps("all") is None
    with pytest.raises(ConfigError, match="heatmaps"):
        parse_heatmaps("some")


@pytest.mark.parametrize("bad, message", [({"threshold": "test"}, "'threshold' parameter"),
                                          ({"protocol": "papers"}, "'protocol' parameter must be one of default, paper"),
                                          ({"heatmap_mode": "hot"}, "'heatmap_mode' parameter must be one of absolute, rank")])
def test_evaluate_config_names_the_valid_choices(bad, message):
    from pipeline.evaluate_stage import EvaluateConfig

    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(**bad)


# -- end to end: a really trained tiny experiment -----------------------------------------------

def _read_outputs(out_dir: Path) -> tuple[dict, pd.DataFrame]:
    metrics = json.loads((out_dir / "metrics.json").read_text())
    pred = pd.read_csv(out_dir / "predictions.csv", dtype={"slide_id": str, "label": str})
    return metrics, pred


def test_evaluate_binary_metrics_match_saved_predictions(binary_experiment):
    from pipeline.evaluate_stage import run_evaluation

    ws = binary_experiment["ws"]
    out = run_evaluation(ws, "exp", heatmaps=2, n_boot=200, device="cpu")
    assert out == ws / "experiments" / "exp" / "evaluation"
    metrics, pred = _read_outputs(out)
    assert metrics["protocol"] == PROTOCOLS["default"] and metrics["task"] == "classification"
    assert set(metrics) >= {"folds", "mean", "std", "protocol", "task"}
    assert list(pred.columns[:5]) == ["slide_id", "seed", "fold", "split", "label"]
    assert {"prob_normal", "prob_tumor", "prediction", "protocol"} <= set(pred.columns)
    splits = pd.read_csv(ws / "experiments" / "exp" / "splits.csv", dtype={"slide_id": str})
    assert len(metrics["folds"]) == 2
    for f in metrics["folds"]:
        assert set(f) >= {"fold", "seed", "auc", "auc_ci", "accuracy", "balanced_accuracy", "f1", "sensitivity",
                          "specificity", "threshold", "n_test"}
        rows = pred[(pred.fold == f["fold"]) & (pred.seed == f["seed"])]
        val, test = rows[rows.split == "val"], rows[rows.split == "test"]
        expect = splits[(splits.fold == f["fold"])]
        assert sorted(test.slide_id) == sorted(expect[expect.split == "test"].slide_id)
        assert sorted(val.slide_id) == sorted(expect[expect.split == "val"].slide_id)
        y_val, y_test = (val.label == "tumor").astype(int), (test.label == "tumor").astype(int)
        # the auto rule: Youden needs >= 10 validation slides of each class (this cohort has fewer)
        enough = y_val.nunique() == 2 and min(y_val.sum(), (1 - y_val).sum()) >= 10
        thr = youden_threshold(y_val, val.prob_tumor) if enough else 0.5
        assert f["threshold_rule"] == ("youden" if enough else "argmax")
        if math.isinf(thr):  # JSON has no infinity: null, and the reason is recorded
            assert f["threshold"] is None and "chance" in f["threshold_from"]
        else:
            assert f["threshold"] == pytest.approx(thr, rel=1e-6)
        m = binary_metrics(y_test, test.prob_tumor, thr)
        for k in ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity"):
            if m[k] is None or (isinstance(m[k], float) and math.isnan(m[k])):
                assert f[k] is None
            else:
                assert f[k] == pytest.approx(m[k], abs=1e-6)
                lo, hi = f[f"{k}_ci"]
                assert lo - 1e-9 <= f[k] <= hi + 1e-9
        assert f["n_test"] == len(test)
        np.testing.assert_allclose(test.prob_tumor + test.prob_normal, 1.0, atol=1e-6)
        assert (test.prediction == np.where(test.prob_tumor >= thr, "tumor", "normal")).all()
    aucs = [f["auc"] for f in metrics["folds"]]
    assert metrics["mean"]["auc"] == pytest.approx(np.mean(aucs)) and metrics["std"]["auc"] == pytest.approx(np.std(aucs, ddof=1))

    import cv2

    roc = cv2.imread(str(out / "roc.png"))
    assert roc is not None and roc.shape[0] > 200
    # heatmaps: the two test slides with the highest tumour probability, with a gallery each
    test = pred[pred.split == "test"].sort_values("prob_tumor", ascending=False)
    top2 = test.slide_id.tolist()[:2]
    names = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert names == sorted([f"{s}.png" for s in top2] + [f"{s}_gallery.png" for s in top2])
    assert (out / "evaluate_config.yaml").is_file()


def test_instance_scores_behind_every_test_slide_and_absolute_heatmaps(binary_experiment):
    """Every test slide's HDF5 matches predictions.csv and its bag; the absolute heatmaps colour
    each patch from those values on one range for every slide, so a normal slide stays cooler."""
    import h5py

    from extract.bags import read_bag
    from extract.slide import Slide
    from pipeline.heatmaps import ALPHA_FLOOR, _colormap
    from pipeline.evaluate_stage import run_evaluation
    from tests.helpers import panel_box, read_png

    ws, features = binary_experiment["ws"], binary_experiment["features"]
    out = run_evaluation(ws, "exp", heatmaps="all", n_boot=10, device="cpu")
    _, pred = _read_outputs(out)
    test = pred[pred.split == "test"]
    assert sorted(p.stem for p in (out / "instance_scores").glob("*.h5")) == sorted(test.slide_id)
    peak = {}
    for r in test.itertuples():
        with h5py.File(out / "instance_scores" / f"{r.slide_id}.h5", "r") as f:
            coords = f["coords"][:]
            np.testing.assert_array_equal(coords, read_bag(features / f"{r.slide_id}.h5").coords)
            assert f["coords"].attrs["patch_size_level0"] == PATCH0 and f["coords"].attrs["target_mpp"] == 0.5
            assert list(f) == ["coords", f"fold_{r.fold}"]  # the one fold model that tested it
            g = f[f"fold_{r.fold}"]
            assert g.attrs["prob_tumor"] == pytest.approx(r.prob_tumor, rel=1e-6) and g.attrs["split"] == "test"
            assert g.attrs["prediction"] == r.prediction
            raw, absolute = g["instance_scores"][:], g["absolute"][:]
            assert raw.shape == absolute.shape == (len(coords),)
            np.testing.assert_allclose(absolute, r.prob_tumor * np.exp(raw - raw.max()), rtol=1e-5, atol=1e-7)
            peak[r.slide_id] = (float(absolute.max()), coords[int(np.argmax(absolute))], r.label)
    tumour = max((v for v in peak.values() if v[2] == "tumor"), key=lambda v: v[0])
    normal = min((v for v in peak.values() if v[2] == "normal"), key=lambda v: v[0])
    assert normal[0] < 0.5 * tumour[0]  # the hottest patch of a normal slide is clearly cooler

    # the pictures: the hottest patch's pixel is the value's colour on the range [0, 1]
    lut = _colormap("viridis").astype(float)
    for sid, (value, (x, y), _) in ((s, peak[s]) for s in peak if peak[s] in (tumour, normal)):
        heat = read_png(out / "heatmaps" / f"{sid}.png")
        px, py, pw, ph = panel_box(heat)
        with Slide(binary_experiment["root"] / "slides" / f"{sid}.svs") as slide:
            W, H = slide.dimensions
            tissue = slide.read_region((int(x) + 16, int(y) + 16), 0, (32, 32)).reshape(-1, 3).mean(0)
        cx, cy = (x + PATCH0 / 2) * pw / W, (y + PATCH0 / 2) * ph / H
        alpha = 0.6 * (ALPHA_FLOOR + (1 - ALPHA_FLOOR) * value)  # the colour range is [0, 1] for every slide
        expected = (1 - alpha) * tissue + alpha * lut[int(round(value * 255))]
        np.testing.assert_allclose(heat[py + int(cy), px + int(cx)], expected, atol=8)


def test_cli_paper_protocol_is_labelled_and_kept_apart(binary_experiment, capsys):
    from pipeline.cli import main

    ws = binary_experiment["ws"]
    code = main(["evaluate", "--experiment", "exp", "--workspace", str(ws), "--protocol", "paper",
                 "--device", "cpu", "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "paper (optimistic" in printed and "mean±std" in printed
    out = ws / "experiments" / "exp" / "evaluation_paper"
    metrics, pred = _read_outputs(out)
    assert metrics["protocol"] == "paper (optimistic: threshold and model selection on the test fold)"
    assert (pred.protocol == metrics["protocol"]).all()
    assert set(pred.split) == {"test"}
    for f in metrics["folds"]:
        test = pred[pred.fold == f["fold"]]
        y = (test.label == "tumor").astype(int)
        if y.nunique() == 2:
            assert f["threshold"] == pytest.approx(youden_threshold(y, test.prob_tumor), rel=1e-6)


def test_missing_fold_is_a_clear_error(binary_experiment, tmp_path):
    import shutil

    from pipeline.cli import main
    from pipeline.evaluate_stage import run_evaluation

    ws = tmp_path / "ws"
    shutil.copytree(binary_experiment["ws"] / "experiments", ws / "experiments")
    (ws / "experiments" / "exp" / "fold_1" / "best.pt").unlink()
    with pytest.raises(CheckpointError, match=r"fold 1.*wsi-pipeline train --experiment exp --resume"):
        run_evaluation(ws, "exp", device="cpu")
    assert main(["evaluate", "--experiment", "exp", "--workspace", str(ws), "-q"]) == 2
    # best.pt is there but the fold never finished (killed mid-training): refused as well
    shutil.copy(ws / "experiments" / "exp" / "fold_0" / "best.pt", ws / "experiments" / "exp" / "fold_1" / "best.pt")
    (ws / "experiments" / "exp" / "fold_1" / "done.json").unlink()
    with pytest.raises(CheckpointError, match=r"fold 1 \(unfinished.*--resume"):
        run_evaluation(ws, "exp", device="cpu")
    with pytest.raises(CheckpointError, match="no such experiment"):
        run_evaluation(ws, "nope")


def test_experiment_trained_with_paper_protocol_is_never_labelled_default(binary_experiment, tmp_path):
    import shutil

    import yaml

    from pipeline.evaluate_stage import run_evaluation

    ws = tmp_path / "ws"
    shutil.copytree(binary_experiment["ws"] / "experiments", ws / "experiments")
    config_path = ws / "experiments" / "exp" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["train"]["protocol"] = "paper"
    config_path.write_text(yaml.safe_dump(config))
    out = run_evaluation(ws, "exp", n_boot=10, device="cpu")
    assert out.name == "evaluation_paper"
    assert json.loads((out / "metrics.json").read_text())["protocol"].startswith("paper (optimistic")


def test_external_manifest_is_scored_by_every_fold_and_ensembled(binary_experiment):
    from pipeline.evaluate_stage import run_evaluation

    root, ws = binary_experiment["root"], binary_experiment["ws"]
    ext_root = root / "external"
    ids = [f"x{i}" for i in range(6)]
    labels = ["tumor", "normal"] * 3
    ext_features = ext_root / "features"
    manifest = write_cohort(ext_root, ids, labels, 5, ext_features)
    internal, _ = _read_outputs(ws / "experiments" / "exp" / "evaluation") if (
        ws / "experiments" / "exp" / "evaluation" / "metrics.json").is_file() else (None, None)
    out = run_evaluation(ws, "exp", manifest=manifest, features=ext_features, n_boot=100, device="cpu", heatmaps=1)
    assert out == ws / "experiments" / "exp" / "evaluation" / "external_manifest"
    metrics, pred = _read_outputs(out)
    per_model = pred[pred.fold.astype(str) != "ensemble"]
    ens = pred[pred.fold.astype(str) == "ensemble"].set_index("slide_id")
    assert sorted(ens.index) == ids and len(per_model) == 2 * len(ids)
    mean = per_model.groupby("slide_id").prob_tumor.mean()
    np.testing.assert_allclose(ens.loc[mean.index, "prob_tumor"], mean, rtol=1e-6)
    thr = metrics["ensemble_threshold"]
    assert thr == pytest.approx(np.mean([t for t in metrics["fold_thresholds"] if t is not None]))
    if internal is not None:
        assert metrics["fold_thresholds"] == [f["threshold"] for f in internal["folds"]]
    e = metrics["ensemble"]
    m = binary_metrics((ens.label == "tumor").astype(int), ens.prob_tumor, thr)
    assert e["auc"] == pytest.approx(m["auc"]) and e["accuracy"] == pytest.approx(m["accuracy"])
    assert metrics["protocol"] == PROTOCOLS["default"] and len(metrics["folds"]) == 2
    assert (out / "roc.png").is_file() and len(list((out / "heatmaps").glob("*.png"))) == 2
    import h5py

    for sid in ids:  # every external slide: each fold model's scores and the ensemble drawn in its heatmap
        with h5py.File(out / "instance_scores" / f"{sid}.h5", "r") as f:
            assert sorted(f) == ["coords", "ensemble", "fold_0", "fold_1"]
            np.testing.assert_allclose(f["ensemble/absolute"][:], (f["fold_0/absolute"][:] + f["fold_1/absolute"][:]) / 2,
                                       rtol=1e-5, atol=1e-7)
            assert f["ensemble"].attrs["prob_tumor"] == pytest.approx(ens.loc[sid, "prob_tumor"], rel=1e-6)

    # an external set without labels: predictions only
    nolab = ext_root / "nolabel.csv"
    nolab.write_text("slide_id,path\n" + "\n".join(f"{s},slides/{s}.svs" for s in ids) + "\n")
    out2 = run_evaluation(ws, "exp", manifest=nolab, features=ext_features, n_boot=10, device="cpu")
    metrics2, pred2 = _read_outputs(out2)
    assert out2.name == "external_nolabel" and metrics2["labelled"] is False and metrics2["ensemble"] is None
    assert len(pred2) == 3 * len(ids) and not (out2 / "roc.png").exists()


@pytest.fixture(scope="module")
def survival_experiment(tmp_path_factory):
    """18 slides with times and events, 2 seeds x 2 folds, 2 epochs."""
    from mil.train_config import TrainConfig
    from pipeline.train_stage import run_training

    root = tmp_path_factory.mktemp("survival")
    ws = root / "ws"
    features = ws / "features" / "test_backbone" / "mpp0.50_64px"
    rng = np.random.default_rng(4)
    ids = [f"p{i:02d}" for i in range(18)]
    surv = [(float(rng.uniform(2, 60)), int(i % 3 != 0)) for i in range(18)]
    manifest = write_cohort(root, ids, None, 1, features, survival=surv)
    config = TrainConfig(model="abmil", model_kw={"embed_dim": 16, "attn_dim": 8}, task="survival", n_bins=2,
                         epochs=2, folds=2, seeds=(0, 1), device="cpu", mhim=None, patience=None, val_ratio=0.3)
    run_training(manifest, ws, features, config, "surv", progress=False)
    return {"ws": ws}


def test_evaluate_survival_cindex_km_and_median_validation_split(survival_experiment):
    from pipeline.evaluate_stage import run_evaluation

    ws = survival_experiment["ws"]
    out = run_evaluation(ws, "surv", n_boot=100, device="cpu", heatmaps=1)
    metrics, pred = _read_outputs(out)
    assert metrics["task"] == "survival" and len(metrics["folds"]) == 4
    assert (ws / "experiments" / "surv" / "seed_1" / "fold_1" / "best.pt").is_file()
    assert {"risk", "surv_bin_0", "surv_bin_1", "time", "event", "risk_group"} <= set(pred.columns)
    for f in metrics["folds"]:
        rows = pred[(pred.fold == f["fold"]) & (pred.seed == f["seed"])]
        val, test = rows[rows.split == "val"], rows[rows.split == "test"]
        assert f["risk_threshold"] == pytest.approx(np.median(val.risk), rel=1e-6)
        c = concordance_index(test.time, test.event, test.risk)
        assert f["c_index"] == pytest.approx(c, abs=1e-9)
        assert (test.risk_group == np.where(test.risk > f["risk_threshold"], "high", "low")).all()
    assert metrics["mean"]["c_index"] == pytest.approx(np.mean([f["c_index"] for f in metrics["folds"]]))
    km = metrics["km"]
    assert km["seed"] == 0 and km["n_high"] + km["n_low"] == 18
    assert (out / "km.png").is_file() and not (out / "roc.png").exists()
    assert len(list((out / "heatmaps").glob("*.png"))) == 2


def test_evaluate_multiclass_experiment(tmp_path):
    from mil.train_config import TrainConfig
    from pipeline.evaluate_stage import run_evaluation
    from pipeline.train_stage import run_training

    ws = tmp_path / "ws"
    features = ws / "features" / "test_backbone" / "mpp0.50_64px"
    ids = [f"m{i:02d}" for i in range(15)]
    labels = [("luad", "lusc", "meso")[i % 3] for i in range(15)]
    manifest = write_cohort(tmp_path, ids, labels, 2, features)
    config = TrainConfig(model="abmil", model_kw={"embed_dim": 16, "attn_dim": 8}, epochs=2, folds=2, lr=1e-2,
                         seeds=(0,), device="cpu", mhim=None, patience=None, val_ratio=0.3)
    run_training(manifest, ws, features, config, "mc", progress=False)
    out = run_evaluation(ws, "mc", n_boot=50, device="cpu", heatmaps="all")
    metrics, pred = _read_outputs(out)
    assert metrics["kind"] == "multiclass" and metrics["classes"] == ["luad", "lusc", "meso"]
    for f in metrics["folds"]:
        test = pred[(pred.fold == f["fold"]) & (pred.split == "test")]
        cols = ["prob_luad", "prob_lusc", "prob_meso"]
        m = multiclass_metrics(test.label.map(metrics["classes"].index), test[cols].to_numpy())
        for k in ("auc", "accuracy", "balanced_accuracy", "f1_macro", "kappa"):
            assert f[k] == pytest.approx(m[k], abs=1e-6, nan_ok=True) if f[k] is not None else math.isnan(m[k])
        assert (test.prediction == np.array(metrics["classes"])[test[cols].to_numpy().argmax(1)]).all()
    n_test = int((pred.split == "test").sum())
    assert len(list((out / "heatmaps").glob("*_gallery.png"))) == n_test
    assert not (out / "roc.png").exists()


def test_heatmap_of_a_moved_slide_is_skipped_and_the_metrics_are_still_reported(binary_experiment, tmp_path, capsys):
    import shutil

    from pipeline.cli import main

    ws = tmp_path / "ws"
    shutil.copytree(binary_experiment["ws"] / "experiments", ws / "experiments")
    moved = tmp_path / "moved.csv"  # same slides and labels, files no longer where the manifest says
    lines = binary_experiment["manifest"].read_text().splitlines()
    moved.write_text("\n".join([lines[0]] + [l.replace("slides/", "gone/") for l in lines[1:]]) + "\n")
    code = main(["evaluate", "--experiment", "exp", "--workspace", str(ws), "--manifest", str(moved),
                 "--heatmaps", "2", "--device", "cpu", "-q"])
    assert code == 0
    captured = capsys.readouterr()
    assert "mean±std" in captured.out and "metrics:" in captured.out
    assert captured.err.count("heatmap of ") == 2 and "file not found" in captured.err
    assert (ws / "experiments" / "exp" / "evaluation" / "metrics.json").is_file()


def test_evaluate_mistakes_say_what_to_do(binary_experiment, tmp_path, capsys):
    from pipeline.cli import main

    ws = binary_experiment["ws"]
    assert main(["evaluate", "--experiment", "exp", "--workspace", str(tmp_path / "elsewhere"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "no experiments under" in err and "check --workspace" in err
    assert main(["evaluate", "--experiment", "exq", "--workspace", str(ws), "-q"]) == 2
    assert "no such experiment; pick one of exp" in capsys.readouterr().err
    missing = tmp_path / "missing.csv"
    assert main(["evaluate", "--experiment", "exp", "--workspace", str(ws), "--manifest", str(missing), "-q"]) == 2
    assert f"{missing}: manifest not found; pass an existing CSV with --manifest" in capsys.readouterr().err
