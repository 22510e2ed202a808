"""evaluate writes one GeoJSON per slide: patch tiles with per-fold instance scores, slide predictions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from extract.bags import read_bag
from extract.geojson import validate_feature_collection
from tests.helpers import PATCH0, write_cohort


def test_evaluate_exports_tiles_with_fold_scores_and_the_slide_prediction(binary_experiment):
    from pipeline.evaluate_stage import run_evaluation

    ws, features = binary_experiment["ws"], binary_experiment["features"]
    out = run_evaluation(ws, "exp", n_boot=20, device="cpu")
    pred = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str})
    test = pred[pred.split == "test"]
    files = sorted(p.stem for p in (out / "geojson").glob("*.geojson"))
    assert files == sorted(test.slide_id)
    for r in test.head(3).to_dict("records"):
        fc = json.loads((out / "geojson" / f"{r['slide_id']}.geojson").read_text())
        validate_feature_collection(fc, r["slide_id"])
        summary, tiles = fc["features"][0], fc["features"][1:]
        assert summary["properties"]["name"] == "Slide prediction"
        m = summary["properties"]["measurements"]
        assert abs(m[f"prob_tumor (fold {r['fold']})"] - r["prob_tumor"]) < 1e-6
        coords = read_bag(features / f"{r['slide_id']}.h5").coords
        assert len(tiles) == len(coords)
        first = np.asarray(tiles[0]["geometry"]["coordinates"][0])
        # a square of one patch, in level-0 pixels, at the bag's first coordinate
        assert (first[0] == coords[0]).all() and (first[2] == coords[0] + PATCH0).all()
        assert all(t["properties"]["objectType"] == "tile" for t in tiles)
        scores = [t["properties"]["measurements"][f"score fold {r['fold']}"] for t in tiles]
        assert np.isfinite(scores).all() and np.std(scores) > 0


def test_external_slides_get_every_fold_score_and_the_ensemble(binary_experiment):
    from pipeline.evaluate_stage import run_evaluation

    root, ws = binary_experiment["root"], binary_experiment["ws"]
    ext = root / "ext_geo"
    manifest = write_cohort(ext, ["g0", "g1"], ["tumor", "normal"], 7, ext / "features")
    out = run_evaluation(ws, "exp", manifest=manifest, features=ext / "features", n_boot=10, device="cpu")
    fc = json.loads((out / "geojson" / "g0.geojson").read_text())
    validate_feature_collection(fc)
    m = fc["features"][0]["properties"]["measurements"]
    assert {"prob_tumor (fold 0)", "prob_tumor (fold 1)", "prob_tumor (ensemble)"} <= set(m)
    assert set(fc["features"][1]["properties"]["measurements"]) == {"score fold 0", "score fold 1"}
