"""Attention heatmaps and top/bottom patch galleries, for people to check what a model looks at.

Two pictures per slide:

- ``<slide_id>.png``: the slide thumbnail with every patch coloured by the student's instance
  score, normalised per slide BY RANK (percentile 0..1, so two models or two slides with
  different score scales read the same way and any monotone transform of the scores gives the
  same picture), blended over the tissue, with a colour bar and a title. The heatmap panel is
  the thumbnail itself, so it has the slide's aspect ratio.
- ``<slide_id>_gallery.png``: the ``k`` highest- and ``k`` lowest-scored patches, read from the
  slide at the bag's resolution, in two labelled rows.

Pure drawing functions take arrays (thumbnail, scale, coords, scores, patches) and return RGB
``uint8 [h, w, 3]`` images; :func:`write_slide_heatmaps` is the thin function that opens the
slide, reads pixels and writes the PNGs (temporary name, then rename).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.errors import ConfigError

from .previews import save_png

__all__ = [
    "rank_normalize",
    "thumbnail_downsample",
    "heatmap_layout",
    "draw_heatmap",
    "top_bottom",
    "draw_gallery",
    "read_patches",
    "write_slide_heatmaps",
    "FRAME",
]

log = logging.getLogger(__name__)

#: Colour of the 1-px frame drawn just outside the heatmap panel (lets a reader find the panel).
FRAME = (40, 40, 40)
#: Long side of the heatmap panel aimed for, in pixels.
TARGET_LONG_PX = 1200
#: Smallest long side of the heatmap panel: small slides are upsampled to at least this.
MIN_LONG_PX = 1000


# -- pure compute ------------------------------------------------------------------------------

def rank_normalize(scores: np.ndarray) -> np.ndarray:
    """Per-slide rank normalisation of instance scores to percentiles in ``[0, 1]``.

    ``(rank - 1) / (n - 1)`` with average ranks for ties, so the lowest score maps to 0, the
    highest to 1, and any strictly increasing transform of ``scores`` gives the same result.
    A single instance maps to 1.

    Parameters
    ----------
    scores : float ``[N]`` finite instance scores (e.g. attention logits).

    Returns
    -------
    float64 ``[N]`` in ``[0, 1]``.
    """
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ConfigError(
            "The 'scores' parameter of rank_normalize must hold finite values. "
            f"Got {int(np.sum(~np.isfinite(s)))} non-finite values instead."
        )
    if len(s) == 0:
        return s
    if len(s) == 1:
        return np.ones(1)
    return (rankdata(s, method="average") - 1.0) / (len(s) - 1.0)


def thumbnail_downsample(slide_wh: tuple[int, int], target_long_px: int = TARGET_LONG_PX) -> float:
    """Downsample from level 0 that gives a thumbnail of about ``target_long_px`` on its long side.

    Never below 1 (level 0 of a small slide is its own thumbnail).
    """
    return max(1.0, max(slide_wh) / float(target_long_px))


def top_bottom(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest scores (descending) and the ``k`` lowest (ascending).

    With fewer than ``2k`` instances both lists shrink so that they never share an instance
    (the top list keeps the extra one when ``N`` is odd). Ties break by instance order.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(s)
    k_top = min(k, (n + 1) // 2)
    k_bottom = min(k, n - k_top)
    order = np.argsort(-s, kind="stable")
    return order[:k_top], np.argsort(s, kind="stable")[:k_bottom]


@dataclass(frozen=True)
class HeatmapLayout:
    """Where things go in the heatmap figure (pixels of the figure; boxes are x, y, w, h)."""

    panel: tuple[int, int, int, int]
    colorbar: tuple[int, int, int, int]
    size: tuple[int, int]  # figure (width, height)
    title_px: int
    font_scale: float


def heatmap_layout(panel_wh: tuple[int, int]) -> HeatmapLayout:
    """Figure layout around a heatmap panel of ``panel_wh`` = (width, height) pixels.

    A title band on top, the panel below it, a colour bar with tick labels on the right; the
    panel keeps its size, so the figure minus these margins has the slide's aspect ratio.
    """
    w, h = int(panel_wh[0]), int(panel_wh[1])
    long_side = max(w, h, 200)
    margin = max(8, long_side // 100)
    title_px = max(28, long_side // 30)
    font_scale = title_px / 40.0
    bar_w = max(14, long_side // 50)
    labels_w = int(90 * font_scale) + 10
    panel = (margin, title_px + margin, w, h)
    bar_h = max(40, int(h * 0.8))
    bar = (margin + w + 2 * margin, title_px + margin + (h - bar_h) // 2, bar_w, bar_h)
    size = (bar[0] + bar_w + labels_w + margin, title_px + 2 * margin + h)
    return HeatmapLayout(panel, bar, size, title_px, font_scale)


def _colormap(name: str) -> np.ndarray:
    """256 x 3 uint8 lookup table of a Matplotlib colormap."""
    from matplotlib import colormaps

    try:
        cmap = colormaps[name]
    except KeyError as exc:
        raise ConfigError(
            f"The 'cmap' parameter must be a Matplotlib colormap name such as 'jet' or 'viridis'. "
            f"Got {name!r} instead."
        ) from exc
    return np.round(cmap(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def _patch_boxes(coords: np.ndarray, patch_px_level0: float, scale: tuple[float, float],
                 shape_hw: tuple[int, int]) -> np.ndarray:
    """Thumbnail pixel boxes ``[N, 4]`` (x0, y0, x1, y1; exclusive ends, at least 1 px wide)."""
    sx, sy = float(scale[0]), float(scale[1])
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x0 = np.floor(c[:, 0] / sx)
    y0 = np.floor(c[:, 1] / sy)
    x1 = np.maximum(np.ceil((c[:, 0] + patch_px_level0) / sx), x0 + 1)
    y1 = np.maximum(np.ceil((c[:, 1] + patch_px_level0) / sy), y0 + 1)
    h, w = shape_hw
    boxes = np.stack([np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)], 1)
    return boxes.astype(np.int64)


def score_map(shape_hw: tuple[int, int], scale: tuple[float, float], coords: np.ndarray,
              patch_px_level0: float, values: np.ndarray) -> np.ndarray:
    """Per-pixel mean of ``values`` over the patches covering each thumbnail pixel.

    Returns float64 ``[h, w]``, NaN where no patch lies (overlapping patches are averaged).
    """
    h, w = int(shape_hw[0]), int(shape_hw[1])
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.int32)
    boxes = _patch_boxes(coords, patch_px_level0, scale, (h, w))
    for (x0, y0, x1, y1), v in zip(boxes, np.asarray(values, dtype=np.float64)):
        total[y0:y1, x0:x1] += v
        count[y0:y1, x0:x1] += 1
    out = np.full((h, w), np.nan)
    covered = count > 0
    out[covered] = total[covered] / count[covered]
    return out


def _put_text(img: np.ndarray, text: str, org: tuple[int, int], scale: float,
              colour=(0, 0, 0), max_w: int | None = None) -> None:
    import cv2

    thick = max(1, int(round(scale * 1.6)))
    if max_w is not None:  # shrink long titles to fit
        (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        if tw > max_w > 0:
            scale = scale * max_w / tw
            thick = max(1, int(round(scale * 1.6)))
    cv2.putText(img, text, (int(org[0]), int(org[1])), cv2.FONT_HERSHEY_SIMPLEX, scale, colour,
                thick, cv2.LINE_AA)


def draw_heatmap(
    thumbnail: np.ndarray,
    scale: tuple[float, float],
    coords: np.ndarray,
    scores: np.ndarray,
    patch_px_level0: float,
    title: str = "",
    cmap: str = "jet",
    alpha: float = 0.5,
    normalize: str = "rank",
) -> np.ndarray:
    """Instance scores as a coloured overlay on the slide thumbnail, with title and colour bar.

    Parameters
    ----------
    thumbnail : uint8 RGB ``[h, w, 3]`` of the whole slide.
    scale : ``(sx, sy)`` level-0 pixels per thumbnail pixel.
    coords : int ``[N, 2]`` level-0 top-left (x, y) of the patches, in the bag's row order.
    scores : float ``[N]`` the student's instance scores (same order).
    patch_px_level0 : patch side in level-0 pixels.
    title : text of the title band (slide id, label, probability).
    cmap : Matplotlib colormap name ('jet', 'viridis', ...).
    alpha : opacity of the colour over the tissue, in (0, 1].
    normalize : 'rank' (percentile per slide, the default) or 'minmax'.

    Returns
    -------
    uint8 RGB figure; the panel at :func:`heatmap_layout` ``(w, h).panel`` is exactly ``[h, w]``
    (the thumbnail's shape, hence the slide's aspect ratio), framed by a 1-px :data:`FRAME` line.
    """
    import cv2

    thumb = np.asarray(thumbnail)
    if thumb.ndim != 3 or thumb.shape[2] != 3 or thumb.dtype != np.uint8:
        raise ConfigError(
            "The 'thumbnail' parameter of draw_heatmap must be a uint8 array [h, w, 3]. "
            f"Got {thumb.dtype} {thumb.shape} instead."
        )
    coords = np.asarray(coords).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(scores):
        raise ConfigError(
            "The 'coords' and 'scores' parameters of draw_heatmap must have the same length. "
            f"Got {len(coords)} and {len(scores)} instead."
        )
    if normalize == "rank":
        values = rank_normalize(scores)
    elif normalize == "minmax":
        span = float(scores.max() - scores.min()) if len(scores) else 0.0
        values = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
    else:
        raise ConfigError(f"The 'normalize' parameter of draw_heatmap must be 'rank' or 'minmax'. Got {normalize!r} instead.")
    if not 0 < alpha <= 1:
        raise ConfigError(f"The 'alpha' parameter of draw_heatmap must be in (0, 1]. Got {alpha!r} instead.")
    lut = _colormap(cmap)

    h, w = thumb.shape[:2]
    smap = score_map((h, w), scale, coords, patch_px_level0, values)
    covered = ~np.isnan(smap)
    panel = thumb.astype(np.float32)
    if covered.any():
        colour = lut[np.clip(np.round(smap[covered] * 255), 0, 255).astype(np.int64)].astype(np.float32)
        panel[covered] = (1 - alpha) * panel[covered] + alpha * colour
    panel = np.clip(np.round(panel), 0, 255).astype(np.uint8)

    lay = heatmap_layout((w, h))
    fig = np.full((lay.size[1], lay.size[0], 3), 255, np.uint8)
    px, py, pw, ph = lay.panel
    fig[py:py + ph, px:px + pw] = panel
    cv2.rectangle(fig, (px - 1, py - 1), (px + pw, py + ph), FRAME, 1)

    # colour bar: 1 at the top, 0 at the bottom
    bx, by, bw, bh = lay.colorbar
    ramp = np.linspace(1.0, 0.0, bh)
    fig[by:by + bh, bx:bx + bw] = lut[np.round(ramp * 255).astype(np.int64)][:, None, :]
    cv2.rectangle(fig, (bx - 1, by - 1), (bx + bw, by + bh), FRAME, 1)
    fs = lay.font_scale * 0.6
    for value, text in ((1.0, "1.0 high"), (0.5, "0.5"), (0.0, "0.0 low")):
        y = by + int(round((1 - value) * (bh - 1)))
        cv2.line(fig, (bx + bw, y), (bx + bw + 4, y), FRAME, 1)
        _put_text(fig, text, (bx + bw + 8, y + int(8 * fs)), fs)
    _put_text(fig, "rank percentile", (bx, by - int(16 * fs) - 6), fs, max_w=lay.size[0] - bx - 2)

    if title:
        _put_text(fig, title, (px, int(lay.title_px * 0.8)), lay.font_scale, max_w=lay.size[0] - 2 * px)
    return fig


def draw_gallery(
    top_patches: Sequence[np.ndarray],
    bottom_patches: Sequence[np.ndarray],
    top_scores: Sequence[float] = (),
    bottom_scores: Sequence[float] = (),
    title: str = "",
    tile_px: int = 128,
) -> np.ndarray:
    """Two labelled rows of patches: highest scores on top, lowest below.

    Parameters
    ----------
    top_patches, bottom_patches : uint8 RGB patches (any size; resized to ``tile_px``), in the
        order they should appear (top: highest first; bottom: lowest first).
    top_scores, bottom_scores : the per-slide rank percentiles printed under each patch
        (optional).
    title : title band text.
    tile_px : side of each tile in pixels.

    Returns
    -------
    uint8 RGB ``[H, W, 3]``; every top tile lies above every bottom tile.
    """
    import cv2

    gap = max(4, tile_px // 16)
    k = max(len(top_patches), len(bottom_patches), 1)
    font = tile_px / 256.0
    title_px = max(24, int(tile_px * 0.25)) if title else 0
    label_px = max(20, int(tile_px * 0.2))
    caption_px = max(14, int(tile_px * 0.14))
    row_h = label_px + tile_px + caption_px
    width = gap + k * (tile_px + gap)
    height = title_px + 2 * row_h + 2 * gap
    fig = np.full((height, max(width, 320), 3), 255, np.uint8)
    if title:
        _put_text(fig, title, (gap, int(title_px * 0.75)), font * 1.6, max_w=fig.shape[1] - 2 * gap)
    rows = (
        (f"highest {len(top_patches)} instance scores (rank percentile under each)", top_patches, top_scores, (200, 0, 0)),
        (f"lowest {len(bottom_patches)} instance scores (lowest first)", bottom_patches, bottom_scores, (0, 0, 200)),
    )
    for r, (label, patches, scores, colour) in enumerate(rows):
        y0 = title_px + gap + r * row_h
        _put_text(fig, label, (gap, y0 + int(label_px * 0.75)), font * 1.3, colour, max_w=fig.shape[1] - 2 * gap)
        for i, patch in enumerate(patches):
            p = np.asarray(patch)
            if p.ndim != 3 or p.shape[2] != 3:
                raise ConfigError(f"gallery patches must be RGB [h, w, 3]; got shape {p.shape}")
            tile = cv2.resize(p.astype(np.uint8), (tile_px, tile_px), interpolation=cv2.INTER_AREA)
            x = gap + i * (tile_px + gap)
            ty = y0 + label_px
            fig[ty:ty + tile_px, x:x + tile_px] = tile
            if i < len(scores):
                _put_text(fig, f"{float(scores[i]):.3f}", (x + 2, ty + tile_px + int(caption_px * 0.85)), font)
    return fig


# -- file work ---------------------------------------------------------------------------------

def read_patches(slide, coords: np.ndarray, patch_px_level0: float, out_px: int = 128) -> list[np.ndarray]:
    """Read patches at ``coords`` from an open :class:`extract.slide.Slide`, resized to ``out_px``.

    Each patch is read from the deepest level that still has at least ``out_px`` pixels across
    the patch (never level 0 when a pyramid level is enough), then area-resized.
    """
    import cv2

    level = slide.best_level_for_downsample(max(1.0, float(patch_px_level0) / out_px))
    ds = slide.level_downsamples[level]
    side = max(1, int(math.ceil(float(patch_px_level0) / ds)))
    out = []
    for x, y in np.asarray(coords).reshape(-1, 2):
        region = slide.read_region((int(x), int(y)), level, (side, side))
        out.append(cv2.resize(region, (out_px, out_px), interpolation=cv2.INTER_AREA))
    return out


def write_slide_heatmaps(
    slide_path: str | Path,
    coords: np.ndarray,
    scores: np.ndarray,
    patch_px_level0: float,
    out_dir: str | Path,
    slide_id: str,
    title: str = "",
    mpp: float | None = None,
    k: int = 8,
    cmap: str = "jet",
    tile_px: int = 128,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<slide_id>.png`` (heatmap) and ``<slide_id>_gallery.png``.

    The thumbnail is read with :meth:`extract.slide.Slide.thumbnail` at a downsample that gives
    about :data:`TARGET_LONG_PX` pixels on the long side (blocks from a pyramid level; level 0 of
    a large slide is never loaded whole); slides smaller than :data:`MIN_LONG_PX` are upsampled.

    Returns
    -------
    (heatmap_path, gallery_path)
    """
    import cv2

    from extract.slide import Slide

    out_dir = Path(out_dir)
    coords = np.asarray(coords).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    with Slide(slide_path, mpp=mpp) as slide:
        W0, H0 = slide.dimensions
        thumb, (sx, sy) = slide.thumbnail(thumbnail_downsample((W0, H0)))
        long_side = max(thumb.shape[:2])
        if long_side < MIN_LONG_PX:
            f = MIN_LONG_PX / long_side
            tw, th = max(1, round(thumb.shape[1] * f)), max(1, round(thumb.shape[0] * f))
            thumb = cv2.resize(thumb, (tw, th), interpolation=cv2.INTER_LINEAR)
            sx, sy = W0 / tw, H0 / th
        heat = draw_heatmap(thumb, (sx, sy), coords, scores, patch_px_level0, title=title, cmap=cmap)
        pct = rank_normalize(scores)
        top, bottom = top_bottom(scores, k)
        gallery = draw_gallery(
            read_patches(slide, coords[top], patch_px_level0, tile_px),
            read_patches(slide, coords[bottom], patch_px_level0, tile_px),
            pct[top], pct[bottom], title=title, tile_px=tile_px,
        )
    heat_path = out_dir / f"{slide_id}.png"
    gallery_path = out_dir / f"{slide_id}_gallery.png"
    save_png(heat_path, heat)
    save_png(gallery_path, gallery)
    return heat_path, gallery_path
