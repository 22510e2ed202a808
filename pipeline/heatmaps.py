"""Instance-score heatmaps and top/bottom patch galleries, for people to check what a model looks at.

Two pictures per slide:

- ``<slide_id>.png``: the slide thumbnail with every patch coloured by a per-patch value, blended
  over the tissue, with one colour bar and a title naming the slide, its prediction, the fold and
  the model. Two modes (:data:`MODES`):

  * ``absolute`` (the default): :func:`absolute_scores`, the slide's bag probability (or its
    scaled risk) times the patch's attention relative to the slide's most-attended patch. Every
    slide of an experiment shares the colour range ``[0, 1]``, so a slide the model calls normal
    stays cool and a tumour slide shows its hot spot.
  * ``rank``: the instance scores normalised per slide BY RANK (percentile 0..1), which reads
    the same for any model but makes every slide look equally hot somewhere.

  The colour map defaults to ``viridis`` and the overlay is more transparent where the value is
  low (:func:`overlay_panel`), so cool tissue keeps its H&E colours and hot patches stand out in
  yellow rather than dark red on purple. The heatmap panel is the thumbnail itself, pasted pixel
  for pixel, so it has the slide's aspect ratio.
- ``<slide_id>_gallery.png``: the ``k`` highest- and ``k`` lowest-scored patches, read from the
  slide at the bag's resolution, in two labelled rows.

Pure drawing functions take arrays (thumbnail, scale, coords, values, patches) and return RGB
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
    "MODES",
    "DEFAULT_CMAP",
    "rank_normalize",
    "relative_attention",
    "absolute_scores",
    "overlay_panel",
    "heatmap_figure",
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
#: Heatmap modes: values on one scale across slides, or percentiles within each slide.
MODES = ("absolute", "rank")
#: Colour map of the heatmaps: perceptually uniform, dark where low and yellow where high, so
#: hot patches stay visible on purple H&E (jet's dark red top vanished into the stain).
DEFAULT_CMAP = "viridis"
#: Opacity of the colour over the tissue at the bottom of the colour range, as a fraction of
#: the opacity at the top: cool patches let the tissue show through.
ALPHA_FLOOR = 0.3


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


def relative_attention(scores: np.ndarray) -> np.ndarray:
    """Each patch's attention relative to the slide's most-attended patch, in ``(0, 1]``.

    ``softmax(scores) / max(softmax(scores)) = exp(s - max(s))``: the attention weight the
    student gives the patch divided by the largest weight in the slide. Instance scores are
    attention logits for AB-MIL, CLAM and DTFD and instance logits for DSMIL; TransMIL's fused
    rank votes lie in ``[0, 1]`` and give a flat ``[e^-1, 1]``. ``-inf`` (a masked patch) maps to 0.

    Parameters
    ----------
    scores : float ``[N]`` instance scores of one slide (one fold model).

    Returns
    -------
    float64 ``[N]``; empty for an empty slide.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if np.isnan(s).any() or np.isposinf(s).any():
        raise ConfigError("The 'scores' parameter of relative_attention must hold finite values or -inf. "
                          f"Got {int(np.sum(np.isnan(s) | np.isposinf(s)))} NaN/+inf values instead.")
    finite = np.isfinite(s)
    if not finite.any():
        return np.zeros_like(s)
    return np.where(finite, np.exp(np.where(finite, s, 0.0) - s[finite].max()), 0.0)


def absolute_scores(scores: np.ndarray, bag_weight: float) -> np.ndarray:
    """The absolute heatmap value of every patch: ``bag_weight * relative_attention(scores)``.

    ``bag_weight`` is the slide's probability of the positive (or predicted) class, or its risk
    scaled to ``[0, 1]`` over the experiment, so the result lies in ``[0, 1]`` on one scale for
    every slide: a slide the model calls normal (weight near 0) stays cool however its attention
    is spread; in a tumour slide the most-attended patches reach the slide's probability.

    Returns
    -------
    float64 ``[N]`` in ``[0, 1]``.
    """
    w = float(bag_weight)
    if not 0.0 <= w <= 1.0:
        raise ConfigError(f"The 'bag_weight' parameter of absolute_scores must be in [0, 1]. Got {w!r} instead.")
    return w * relative_attention(scores)


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


def heatmap_layout(panel_wh: tuple[int, int], title_lines: int = 1) -> HeatmapLayout:
    """Figure layout around a heatmap panel of ``panel_wh`` = (width, height) pixels.

    A title band on top (``title_lines`` lines), the panel below it, one colour bar with its
    ticks and label on the right; the panel keeps its size, so the figure minus these margins
    has the slide's aspect ratio.
    """
    w, h = int(panel_wh[0]), int(panel_wh[1])
    long_side = max(w, h, 200)
    margin = max(8, long_side // 100)
    line_px = max(24, long_side // 40)
    title_px = line_px * max(1, int(title_lines)) + margin // 2
    font_scale = line_px / 40.0
    bar_w = max(14, long_side // 50)
    labels_w = int(4.0 * line_px)  # tick labels and the rotated bar label
    panel = (margin, title_px + margin, w, h)
    bar_h = max(40, int(h * 0.8))
    bar = (margin + w + 3 * margin, title_px + margin + (h - bar_h) // 2, bar_w, bar_h)
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


def overlay_panel(
    thumbnail: np.ndarray,
    scale: tuple[float, float],
    coords: np.ndarray,
    values: np.ndarray,
    patch_px_level0: float,
    cmap: str = DEFAULT_CMAP,
    value_range: tuple[float, float] = (0.0, 1.0),
    alpha: float = 0.6,
) -> np.ndarray:
    """The thumbnail with each patch blended towards its value's colour; uint8 ``[h, w, 3]``.

    A patch's colour is ``cmap`` at its value's position in ``value_range`` (clipped); its
    opacity grows from ``ALPHA_FLOOR * alpha`` at the bottom of the range to ``alpha`` at the
    top, so cool patches keep the stain visible. Pixels without a patch keep the thumbnail.
    """
    if not 0 < alpha <= 1:
        raise ConfigError(f"The 'alpha' parameter of draw_heatmap must be in (0, 1]. Got {alpha!r} instead.")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ConfigError(f"The 'value_range' parameter of draw_heatmap must be (low, high) with high > low. "
                          f"Got {value_range!r} instead.")
    lut = _colormap(cmap)
    thumb = np.asarray(thumbnail)
    h, w = thumb.shape[:2]
    smap = score_map((h, w), scale, coords, patch_px_level0, values)
    covered = ~np.isnan(smap)
    panel = thumb.astype(np.float32)
    if covered.any():
        t = np.clip((smap[covered] - lo) / (hi - lo), 0.0, 1.0)
        colour = lut[np.round(t * 255).astype(np.int64)].astype(np.float32)
        a = (alpha * (ALPHA_FLOOR + (1.0 - ALPHA_FLOOR) * t)).astype(np.float32)[:, None]
        panel[covered] = (1 - a) * panel[covered] + a * colour
    return np.clip(np.round(panel), 0, 255).astype(np.uint8)


def heatmap_figure(
    panel: np.ndarray,
    title: str = "",
    cmap: str = DEFAULT_CMAP,
    value_range: tuple[float, float] = (0.0, 1.0),
    label: str = "",
):
    """A Matplotlib ``Figure`` holding the panel (pasted pixel for pixel, framed), the title and
    ONE colour bar (its own axes: ``fig.axes == [colour bar]``), laid out by :func:`heatmap_layout`.

    ``title`` may hold several lines (``\\n``); ``label`` names the colour bar's quantity.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    panel = np.asarray(panel)
    h, w = panel.shape[:2]
    lines = title.split("\n") if title else []
    lay = heatmap_layout((w, h), title_lines=max(1, len(lines)))
    dpi = 100
    fig_w, fig_h = lay.size
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    px, py, pw, ph = lay.panel
    framed = np.empty((ph + 2, pw + 2, 3), np.uint8)
    framed[...] = FRAME
    framed[1:-1, 1:-1] = panel
    # figimage places raw pixels (no resampling); its offsets count from the bottom-left corner
    fig.figimage(framed, xo=px - 1, yo=fig_h - (py - 1) - (ph + 2), origin="upper")
    font_pt = lay.font_scale * 40 * 72 / dpi * 0.6
    for i, line in enumerate(lines):
        fig.text(px / fig_w, 1 - (lay.title_px * (i + 0.8) / max(1, len(lines))) / fig_h, line,
                 fontsize=font_pt * (1.0 if i == 0 else 0.85), ha="left", va="baseline")
    bx, by, bw, bh = lay.colorbar
    cax = fig.add_axes((bx / fig_w, 1 - (by + bh) / fig_h, bw / fig_w, bh / fig_h))
    mappable = ScalarMappable(norm=Normalize(*value_range), cmap=cmap)
    bar = fig.colorbar(mappable, cax=cax)
    bar.ax.tick_params(labelsize=font_pt * 0.75)
    if label:
        bar.set_label(label, fontsize=font_pt * 0.8)
    return fig


def _render(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


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
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.6,
    normalize: str = "rank",
    value_range: tuple[float, float] = (0.0, 1.0),
    label: str | None = None,
) -> np.ndarray:
    """Per-patch values as a coloured overlay on the slide thumbnail, with title and colour bar.

    Parameters
    ----------
    thumbnail : uint8 RGB ``[h, w, 3]`` of the whole slide.
    scale : ``(sx, sy)`` level-0 pixels per thumbnail pixel.
    coords : int ``[N, 2]`` level-0 top-left (x, y) of the patches, in the bag's row order.
    scores : float ``[N]`` per-patch values (same order).
    patch_px_level0 : patch side in level-0 pixels.
    title : text of the title band (slide id, label, probability; fold and model), lines split
        by ``\\n``.
    cmap : Matplotlib colormap name ('viridis', 'turbo', ...).
    alpha : opacity of the colour at the top of the range, in (0, 1].
    normalize : 'rank' (percentile per slide, the default), 'minmax' (per slide), or 'none'
        (``scores`` are already on the shared scale ``value_range``: the absolute mode).
    value_range : the colour bar's range for ``normalize='none'``.
    label : the colour bar's label (default: what ``normalize`` makes of the scores).

    Returns
    -------
    uint8 RGB figure; the panel at :func:`heatmap_layout` ``(w, h).panel`` is exactly ``[h, w]``
    (the thumbnail's shape, hence the slide's aspect ratio), framed by a 1-px :data:`FRAME` line.
    """
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
        values, value_range = rank_normalize(scores), (0.0, 1.0)
        label = label or "rank of the instance score within the slide"
    elif normalize == "minmax":
        span = float(scores.max() - scores.min()) if len(scores) else 0.0
        values = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
        value_range = (0.0, 1.0)
        label = label or "instance score, min-max within the slide"
    elif normalize == "none":
        values = scores
    else:
        raise ConfigError(f"The 'normalize' parameter of draw_heatmap must be 'rank', 'minmax' or 'none'. "
                          f"Got {normalize!r} instead.")
    panel = overlay_panel(thumb, scale, coords, values, patch_px_level0, cmap, value_range, alpha)
    return _render(heatmap_figure(panel, title, cmap, value_range, label or ""))


def draw_gallery(
    top_patches: Sequence[np.ndarray],
    bottom_patches: Sequence[np.ndarray],
    top_scores: Sequence[float] = (),
    bottom_scores: Sequence[float] = (),
    title: str = "",
    tile_px: int = 128,
    value_name: str = "rank percentile",
) -> np.ndarray:
    """Two labelled rows of patches: highest scores on top, lowest below.

    Parameters
    ----------
    top_patches, bottom_patches : uint8 RGB patches (any size; resized to ``tile_px``), in the
        order they should appear (top: highest first; bottom: lowest first).
    top_scores, bottom_scores : the heatmap values printed under each patch (optional).
    title : title band text (the first line of a multi-line title).
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
        _put_text(fig, title.split("\n")[0], (gap, int(title_px * 0.75)), font * 1.6, max_w=fig.shape[1] - 2 * gap)
    rows = (
        (f"highest {len(top_patches)} instance scores ({value_name} under each)", top_patches, top_scores, (200, 0, 0)),
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
    cmap: str = DEFAULT_CMAP,
    tile_px: int = 128,
    values: np.ndarray | None = None,
    value_label: str = "",
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<slide_id>.png`` (heatmap) and ``<slide_id>_gallery.png``.

    ``values`` (float ``[N]`` in ``[0, 1]``, e.g. :func:`absolute_scores`) are drawn on the shared
    range ``[0, 1]`` with the colour bar labelled ``value_label`` (the absolute mode); without
    them the picture shows ``scores`` by rank within the slide (the rank mode). The gallery picks
    its patches by ``scores`` and prints the drawn value under each.

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
        if values is None:
            heat = draw_heatmap(thumb, (sx, sy), coords, scores, patch_px_level0, title=title, cmap=cmap)
            shown, name = rank_normalize(scores), "rank percentile"
        else:
            shown = np.asarray(values, dtype=np.float64).reshape(-1)
            heat = draw_heatmap(thumb, (sx, sy), coords, shown, patch_px_level0, title=title, cmap=cmap,
                                normalize="none", label=value_label)
            name = "heatmap value"
        top, bottom = top_bottom(scores, k)
        gallery = draw_gallery(
            read_patches(slide, coords[top], patch_px_level0, tile_px),
            read_patches(slide, coords[bottom], patch_px_level0, tile_px),
            shown[top], shown[bottom], title=title, tile_px=tile_px, value_name=name,
        )
    heat_path = out_dir / f"{slide_id}.png"
    gallery_path = out_dir / f"{slide_id}_gallery.png"
    save_png(heat_path, heat)
    save_png(gallery_path, gallery)
    return heat_path, gallery_path
