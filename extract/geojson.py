"""GeoJSON that QuPath opens: polygons and patch tiles in level-0 pixels, and polygons read back.

QuPath's GeoJSON (File > Import objects / Export objects as GeoJSON) puts coordinates in pixels
of the full-resolution image with the origin at its top-left corner: our level-0 frame, so no
conversion is needed. Polygon rings are closed (first position repeated last, as RFC 7946
requires), outer ring first and holes after it. Each feature carries QuPath's ``objectType``
(``annotation`` or ``tile``), an optional ``classification`` ``{name, color}`` and a
``measurements`` mapping (QuPath >= 0.3 reads it as a dict of name -> number).

    fc = feature_collection(tissue_features(tissue))          # segment: contours and holes
    fc = feature_collection(tile_features(coords, 512, {"score": s}))
    validate_feature_collection(fc)                              # rings closed, numbers finite
    polygons = read_polygons(json.load(f), where="a.geojson")   # [(outer [K, 2], [holes])]
    keep = filter_coords(coords, 512, include=polygons)          # bool [N]

Include and exclude regions follow CLAM's tiling rules so that a tissue outline exported here and
read back as an include region keeps exactly the same patches: an include polygon acts as a
tissue contour (the ``contour_fn`` test on its outer ring, the patch centre not strictly inside
one of its holes), an exclude polygon as a hole (the patch is dropped when its centre lies
strictly inside the outer ring and outside the polygon's own holes).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import ConfigError
from .runtime import atomic_write_text

__all__ = [
    "Polygon",
    "closed_ring",
    "polygon_feature",
    "tissue_features",
    "ink_features",
    "tile_features",
    "feature_collection",
    "validate_feature_collection",
    "read_polygons",
    "load_polygons",
    "write_geojson",
    "filter_coords",
]

#: ``(outer [K, 2], [hole [K, 2], ...])`` in level-0 pixels, rings open (no repeated last point).
Polygon = tuple[np.ndarray, list[np.ndarray]]

TISSUE_CLASS = ("Tissue", (0, 200, 0))
INK_CLASS = ("Ink", (255, 0, 200))


def closed_ring(points: np.ndarray) -> list[list[float]] | None:
    """``[K, 2]`` points -> a closed GeoJSON ring; ``None`` when it has fewer than 3 distinct points."""
    pts = np.asarray(points).reshape(-1, 2)
    if len(np.unique(pts, axis=0)) < 3:
        return None
    ring = [[_number(x), _number(y)] for x, y in pts]
    if ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    return ring


def _number(v) -> int | float:
    """JSON-friendly: ints stay ints (level-0 pixels), floats stay floats."""
    return int(v) if float(v).is_integer() else float(v)


def polygon_feature(outer: np.ndarray, holes: Iterable[np.ndarray] = (), classification=None,
                    measurements: dict | None = None, object_type: str = "annotation",
                    name: str | None = None) -> dict | None:
    """One QuPath feature; ``None`` when the outer ring is degenerate (fewer than 3 points).

    Parameters
    ----------
    outer : ``[K, 2]`` level-0 (x, y).
    holes : rings ``[K, 2]`` inside ``outer``; degenerate ones are left out.
    classification : ``(name, (r, g, b))``, optional.
    measurements : name -> number, optional.
    object_type : ``'annotation'``, ``'tile'`` or ``'detection'``.
    """
    ring = closed_ring(outer)
    if ring is None:
        return None
    rings = [ring] + [r for r in (closed_ring(h) for h in holes) if r is not None]
    props: dict[str, Any] = {"objectType": object_type}
    if name:
        props["name"] = name
    if classification is not None:
        props["classification"] = {"name": classification[0], "color": [int(c) for c in classification[1]]}
    if measurements:
        props["measurements"] = {str(k): _finite(v) for k, v in measurements.items()}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings}, "properties": props}


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def tissue_features(tissue) -> list[dict]:
    """Tissue contours with their holes (an :class:`extract.segmentation.Tissue`), class ``Tissue``."""
    out = []
    for contour, holes in zip(tissue.contours, tissue.holes):
        feature = polygon_feature(contour, holes, TISSUE_CLASS)
        if feature is not None:
            out.append(feature)
    return out


def ink_features(tissue) -> list[dict]:
    """The ink removed from the tissue (``tissue.ink_contours``), class ``Ink``."""
    return [f for f in (polygon_feature(c, (), INK_CLASS) for c in tissue.ink_contours) if f is not None]


def tile_features(coords: np.ndarray, patch_px_level0: float, measurements: dict[str, np.ndarray] | None = None,
                  classification=None) -> list[dict]:
    """One square ``tile`` per patch, with per-patch measurements.

    Parameters
    ----------
    coords : int ``[N, 2]`` level-0 top-left corners.
    patch_px_level0 : patch side in level-0 pixels.
    measurements : name -> ``[N]`` values (e.g. one instance score per fold).
    """
    coords = np.asarray(coords).reshape(-1, 2)
    size = float(patch_px_level0)
    columns = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in (measurements or {}).items()}
    for k, v in columns.items():
        if len(v) != len(coords):
            raise ConfigError(f"measurement {k!r} has {len(v)} values for {len(coords)} patches")
    out = []
    for i, (x, y) in enumerate(coords):
        x0, y0 = _number(x), _number(y)
        x1, y1 = _number(x + size), _number(y + size)
        props: dict[str, Any] = {"objectType": "tile"}
        if classification is not None:
            props["classification"] = {"name": classification[0], "color": [int(c) for c in classification[1]]}
        if columns:
            props["measurements"] = {k: _finite(v[i]) for k, v in columns.items()}
        out.append({"type": "Feature", "properties": props, "geometry": {
            "type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}})
    return out


def feature_collection(features: Iterable[dict]) -> dict:
    return {"type": "FeatureCollection", "features": [f for f in features if f is not None]}


def validate_feature_collection(obj: Any, where: str = "GeoJSON") -> None:
    """Raise :class:`ConfigError` unless ``obj`` is a FeatureCollection of closed polygon rings.

    Checks: ``type``, every feature a ``Feature`` with a geometry; Polygon/MultiPolygon rings of
    >= 4 finite, non-negative positions with the first repeated last (other geometry types pass).
    """
    if not isinstance(obj, dict) or obj.get("type") != "FeatureCollection" or not isinstance(obj.get("features"), list):
        raise ConfigError(f"{where}: not a GeoJSON FeatureCollection (expected type 'FeatureCollection' and a 'features' list)")
    for i, feature in enumerate(obj["features"]):
        if not isinstance(feature, dict) or feature.get("type") != "Feature" or not isinstance(feature.get("geometry"), dict):
            raise ConfigError(f"{where}: feature {i} is not a GeoJSON Feature with a geometry")
        geometry = feature["geometry"]
        kind = geometry.get("type")
        polygons = ([geometry.get("coordinates")] if kind == "Polygon"
                    else geometry.get("coordinates") if kind == "MultiPolygon" else [])
        for rings in polygons or []:
            for ring in rings or []:
                arr = np.asarray(ring, dtype=np.float64)
                if arr.ndim != 2 or arr.shape[1] < 2 or len(arr) < 4:
                    raise ConfigError(f"{where}: feature {i} has a ring of fewer than 4 positions")
                if not np.isfinite(arr).all() or (arr[:, :2] < 0).any():
                    raise ConfigError(f"{where}: feature {i} has coordinates that are not finite level-0 pixels >= 0")
                if not np.array_equal(arr[0], arr[-1]):
                    raise ConfigError(f"{where}: feature {i} has a ring that is not closed (first != last position)")


def read_polygons(obj: Any, where: str = "GeoJSON") -> list[Polygon]:
    """Polygons of a FeatureCollection, a Feature, a list of Features (QuPath's older export) or a
    bare geometry; Polygon and MultiPolygon geometries are read, points and lines are skipped.

    Returns
    -------
    list of ``(outer [K, 2] float64, [hole [K, 2], ...])`` in level-0 pixels, rings open.
    """
    if isinstance(obj, list):
        features = obj
    elif isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features") or []
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, dict) and obj.get("type") in ("Polygon", "MultiPolygon"):
        features = [{"type": "Feature", "geometry": obj}]
    else:
        raise ConfigError(f"{where}: not GeoJSON (expected a FeatureCollection, a Feature or a list of Features)")
    out: list[Polygon] = []
    for i, feature in enumerate(features):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict):
            continue
        kind = geometry.get("type")
        coords = geometry.get("coordinates")
        if kind == "Polygon":
            groups = [coords]
        elif kind == "MultiPolygon":
            groups = coords
        else:
            continue
        for rings in groups or []:
            try:
                arrays = [_open_ring(np.asarray(r, dtype=np.float64)[:, :2]) for r in rings]
            except (ValueError, IndexError, TypeError) as exc:
                raise ConfigError(f"{where}: feature {i} has malformed polygon coordinates ({exc})") from exc
            if arrays and len(arrays[0]) >= 3:
                out.append((arrays[0], [h for h in arrays[1:] if len(h) >= 3]))
    return out


def _open_ring(ring: np.ndarray) -> np.ndarray:
    if ring.ndim != 2 or ring.shape[1] != 2:
        raise ValueError("a ring must be a list of [x, y] positions")
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    return ring


def load_polygons(path: str | os.PathLike) -> list[Polygon]:
    """:func:`read_polygons` of a ``.geojson``/``.json`` file; one clear error if it is not GeoJSON."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read GeoJSON ({exc})") from exc
    return read_polygons(obj, where=str(path))


def write_geojson(path: str | os.PathLike, collection: dict) -> Path:
    """Write atomically (a reader never sees half a file)."""
    return atomic_write_text(path, json.dumps(collection, separators=(",", ":")))


def filter_coords(coords: np.ndarray, patch_px_level0: int, include: list[Polygon] | None = None,
                  exclude: list[Polygon] | None = None, contour_fn: str = "four_pt") -> np.ndarray:
    """Which patches the include/exclude regions keep (module docstring): bool ``[N]``.

    ``include=None`` keeps every patch the exclude regions leave; ``include=[]`` keeps none.
    """
    from .tiling import _contour_test_points, points_in_polygon

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    keep = np.ones(len(coords), bool)
    if not len(coords):
        return keep
    # The exact point-in-polygon test works on integer vertices (QuPath's may be sub-pixel).
    def px(ring):
        return np.round(np.asarray(ring, dtype=np.float64)).astype(np.int64)

    include = None if include is None else [(px(o), [px(h) for h in hs]) for o, hs in include]
    exclude = [(px(o), [px(h) for h in hs]) for o, hs in exclude or []]
    centre = coords + patch_px_level0 / 2.0
    if include is not None:
        tests = _contour_test_points(coords, int(patch_px_level0), contour_fn)
        n, p = tests.shape[:2]
        inside_any = np.zeros(len(coords), bool)
        for outer, holes in include:
            inside = points_in_polygon(outer, tests.reshape(-1, 2)).reshape(n, p) >= 0
            ok = inside.all(axis=1) if contour_fn == "four_pt_hard" else inside.any(axis=1)
            for hole in holes:
                ok &= ~(points_in_polygon(hole, centre) > 0)
            inside_any |= ok
        keep &= inside_any
    for outer, holes in exclude:
        hit = points_in_polygon(outer, centre) > 0
        for hole in holes:
            hit &= ~(points_in_polygon(hole, centre) > 0)
        keep &= ~hit
    return keep
