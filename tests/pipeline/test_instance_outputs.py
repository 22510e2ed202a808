"""Per-patch outputs of evaluate: which slides are drawn, what the title says, case bags split
back to their slides, ensembles, and the instance-score file written from them."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from mil.cases import Span
from pipeline.instance_outputs import collect_slides, heatmap_rows, slide_title, write_instance_file

CLASSES = ["normal", "tumor"]


def _rows(values: dict[str, float], fold=0, seed=2021) -> pd.DataFrame:
    return pd.DataFrame([{"slide_id": s, "seed": seed, "fold": fold, "split": "test", "label": "tumor",
                          "prob_normal": 1 - p, "prob_tumor": p, "prediction": "tumor"} for s, p in values.items()])


def test_heatmaps_go_to_the_most_positive_slides_first_and_titles_name_fold_and_model():
    rows = _rows({"a": 0.2, "b": 0.9, "c": 0.6})
    assert [r["slide_id"] for r in heatmap_rows(rows, 2, "classification", CLASSES)] == ["b", "c"]
    assert len(heatmap_rows(rows, None, "classification", CLASSES)) == 3
    title = slide_title(rows.iloc[1].to_dict(), "classification", CLASSES, "abmil (MHIM student)")
    first, second = title.split("\n")
    assert first == "b  label tumor  p(tumor) 0.900"
    assert second == "fold 0 (seed 2021), model abmil (MHIM student)"
    ens = {"slide_id": "b", "seed": "", "fold": "ensemble", "label": "tumor", "prob_tumor": 0.7, "n_models": 3}
    assert slide_title(ens, "classification", CLASSES, "abmil").endswith("ensemble of 3 fold models, model abmil")


def test_case_bags_are_split_back_to_slides_with_attention_relative_to_the_case():
    rows = _rows({"case1": 0.8})
    raw = np.array([0.0, 2.0, 1.0, 2.0, -1.0])  # slide x: rows 0-2, slide y: rows 3-4
    coords = np.arange(10).reshape(5, 2) * 64
    spans = [Span("case1", "x", 0, 3), Span("case1", "y", 3, 5)]
    slides = collect_slides(rows, {(2021, 0, "case1"): raw}, {"case1": coords}.get, "classification", CLASSES, spans)
    assert sorted(slides) == ["x", "y"]
    y = slides["y"]
    assert y.case_id == "case1" and y.units[(2021, 0)]["row"]["slide_id"] == "y"
    np.testing.assert_array_equal(y.coords, coords[3:])
    np.testing.assert_allclose(y.units[(2021, 0)]["absolute"], 0.8 * np.exp(raw[3:] - 2.0))


def test_ensemble_and_file_hold_what_the_ensemble_heatmap_draws(tmp_path):
    a, b = np.array([0.0, 1.0, 3.0]), np.array([2.0, 0.0, 1.0])
    rows = pd.concat([_rows({"s": 0.6}, fold=0), _rows({"s": 0.2}, fold=1),
                      pd.DataFrame([{"slide_id": "s", "seed": "", "fold": "ensemble", "split": "external",
                                     "prob_normal": 0.6, "prob_tumor": 0.4, "n_models": 2}])], ignore_index=True)
    coords = np.array([[0, 0], [64, 0], [128, 0]])
    slides = collect_slides(rows, {(2021, 0, "s"): a, (2021, 1, "s"): b}, {"s": coords}.get, "classification",
                            CLASSES, ensemble_of={"s": [(2021, 0), (2021, 1)]})
    ens = slides["s"].units[(None, "ensemble")]
    np.testing.assert_allclose(ens["absolute"], (0.6 * np.exp(a - 3) + 0.2 * np.exp(b - 2)) / 2)
    np.testing.assert_allclose(ens["rank"], [0.5, 0.25, 0.75])  # mean of the two models' rank percentiles
    path = tmp_path / "s.h5"
    write_instance_file(path, slides["s"], {"patch_size_level0": 64.0, "slide_mpp": 0.25},
                        {(2021, 0): "fold_0", (2021, 1): "fold_1"}, "classification", CLASSES)
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["coords", "ensemble", "fold_0", "fold_1"]
        assert f["coords"].attrs["slide_mpp"] == 0.25 and f["coords"].attrs["patch_size_level0"] == 64.0
        np.testing.assert_allclose(f["fold_1/instance_scores"][:], b)
        np.testing.assert_allclose(f["ensemble/absolute"][:], ens["absolute"], rtol=1e-6)
        assert f["fold_0"].attrs["prob_tumor"] == pytest.approx(0.6)
    assert not list(tmp_path.glob(".*")), "temporary files left behind"
