"""Predictions as GeoJSON for QuPath: one file per slide under ``<evaluation>/geojson/``.

Each patch is a square ``tile`` (level-0 pixels) whose measurements are its instance score from
every fold model that scored the slide (``score fold 0``, or ``score seed 2021 fold 0`` with
several seeds), so QuPath's *Measure > Show measurement maps* draws the attention heatmap on the
slide itself; one ``annotation`` named ``Slide prediction`` around all patches carries the slide
predictions (``prob_<class>`` or ``risk`` per fold model, and the ensemble's on an external set).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from extract.errors import PipelineError

log = logging.getLogger(__name__)

PREDICTION_CLASS = ("Prediction", (255, 140, 0))


def _unit_label(seed, fold, several_seeds: bool) -> str:
    if fold is None or fold == "" or (isinstance(fold, float) and math.isnan(fold)):
        return "ensemble"
    fold_text = f"fold {int(fold)}" if str(fold).lstrip("-").isdigit() else str(fold)
    seed_ok = seed is not None and seed != "" and not (isinstance(seed, float) and math.isnan(seed))
    return f"seed {int(seed)} {fold_text}" if several_seeds and seed_ok else fold_text


def slide_prediction_collection(coords: np.ndarray, patch_px_level0: float, fold_scores: dict[str, np.ndarray],
                                prediction: dict[str, float]) -> dict:
    """The FeatureCollection of one slide (module docstring); pure."""
    from extract.geojson import feature_collection, polygon_feature, tile_features

    coords = np.asarray(coords).reshape(-1, 2)
    tiles = tile_features(coords, patch_px_level0, fold_scores)
    x0, y0 = coords.min(axis=0)
    x1, y1 = coords.max(axis=0) + patch_px_level0
    box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    summary = polygon_feature(box, (), PREDICTION_CLASS, prediction, name="Slide prediction")
    return feature_collection([summary, *tiles])


def write_prediction_geojson(out_dir: Path, rows: pd.DataFrame, instance: dict[tuple, np.ndarray],
                             coords_of: Callable[[str], np.ndarray | None],
                             patch_px_of: Callable[[str, np.ndarray], float]) -> int:
    """Write ``out_dir/<slide_id>.geojson`` for every slide in ``rows``; returns how many.

    Parameters
    ----------
    rows : prediction rows (``slide_id``, ``seed``, ``fold``, ``prob_<class>`` or ``risk``), one
        per model that scored the slide; an ensemble row has an empty ``fold``.
    instance : ``(seed, fold, slide_id) -> [N]`` instance scores (seed ``None`` without seeds).
    coords_of : slide id -> ``[N, 2]`` level-0 patch corners of its bag (or None).
    patch_px_of : (slide id, coords) -> patch side in level-0 pixels.
    """
    from extract.geojson import write_geojson

    if rows is None or not len(rows):
        return 0
    value_cols = [c for c in rows.columns if c.startswith("prob_") or c == "risk"]
    seeds = {s for s in rows["seed"].tolist() if s is not None and s != "" and not (isinstance(s, float) and math.isnan(s))}
    several = len(seeds) > 1
    written = 0
    for sid, group in rows.groupby("slide_id", sort=False):
        coords = coords_of(sid)
        if coords is None or not len(coords):
            log.warning("GeoJSON of %s skipped: the bag has no patch coordinates", sid)
            continue
        scores: dict[str, np.ndarray] = {}
        prediction: dict[str, float] = {}
        for r in group.to_dict("records"):
            label = _unit_label(r.get("seed"), r.get("fold"), several)
            for c in value_cols:
                if r.get(c) is not None and not pd.isna(r.get(c)):
                    prediction[f"{c} ({label})"] = float(r[c])
            seed = r.get("seed")
            seed = None if seed in ("", None) or (isinstance(seed, float) and math.isnan(seed)) else int(seed)
            fold = str(r.get("fold"))
            s = instance.get((seed, int(fold), sid)) if fold.lstrip("-").isdigit() else None
            if s is not None and len(s) == len(coords):
                scores[f"score {label}"] = np.asarray(s, dtype=np.float64)
        try:
            patch_px_level0 = patch_px_of(sid, coords)
            write_geojson(Path(out_dir) / f"{sid}.geojson",
                          slide_prediction_collection(coords, patch_px_level0, scores, prediction))
            written += 1
        except PipelineError as exc:  # a file that cannot be written never loses the metrics
            log.warning("GeoJSON of %s skipped: %s", sid, str(exc).splitlines()[0])
    return written
