"""One bag per case (bag: case): grouping, per-slide mapping back, and the stages end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from extract.errors import ConfigError
from mil.cases import case_bags, expand_to_slides, group_cases, split_by_slide, survival_strata
from mil.data import BagSet
from pipeline.manifest import SlideRow
from tests.helpers import DIM, write_cohort


def _rows(spec):
    """(slide_id, case_id, label) -> manifest rows."""
    return [SlideRow(slide_id=s, line=i + 2, case_id=c, label=lab) for i, (s, c, lab) in enumerate(spec)]


def test_cases_concatenate_slides_in_manifest_order_and_map_back():
    rows = _rows([("a1", "A", "t"), ("b1", "B", "n"), ("a2", "A", "t"), ("a3", "A", "t")])
    case_rows, members = group_cases(rows, "classification")
    assert [r.slide_id for r in case_rows] == ["A", "B"] and members == {"A": ["a1", "a2", "a3"], "B": ["b1"]}
    feats = {s: torch.full((n, 4), float(i)) for i, (s, n) in enumerate([("a1", 3), ("b1", 2), ("a2", 1), ("a3", 4)])}
    coords = {s: np.arange(2 * len(t)).reshape(-1, 2) + 100 * i for i, (s, t) in enumerate(feats.items())}
    bags, spans = case_bags(BagSet(feats, coords), members)
    assert bags.n_instances("A") == 8 and bags.n_instances("B") == 2
    assert bags.host("A")[:, 0].tolist() == [0, 0, 0, 2, 3, 3, 3, 3]  # a1, a2, a3 in manifest order
    back = split_by_slide("A", np.arange(8), spans)
    assert {k: v.tolist() for k, v in back.items()} == {"a1": [0, 1, 2], "a2": [3], "a3": [4, 5, 6, 7]}
    items = expand_to_slides([{"slide_id": "A", "coords": bags.coords("A"), "scores": np.arange(8.0),
                               "title": "A"}], spans)
    assert [i["slide_id"] for i in items] == ["a1", "a2", "a3"]
    np.testing.assert_array_equal(items[2]["coords"], coords["a3"])


def test_a_case_whose_slides_disagree_is_named():
    rows = _rows([("a1", "A", "t"), ("a2", "A", "n"), ("b1", "B", "n")])
    with pytest.raises(ConfigError, match=r"1 case\(s\) disagree: A"):
        group_cases(rows, "classification")


def test_survival_strata_cross_time_bins_with_events():
    rows = [SlideRow(slide_id=f"c{i}", line=i, time=float(t), event=e)
            for i, (t, e) in enumerate([(1, 1), (2, 1), (3, 0), (4, 1), (5, 1), (6, 0), (7, 1), (8, 1)])]
    strata = survival_strata(rows, n_bins=2)
    # uncensored times 1,2,4,5,7,8: median cut 4.5
    assert strata == {"c0": "0|1", "c1": "0|1", "c2": "0|0", "c3": "0|1", "c4": "1|1", "c5": "1|0",
                      "c6": "1|1", "c7": "1|1"}


def _case_cohort(tmp_path, survival=False):
    """12 cases of 1-3 generated slides each (real SVS + HDF5 bags), case_id in the manifest."""
    ws = tmp_path / "ws"
    features = ws / "features" / "test_backbone" / "mpp0.50_64px"
    sizes = [1, 2, 3] * 4
    ids, case_of, labels, surv = [], {}, [], []
    rng = np.random.default_rng(0)
    for c, n in enumerate(sizes):
        t = float(rng.uniform(5, 60))
        for j in range(n):
            sid = f"c{c:02d}s{j}"
            ids.append(sid)
            case_of[sid] = f"case{c:02d}"
            labels.append("tumor" if c % 2 else "normal")
            surv.append((t, int(c % 3 != 0)))
    manifest = write_cohort(tmp_path, ids, None if survival else labels, 1, features,
                             survival=surv if survival else None)
    table = pd.read_csv(manifest, dtype=str)
    table.insert(1, "case_id", [case_of[s] for s in table.slide_id])
    table.to_csv(manifest, index=False)
    return ws, manifest, features, case_of


def test_case_bags_train_and_evaluate_one_prediction_per_case_with_per_slide_heatmaps(tmp_path):
    from mil.train_config import TrainConfig
    from pipeline.evaluate_stage import run_evaluation
    from pipeline.train_stage import run_training

    ws, manifest, features, case_of = _case_cohort(tmp_path)
    config = TrainConfig(model="abmil", model_kw={"embed_dim": 16, "attn_dim": 8}, epochs=2, folds=3, lr=1e-2,
                         seeds=(0,), device="cpu", patience=None, val_ratio=0.3, bag="case")
    exp = run_training(manifest, ws, features, config, "cases", progress=False)
    splits = pd.read_csv(exp / "splits.csv", dtype=str)
    assert set(splits.slide_id) == set(case_of.values())  # the units are cases
    spans = pd.read_csv(exp / "bags.csv", dtype={"case_id": str, "slide_id": str})
    assert list(spans.slide_id) == [s for s in case_of]  # every slide, manifest order within its case
    out = run_evaluation(ws, "cases", heatmaps="all", n_boot=20, device="cpu")
    pred = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str})
    test = pred[pred.split == "test"]
    assert sorted(test.slide_id) == sorted(set(case_of.values()))  # one prediction per case
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(f["n_test"] for f in metrics["folds"]) == 12
    drawn = {p.stem for p in (out / "heatmaps").glob("*.png") if not p.stem.endswith("_gallery")}
    assert drawn == set(case_of)  # one heatmap per SLIDE of every test case


def test_survival_per_case_c_index_counts_cases(tmp_path):
    from mil.metrics import concordance_index
    from mil.train_config import TrainConfig
    from pipeline.evaluate_stage import run_evaluation
    from pipeline.train_stage import run_training

    ws, manifest, features, case_of = _case_cohort(tmp_path, survival=True)
    config = TrainConfig(model="meanpool", task="survival", n_bins=2, epochs=2, folds=2, lr=1e-2, seeds=(0,),
                         device="cpu", patience=None, val_ratio=0.3, bag="case")
    run_training(manifest, ws, features, config, "surv_cases", progress=False)
    out = run_evaluation(ws, "surv_cases", n_boot=20, device="cpu")
    pred = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str})
    metrics = json.loads((out / "metrics.json").read_text())
    for f in metrics["folds"]:
        test = pred[(pred.fold == f["fold"]) & (pred.split == "test")]
        assert set(test.slide_id) <= set(case_of.values()) and f["n_test"] == len(test)
        assert f["c_index"] == pytest.approx(concordance_index(test.time, test.event, test.risk))
    assert sum(f["n_test"] for f in metrics["folds"]) == 12
    assert DIM == 8
