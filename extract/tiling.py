"""Patch grids over segmented tissue (CLAM's tiling rules), vectorised.

One grid per kept contour, anchored at the contour's bounding-box top-left, step = patch size
in level-0 pixels. A candidate patch at ``(x, y)`` (level-0 top-left) is kept when the
contour test passes and its centre is not strictly inside one of that contour's holes:

- ``four_pt``: ANY of the four points ``centre +/- patch//4`` is inside or on the contour
  (CLAM's README says "all four"; CLAM's code, which we follow, says any);
- ``four_pt_hard``: all four are;
- ``center``: the centre ``(x + patch//2, y + patch//2)`` is;
- ``basic``: the top-left corner is.

"Inside" is exactly OpenCV's ``pointPolygonTest(...) >= 0`` (points on the boundary count),
and the hole test is ``> 0`` at ``(x + patch/2, y + patch/2)``; both are evaluated here for all
candidates at once with a scanline crossing count, so results equal CLAM's per-point loop to
the pixel, including boundary cases.

    n0 = level0_patch_px(256, target_mpp=0.5, slide_mpp=0.25)        # 512
    coords = tile_tissue(tissue, n0, slide.dimensions)                # int64 [N, 2]
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError

__all__ = ["level0_patch_px", "tile_tissue", "points_in_polygon", "CONTOUR_FNS"]

CONTOUR_FNS = ("four_pt", "four_pt_hard", "center", "basic")


def level0_patch_px(patch_px: int, target_mpp: float, slide_mpp: float) -> int:
    """Level-0 side of a patch of ``patch_px`` pixels at ``target_mpp`` on a ``slide_mpp`` slide.

    ``round(patch_px * target_mpp / slide_mpp)``: the exact micron ratio, not a magnification
    bucket (256 px at 0.5 um/px on a 0.265 um/px slide -> 483 level-0 px, not 512).

    Parameters
    ----------
    patch_px : int
        Patch side in pixels at the target resolution.
    target_mpp, slide_mpp : float
        Microns per pixel of the target resolution and of the slide's level 0.
    """
    if not (isinstance(patch_px, (int, np.integer)) and patch_px >= 1):
        raise ConfigError(f"The 'patch_px' parameter of level0_patch_px must be an int >= 1. Got {patch_px!r} instead.")
    for name, value in (("target_mpp", target_mpp), ("slide_mpp", slide_mpp)):
        if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
            raise ConfigError(
                f"The '{name}' parameter of level0_patch_px must be a float > 0 (microns per pixel). "
                f"Got {value!r} instead."
            )
    return max(1, int(round(patch_px * float(target_mpp) / float(slide_mpp))))


# ---------------------------------------------------------------------------------------------
# Exact, vectorised point-in-polygon (OpenCV pointPolygonTest semantics)
# ---------------------------------------------------------------------------------------------
def points_in_polygon(polygon: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Where points lie relative to a closed polygon, as ``cv2.pointPolygonTest(measureDist=False)``.

    Parameters
    ----------
    polygon : int ndarray ``[K, 2]`` or ``[K, 1, 2]``
        Vertices ``(x, y)`` in order; the last connects back to the first.
    points : ndarray ``[N, 2]``
        Query points ``(x, y)``; coordinates must be multiples of 0.5 (integer or half-pixel).

    Returns
    -------
    int8 ndarray ``[N]``: +1 inside, 0 on the boundary, -1 outside (even-odd rule).

    Notes
    -----
    Work is proportional to (edges crossing the query rows + points) log(...), not
    edges x points: each edge is expanded only onto the distinct query rows it spans, crossings
    are sorted per row, and each point counts the crossings right of it with one searchsorted.
    Coordinates are doubled so half-pixel points stay exact integers.
    """
    poly = np.asarray(polygon).reshape(-1, 2).astype(np.int64) * 2
    pts2 = np.asarray(points, dtype=np.float64).reshape(-1, 2) * 2
    n = len(pts2)
    result = np.full(n, -1, dtype=np.int8)
    if n == 0 or len(poly) == 0:
        return result
    if not np.all(pts2 == np.round(pts2)):
        raise ConfigError("points_in_polygon: point coordinates must be multiples of 0.5")
    pts = pts2.astype(np.int64)
    px, py = pts[:, 0], pts[:, 1]

    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)

    rows = np.unique(py)                        # distinct query rows, sorted
    row_of_point = np.searchsorted(rows, py)

    # --- crossings: edges with exactly one end at y <= row (OpenCV's half-open rule) ---------
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    first = np.searchsorted(rows, lo, side="left")     # rows with row >= lo
    last = np.searchsorted(rows, hi, side="left")      # rows with row < hi
    edge_idx, row_idx = _expand(first, last)
    count_right = np.zeros(n, dtype=np.int64)
    if len(edge_idx):
        ey = rows[row_idx]
        ex0, ey0, ex1, ey1 = x0[edge_idx], y0[edge_idx], x1[edge_idx], y1[edge_idx]
        cross_x = ex0 + (ey - ey0) * (ex1 - ex0) / (ey1 - ey0)
        # Sort crossings by (row, x) and count, per point, those strictly right of it. Points
        # that fall exactly on a crossing are boundary points, decided below, so float ties
        # here never matter: distinct values differ by >= 1 / (2 * edge height).
        span = float(max(cross_x.max(), px.max()) - min(cross_x.min(), px.min()) + 4)
        base = float(min(cross_x.min(), px.min())) - 1
        keys = np.sort(row_idx * span + (cross_x - base))
        row_end = np.searchsorted(keys, (row_of_point + 1) * span, side="left")
        at_or_left = np.searchsorted(keys, row_of_point * span + (px - base), side="right")
        count_right = row_end - at_or_left
    result[count_right % 2 == 1] = 1

    # --- boundary: points on an edge (closed segment) ----------------------------------------
    on_edge = np.zeros(n, dtype=bool)
    order = np.lexsort((px, row_of_point))        # points sorted by (row, x)
    sorted_row, sorted_x = row_of_point[order], px[order]
    first_c = np.searchsorted(rows, lo, side="left")
    last_c = np.searchsorted(rows, hi, side="right")   # closed: rows <= hi
    edge_idx, row_idx = _expand(first_c, last_c)
    if len(edge_idx):
        ey = rows[row_idx]
        ex0, ey0, ex1, ey1 = x0[edge_idx], y0[edge_idx], x1[edge_idx], y1[edge_idx]
        flat = ey0 == ey1
        # Horizontal edges lying on the row: every point with x in [min, max] is on them.
        xa = np.where(flat, np.minimum(ex0, ex1), 0)
        xb = np.where(flat, np.maximum(ex0, ex1), 0)
        # Sloped edges: the single x where the edge meets the row, when it is an integer.
        dy = ey1 - ey0
        num = ex0 * np.where(flat, 1, dy) + (ey - ey0) * (ex1 - ex0)
        den = np.where(flat, 1, dy)
        exact = ~flat & (num % den == 0)
        cx = np.where(exact, num // np.where(den == 0, 1, den), 0)
        xa = np.where(exact, cx, xa)
        xb = np.where(exact, cx, xb)
        use = flat | exact
        r, xa, xb = row_idx[use], xa[use], xb[use]
        # Mark the sorted-point ranges [start, stop) covered by each interval with a
        # difference array, then map back to the original order.
        key_pts = sorted_row * (1 << 32) + (sorted_x + (1 << 31))
        start = np.searchsorted(key_pts, r * (1 << 32) + (xa + (1 << 31)), side="left")
        stop = np.searchsorted(key_pts, r * (1 << 32) + (xb + (1 << 31)), side="right")
        diff = np.zeros(n + 1, dtype=np.int64)
        np.add.at(diff, start, 1)
        np.add.at(diff, stop, -1)
        on_edge[order] = np.cumsum(diff[:-1]) > 0
    result[on_edge] = 0
    return result


def _expand(first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` for every ``first[i] <= j < last[i]``, without a Python loop."""
    counts = np.maximum(last - first, 0)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    idx = np.repeat(np.arange(len(first)), counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return idx, first[idx] + offsets


# ---------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------
def _contour_test_points(xy: np.ndarray, patch_px_level0: int, contour_fn: str) -> np.ndarray:
    """Test points ``[N, P, 2]`` for each candidate top-left in ``xy`` ``[N, 2]`` (CLAM's ints)."""
    half = patch_px_level0 // 2
    if contour_fn == "basic":
        return xy[:, None, :]
    centre = xy + half
    if contour_fn == "center":
        return centre[:, None, :]
    shift = int(half * 0.5)  # CLAM: int(patch_size // 2 * center_shift), center_shift = 0.5
    if shift == 0:
        return centre[:, None, :]
    offsets = np.array([[-shift, -shift], [shift, shift], [shift, -shift], [-shift, shift]])
    return centre[:, None, :] + offsets[None, :, :]


def tile_tissue(
    tissue,
    patch_px_level0: int,
    slide_wh: tuple[int, int],
    contour_fn: str = "four_pt",
    step_px_level0: int | None = None,
    use_padding: bool = True,
) -> np.ndarray:
    """Level-0 top-left coordinates of the tissue patches (CLAM's grid and tests).

    Parameters
    ----------
    tissue : extract.segmentation.Tissue
        Contours and holes in level-0 pixels.
    patch_px_level0 : int
        Patch side in level-0 pixels (see :func:`level0_patch_px`).
    slide_wh : (int, int)
        Level-0 ``(width, height)`` of the slide.
    contour_fn : {'four_pt', 'four_pt_hard', 'center', 'basic'}
        Which points of a patch must lie in the contour (module docstring).
    step_px_level0 : int, optional
        Grid step in level-0 pixels; ``patch_px_level0`` (no overlap) when None.
    use_padding : bool
        True (CLAM's default): the grid runs to the end of the contour's bounding box and
        patches may extend past the slide edge (read as white). False: only patches that fit
        inside the slide.

    Returns
    -------
    int64 ndarray ``[N, 2]``
        ``(x, y)`` top-left corners in level-0 pixels; contour by contour, and within a contour
        column by column (x, then y), which is CLAM's order (``np.meshgrid(..., indexing='ij')``).
        A patch found through two overlapping contours is kept once, at its first position.

    Notes
    -----
    One deliberate difference from CLAM: CLAM drops a contour whose grid yields exactly one
    patch (``if len(results) > 1``), an off-by-one; we keep that patch.
    """
    if not (isinstance(patch_px_level0, (int, np.integer)) and patch_px_level0 >= 1):
        raise ConfigError(f"The 'patch_px_level0' parameter of tile_tissue must be an int >= 1. "
                          f"Got {patch_px_level0!r} instead.")
    step = patch_px_level0 if step_px_level0 is None else step_px_level0
    if not (isinstance(step, (int, np.integer)) and step >= 1):
        raise ConfigError(f"The 'step_px_level0' parameter of tile_tissue must be an int >= 1 or None. "
                          f"Got {step_px_level0!r} instead.")
    if contour_fn not in CONTOUR_FNS:
        raise ConfigError(
            f"The 'contour_fn' parameter of tile_tissue must be one of {', '.join(map(repr, CONTOUR_FNS))}. "
            f"Got {contour_fn!r} instead."
        )
    width, height = int(slide_wh[0]), int(slide_wh[1])
    patch_px_level0, step = int(patch_px_level0), int(step)

    chunks = []
    for contour, holes in zip(tissue.contours, tissue.holes):
        contour = np.asarray(contour).reshape(-1, 2)
        if len(contour) == 0:
            continue
        # cv2.boundingRect on points: width = max - min + 1.
        x_min, y_min = contour.min(axis=0)
        x_max, y_max = contour.max(axis=0)
        stop_x, stop_y = int(x_max) + 1, int(y_max) + 1
        if not use_padding:
            stop_x = min(stop_x, width - patch_px_level0 + 1)
            stop_y = min(stop_y, height - patch_px_level0 + 1)
        xs = np.arange(int(x_min), stop_x, step, dtype=np.int64)
        ys = np.arange(int(y_min), stop_y, step, dtype=np.int64)
        if len(xs) == 0 or len(ys) == 0:
            continue
        # indexing='ij' then flatten: x outer, y inner, as CLAM orders its candidates.
        gx, gy = np.meshgrid(xs, ys, indexing="ij")
        cand = np.stack([gx.ravel(), gy.ravel()], axis=1)

        tests = _contour_test_points(cand, patch_px_level0, contour_fn)
        n, p = tests.shape[:2]
        inside = points_in_polygon(contour, tests.reshape(-1, 2)).reshape(n, p) >= 0
        keep = inside.all(axis=1) if contour_fn == "four_pt_hard" else inside.any(axis=1)
        cand = cand[keep]
        if len(cand) and holes:
            centre = cand + patch_px_level0 / 2.0   # CLAM's hole test uses the true (float) centre
            in_hole = np.zeros(len(cand), dtype=bool)
            for hole in holes:  # at most max_n_holes (<= 8 in every preset)
                in_hole |= points_in_polygon(hole, centre) > 0
            cand = cand[~in_hole]
        if len(cand):
            chunks.append(cand)

    if not chunks:
        return np.zeros((0, 2), dtype=np.int64)
    coords = np.concatenate(chunks).astype(np.int64)
    _, first = np.unique(coords, axis=0, return_index=True)
    return coords[np.sort(first)]
