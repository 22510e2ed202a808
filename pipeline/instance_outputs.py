"""What ``evaluate`` writes per patch: instance-score HDF5 files, heatmaps and QuPath GeoJSON.

Every test slide (every slide of an external set) gets ``<evaluation>/instance_scores/<slide_id>.h5``
with the data behind its heatmap, so localisation can be checked against annotations:

    coords                   int64 [N, 2]  level-0 (x, y) of each patch's top-left corner
        attrs: patch_size_level0 (level-0 px), patch_size and patch_level (the bag's tiling),
               slide_mpp (um per level-0 px), target_mpp, slide_id, case_id (bag: case)
    <fold folder>/           one group per fold model, named like its folder: fold_0 or seed_1/fold_0
        instance_scores      float32 [N]  the student's raw instance scores (attention logits for AB-MIL)
        absolute             float32 [N]  the absolute heatmap value in [0, 1] (pipeline.heatmaps.absolute_scores)
        attrs: split, bag_weight, prob_<class> or risk, prediction
    ensemble/                external sets: the mean over fold models of ``absolute`` and of the rank
        absolute, rank       float32 [N]  percentiles (``rank``), as drawn in the ensemble's heatmap
    attrs (file): format_version, task, classes, absolute_value (what ``absolute`` means)

Instance scores of a case bag (``bag: case``) are split back to its slides; the attention is
relative to the case's most-attended patch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from extract.errors import BagError, ConfigError, PipelineError

from .workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "SlideInstances", "bag_weight", "weight_label", "collect_slides",
           "write_instance_file", "patch_geometry", "heatmap_rows", "draw_heatmaps", "write_geojson_files",
           "write_instance_outputs"]

FORMAT_VERSION = 1


@dataclass
class SlideInstances:
    """One slide's patches and the per-model values drawn on them.

    ``units`` maps a model key ``(seed, fold)`` (``fold = 'ensemble'`` for an ensemble) to
    ``{'raw': [N], 'absolute': [N], 'rank': [N] (ensemble), 'row': prediction row}``.
    """

    slide_id: str
    case_id: str
    coords: np.ndarray | None
    units: dict[tuple, dict] = field(default_factory=dict)


def _key(seed: Any, fold: Any) -> tuple:
    """``(seed or None, int fold or 'ensemble')`` from a predictions-table row."""
    seed = None if seed in ("", None) or (isinstance(seed, float) and math.isnan(seed)) else int(seed)
    fold = str(fold)
    return seed, (int(fold) if fold.lstrip("-").isdigit() else fold)


def bag_weight(row: Mapping[str, Any], task: str, classes: Sequence[str] | None,
               risk_range: tuple[float, float] | None = None) -> float:
    """The slide-level factor of the absolute heatmap, in ``[0, 1]``.

    Binary: the probability of the positive (second) class; multi-class: the probability of the
    predicted class; survival: the risk scaled to ``risk_range`` (the experiment's lowest and
    highest risk over the slides drawn), clipped.
    """
    if task == "survival":
        lo, hi = risk_range if risk_range is not None else (0.0, 1.0)
        return float(np.clip((float(row["risk"]) - lo) / (hi - lo), 0.0, 1.0)) if hi > lo else 1.0
    if len(classes) == 2:
        return float(np.clip(row[f"prob_{classes[1]}"], 0.0, 1.0))
    return float(np.clip(max(float(row[f"prob_{c}"]) for c in classes), 0.0, 1.0))


def weight_label(task: str, classes: Sequence[str] | None) -> str:
    """The colour bar's label of the absolute mode."""
    what = ("risk (scaled to the experiment's range)" if task == "survival"
            else f"p({classes[1]})" if len(classes) == 2 else "p(predicted class)")
    return f"{what} x attention / slide's max attention"


def collect_slides(rows: pd.DataFrame, instance: Mapping[tuple, np.ndarray], coords_of: Callable[[str], Any],
                   task: str, classes: Sequence[str] | None, spans: Sequence[Any] | None = None,
                   ensemble_of: Mapping[str, Sequence[tuple]] | None = None) -> dict[str, SlideInstances]:
    """Per-slide instance values of the scored bags.

    Parameters
    ----------
    rows : prediction rows of the bags to report (``slide_id`` = bag id: a slide, or a case
        with ``spans``), one per model; ensemble rows have ``fold == 'ensemble'``.
    instance : ``(seed, fold, bag_id) -> [N]`` raw instance scores of each fold model.
    coords_of : bag id -> ``[N, 2]`` level-0 coordinates (or None).
    spans : :class:`mil.cases.Span` of every slide of every case (``bag: case``), else None.
    ensemble_of : for ensemble rows, bag id -> the ``(seed, fold)`` keys averaged.
    """
    from .heatmaps import absolute_scores, rank_normalize

    risk_range = None
    if task == "survival" and len(rows):
        risks = rows["risk"].to_numpy(float)
        risk_range = (float(np.min(risks)), float(np.max(risks)))
    per_bag: dict[str, dict[tuple, dict]] = {}
    for r in rows.to_dict("records"):
        seed, fold = _key(r.get("seed"), r.get("fold"))
        bag = r["slide_id"]
        if fold == "ensemble":
            continue
        raw = instance.get((seed, fold, bag))
        if raw is None:
            continue
        raw = np.asarray(raw, dtype=np.float64).reshape(-1)
        weight = bag_weight(r, task, classes, risk_range)
        per_bag.setdefault(bag, {})[(seed, fold)] = {"raw": raw, "absolute": absolute_scores(raw, weight),
                                                     "rank": rank_normalize(raw), "row": r}
    for r in rows.to_dict("records"):
        if _key(r.get("seed"), r.get("fold"))[1] != "ensemble":
            continue
        members = [per_bag.get(r["slide_id"], {}).get(k) for k in (ensemble_of or {}).get(r["slide_id"], ())]
        members = [m for m in members if m is not None]
        if members:
            per_bag[r["slide_id"]][(None, "ensemble")] = {
                "absolute": np.mean([m["absolute"] for m in members], axis=0),
                "rank": np.mean([m["rank"] for m in members], axis=0), "row": r}
    out: dict[str, SlideInstances] = {}
    for bag, units in per_bag.items():
        coords = coords_of(bag)
        slices = [(bag, slice(None))] if spans is None else [
            (sp.slide_id, slice(sp.start, sp.stop)) for sp in spans if sp.case_id == bag]
        for sid, sl in slices:
            out[sid] = SlideInstances(
                sid, bag, None if coords is None else np.asarray(coords)[sl],
                {k: {**{n: v[sl] for n, v in u.items() if n != "row"}, "row": {**u["row"], "slide_id": sid}}
                 for k, u in units.items()})
    return out


def patch_geometry(attrs: dict[str, Any], coords_path: Path | None, slide_id: str,
                   coords: np.ndarray) -> dict[str, Any]:
    """Patch size and resolution of a slide's bag: ``patch_size_level0`` (level-0 px) always,
    ``patch_size``, ``patch_level``, ``slide_mpp``, ``target_mpp`` where recorded.

    Read from the bag's attributes ``attrs`` (:meth:`mil.data.BagSet.attrs`), else the segment
    stage's coords file, else the patch grid of ``coords`` (with a warning).
    """
    geo = {k: attrs[k] for k in ("patch_size_level0", "patch_size", "patch_level", "slide_mpp", "target_mpp")
           if k in attrs and attrs[k] is not None}
    if geo.get("patch_size_level0") is None and coords_path is not None and coords_path.is_file():
        from extract.coords_file import read_coords

        _, cattrs = read_coords(coords_path)
        for k in ("patch_size", "patch_level", "slide_mpp", "target_mpp"):
            if cattrs.get(k) is not None:
                geo.setdefault(k, cattrs[k])
        if cattrs.get("patch_size_level0") is not None:
            geo["patch_size_level0"] = cattrs["patch_size_level0"]
        elif cattrs.get("patch_size") is not None and cattrs.get("downsample") is not None:
            ds = np.asarray(cattrs["downsample"], dtype=float).reshape(-1)
            geo["patch_size_level0"] = float(cattrs["patch_size"]) * float(ds[0])
    if geo.get("patch_size_level0") is None:
        steps = np.diff(np.unique(coords[:, 0])) if len(coords) > 1 else np.array([])
        steps = steps[steps > 0]
        if not len(steps):
            raise BagError(f"{slide_id}: the bag has no 'patch_size_level0' attribute, no coords file at "
                           f"{coords_path}, and too few patches to infer the grid; re-extract the bag with "
                           "wsi-pipeline")
        geo["patch_size_level0"] = float(steps.min())
        log.warning("%s: patch size not recorded; using the grid step %.0f level-0 px", slide_id,
                    geo["patch_size_level0"])
    geo["patch_size_level0"] = float(geo["patch_size_level0"])
    if geo.get("slide_mpp") is not None and float(geo["slide_mpp"]) <= 0:  # -1: not recorded
        del geo["slide_mpp"]
    return geo


def write_instance_file(path: Path, slide: SlideInstances, geometry: Mapping[str, Any],
                        group_of: Mapping[tuple, str], task: str, classes: Sequence[str] | None) -> None:
    """``path``: the instance-score HDF5 of one slide (module docstring), built in memory and
    written atomically (:func:`extract.runtime.atomic_write`: temporary file, fsync, rename)."""
    import io

    import h5py

    from extract.runtime import atomic_write

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs.update(format_version=FORMAT_VERSION, task=task, slide_id=slide.slide_id,
                       absolute_value=weight_label(task, classes))
        if classes:
            f.attrs["classes"] = [str(c) for c in classes]
        coords = np.zeros((0, 2), np.int64) if slide.coords is None else np.asarray(slide.coords, np.int64)
        d = f.create_dataset("coords", data=coords)
        d.attrs.update({k: v for k, v in geometry.items() if v is not None})
        d.attrs["slide_id"] = slide.slide_id
        if slide.case_id != slide.slide_id:
            d.attrs["case_id"] = slide.case_id
        for key, unit in slide.units.items():
            g = f.create_group("ensemble" if key[1] == "ensemble" else group_of[key])
            if "raw" in unit:
                g.create_dataset("instance_scores", data=unit["raw"].astype(np.float32))
            else:
                g.create_dataset("rank", data=unit["rank"].astype(np.float32))
            g.create_dataset("absolute", data=unit["absolute"].astype(np.float32))
            row = unit["row"]
            g.attrs["split"] = str(row.get("split", ""))
            for c, v in row.items():
                if (c.startswith("prob_") or c in ("risk", "prediction", "risk_group")) and v is not None \
                        and not (isinstance(v, float) and math.isnan(v)):
                    g.attrs[c] = v
    atomic_write(path, lambda out: out.write(buffer.getvalue()))


def heatmap_rows(rows: pd.DataFrame, n: int | None, task: str, classes: Sequence[str] | None) -> list[dict]:
    """The rows whose slides get a heatmap: the ``n`` (None = all) with the highest positive
    probability (multi-class: highest class probability; survival: risk) first."""
    def order(r: Mapping[str, Any]) -> float:
        if task == "survival":
            return float(r["risk"])
        if len(classes) == 2:
            return float(r[f"prob_{classes[1]}"])
        return max(float(r[f"prob_{c}"]) for c in classes)

    ordered = sorted(rows.to_dict("records"), key=lambda r: -order(r))
    return ordered if n is None else ordered[:n]


def slide_title(row: Mapping[str, Any], task: str, classes: Sequence[str] | None, model: str) -> str:
    """Two lines: the slide, its truth and prediction; the fold (or ensemble) and the model."""
    sid = row["slide_id"]
    if task == "survival":
        parts = [sid, f"risk {row['risk']:.3f}"]
        if row.get("time") is not None and not pd.isna(row.get("time")):
            parts.append(f"time {row['time']:g} event {int(row['event'])}")
        first = "  ".join(parts)
    else:
        label = row.get("label")
        label = "?" if label is None or (isinstance(label, float) and math.isnan(label)) else label
        if len(classes) == 2:
            first = f"{sid}  label {label}  p({classes[1]}) {row[f'prob_{classes[1]}']:.3f}"
        else:
            best = max(classes, key=lambda c: row[f"prob_{c}"])
            first = f"{sid}  label {label}  predicted {best} p {row[f'prob_{best}']:.3f}"
    seed, fold = _key(row.get("seed"), row.get("fold"))
    who = (f"ensemble of {int(row['n_models'])} fold models" if fold == "ensemble" and "n_models" in row
           else "ensemble" if fold == "ensemble"
           else f"fold {fold}" + (f" (seed {seed})" if seed is not None else ""))
    return f"{first}\n{who}, model {model}"


def draw_heatmaps(slides: Mapping[str, SlideInstances], chosen: Sequence[dict], out_dir: Path, manifest,
                  geometry_of: Callable[[str, np.ndarray], Mapping[str, Any]], *, task: str,
                  classes: Sequence[str] | None, model: str, mode: str, cmap: str, k: int, tag: str) -> list[Path]:
    """``out_dir/heatmaps/<slide_id>.png`` and ``_gallery.png`` for the bags of ``chosen`` rows
    (each slide of a chosen case), in ``mode`` 'absolute' or 'rank'; a slide that cannot be drawn
    is skipped with a warning (the metrics never depend on a picture)."""
    from .heatmaps import write_slide_heatmaps

    if manifest is None:
        raise ConfigError("heatmaps need the slides: pass --manifest with a 'path' column")
    paths = manifest.by_id()
    written: list[Path] = []
    for r in chosen:
        key = _key(r.get("seed"), r.get("fold"))
        key = (None, "ensemble") if key[1] == "ensemble" else key
        for slide in (s for s in slides.values() if s.case_id == r["slide_id"]):
            sid = slide.slide_id
            mrow = paths.get(sid)
            unit = slide.units.get(key)
            if mrow is None or mrow.path is None:
                log.warning("heatmap of %s skipped: no slide path in %s", sid, manifest.path)
                continue
            if unit is None or slide.coords is None or len(slide.coords) != len(unit["absolute"]):
                log.warning("heatmap of %s skipped: the bag has no coordinates matching its instances", sid)
                continue
            title = slide_title({**r, "slide_id": sid}, task, classes, model) + tag
            if slide.case_id != sid:
                title += f"  [case {slide.case_id}]"
            order = unit.get("raw", unit["rank"])
            values = unit["absolute"] if mode == "absolute" else (None if "raw" in unit else unit["rank"])
            try:
                patch_px_level0 = geometry_of(sid, slide.coords)["patch_size_level0"]
                written += write_slide_heatmaps(
                    mrow.path, slide.coords, order, patch_px_level0, out_dir / "heatmaps", sid, title=title,
                    mpp=mrow.mpp, k=k, cmap=cmap, values=values,
                    value_label=weight_label(task, classes) if mode == "absolute" else
                    "mean over models of the rank within the slide")
            except PipelineError as exc:  # a picture that cannot be drawn never loses the metrics
                log.warning("heatmap of %s skipped: %s", sid, str(exc).splitlines()[0])
    return written


def write_geojson_files(slides: Mapping[str, SlideInstances], out_dir: Path,
                        geometry_of: Callable[[str, np.ndarray], Mapping[str, Any]]) -> int:
    """QuPath GeoJSON of every slide (:mod:`pipeline.prediction_geojson`)."""
    from .prediction_geojson import write_prediction_geojson

    rows, instance, coords = [], {}, {}
    for sid, slide in slides.items():
        coords[sid] = slide.coords
        for (seed, fold), unit in slide.units.items():
            rows.append(unit["row"])
            if "raw" in unit:
                instance[(seed, fold, sid)] = unit["raw"]
    return write_prediction_geojson(out_dir / "geojson", pd.DataFrame(rows), instance, coords.get,
                                    lambda sid, c: geometry_of(sid, c)["patch_size_level0"])


def write_instance_outputs(ws: Workspace, out_dir: Path, rows: pd.DataFrame, chosen_from: pd.DataFrame,
                           instance: dict, bags, features_dir: Path, manifest, *, spans, ensemble_of, group_of: dict,
                           task: str, classes, model: str, n_heat: int | None, mode: str, cmap: str, k: int,
                           tag: str) -> None:
    """Everything ``evaluate`` writes per patch, under ``out_dir``: the instance-score HDF5 of every
    slide of ``rows`` (prediction rows, one per model), the QuPath GeoJSON, and the heatmaps of the
    ``n_heat`` (None = all) bags of ``chosen_from`` ranked first. The other arguments are those
    of :func:`collect_slides` and :func:`draw_heatmaps`; ``group_of`` maps a model key to its
    HDF5 group (its fold folder). Patch geometry comes from the bag or the segment stage's coords
    file (``ws``); a slide that cannot be written is skipped with a warning."""
    slides = collect_slides(rows, instance, bags.coords, task, classes, spans, ensemble_of)
    cache: dict[str, dict] = {}

    def geometry(sid: str, coords: np.ndarray) -> dict:
        if sid not in cache:
            cache[sid] = patch_geometry(bags.attrs(sid), ws.coords_path(features_dir.name, sid), sid, coords)
        return cache[sid]

    for sid, slide in slides.items():
        if slide.coords is None or not len(slide.coords):
            log.warning("instance scores of %s not written: the bag has no patch coordinates", sid)
            continue
        try:
            write_instance_file(out_dir / "instance_scores" / f"{sid}.h5", slide, geometry(sid, slide.coords),
                                   group_of, task, classes)
        except PipelineError as exc:
            log.warning("instance scores of %s not written: %s", sid, str(exc).splitlines()[0])
    write_geojson_files(slides, out_dir, geometry)
    if n_heat != 0:
        draw_heatmaps(slides, heatmap_rows(chosen_from, n_heat, task, classes), out_dir, manifest, geometry,
                         task=task, classes=classes, model=model, mode=mode, cmap=cmap, k=k, tag=tag)
