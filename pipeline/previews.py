"""Segmentation previews a person can check at a glance.

One PNG per slide: the thumbnail with tissue outlines (green), holes (blue), ink and pen marks
removed from the tissue (magenta) and every kept patch as a translucent yellow square,
plus a caption with the slide id, patch count and scale, and a footer with a legend of those
colours and a scale bar (um or mm, from the slide's level-0 microns per pixel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TISSUE = (0, 200, 0)
HOLE = (30, 60, 255)
PATCH = (255, 210, 0)
INK = (255, 0, 200)
#: Smallest long side of a preview: thumbnails of tiny slides are enlarged to at least this.
MIN_LONG_PX = 480
#: Scale bar lengths to pick from, in micrometres (the one nearest a fifth of the width wins).
SCALE_BAR_UM = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


def scale_bar_um(um_per_px: float, width_px: int) -> tuple[int, int]:
    """A round scale-bar length (um) about a fifth of ``width_px`` wide, and its length in pixels."""
    target = width_px / 5.0 * um_per_px
    um = min(SCALE_BAR_UM, key=lambda v: abs(np.log(v / target)))
    return um, max(1, int(round(um / um_per_px)))


def _footer(width: int, band: int, ink: bool, um_per_px: float | None) -> np.ndarray:
    """White band with the legend (tissue, holes, patch grid, ink) and, with ``um_per_px``, a
    scale bar; at least ``width`` pixels wide (wider when the legend needs it)."""
    import cv2

    font, thick = band / 34, max(1, int(band / 22))
    items = [("tissue", TISSUE, "line"), ("holes", HOLE, "line"), ("patch grid", PATCH, "box")]
    if ink:
        items.append(("ink removed", INK, "box"))
    sw = band  # swatch width
    widths = [sw + 6 + cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, font, thick)[0][0] + band for t, _, _ in items]
    bar = scale_bar_um(um_per_px, width) if um_per_px else None
    bar_text = None if bar is None else (f"{bar[0] // 1000} mm" if bar[0] >= 1000 else f"{bar[0]} um")
    bar_w = 0 if bar is None else bar[1] + 8 + cv2.getTextSize(bar_text, cv2.FONT_HERSHEY_SIMPLEX, font, thick)[0][0]
    out = np.full((band + 8, max(width, 8 + sum(widths) + bar_w + 8), 3), 255, np.uint8)
    x, mid = 4, (band + 8) // 2
    for (text, colour, kind), w in zip(items, widths):
        if kind == "line":
            cv2.line(out, (x, mid), (x + sw, mid), colour, max(2, band // 8))
        else:
            cv2.rectangle(out, (x, mid - band // 3), (x + sw, mid + band // 3), colour, -1)
        cv2.putText(out, text, (x + sw + 6, mid + band // 4), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), thick,
                    cv2.LINE_AA)
        x += w
    if bar is not None:
        x1 = out.shape[1] - 4
        x0 = x1 - bar_w
        cv2.rectangle(out, (x0, mid - 3), (x0 + bar[1], mid + 3), (0, 0, 0), -1)
        cv2.putText(out, bar_text, (x0 + bar[1] + 8, mid + band // 4), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0),
                    thick, cv2.LINE_AA)
    return out


def draw_preview(
    image: np.ndarray,
    scale: tuple[float, float],
    contours: list[np.ndarray],
    holes: list[list[np.ndarray]],
    coords: np.ndarray,
    patch_px_level0: int,
    caption: str = "",
    ink: list[np.ndarray] | None = None,
    mpp: float | None = None,
) -> np.ndarray:
    """Draw tissue, holes and patches on a copy of ``image``.

    Parameters
    ----------
    image : uint8 RGB ``[h, w, 3]`` thumbnail.
    scale : ``(sx, sy)`` level-0 pixels per thumbnail pixel.
    contours, holes : level-0 ``[K, 2]`` (x, y) polygons, holes grouped per contour.
    coords : int64 ``[N, 2]`` level-0 top-left corners of the patches.
    patch_px_level0 : patch side in level-0 pixels.
    ink : level-0 ``[K, 2]`` outlines of the ink removed from the tissue, drawn in magenta.
    mpp : the slide's level-0 microns per pixel, for the scale bar (None: no scale bar).

    Returns
    -------
    uint8 RGB: the caption band, the drawn thumbnail (the slide's aspect ratio), and a footer
    with the legend and the scale bar.
    """
    import cv2

    canvas = np.ascontiguousarray(image.copy())
    sx, sy = scale
    long_side = max(canvas.shape[:2])
    if 0 < long_side < MIN_LONG_PX:  # a 16-px slide must still be a picture one can look at
        f = int(np.ceil(MIN_LONG_PX / long_side))
        canvas = cv2.resize(canvas, (canvas.shape[1] * f, canvas.shape[0] * f), interpolation=cv2.INTER_NEAREST)
        sx, sy = sx / f, sy / f
    thick = max(1, round(max(canvas.shape[:2]) / 600))

    if len(coords):
        overlay = canvas.copy()
        x0 = np.floor(coords[:, 0] / sx).astype(int)
        y0 = np.floor(coords[:, 1] / sy).astype(int)
        x1 = np.ceil((coords[:, 0] + patch_px_level0) / sx).astype(int) - 1
        y1 = np.ceil((coords[:, 1] + patch_px_level0) / sy).astype(int) - 1
        for a, b, c, d in zip(x0, y0, x1, y1):
            cv2.rectangle(overlay, (int(a), int(b)), (int(c), int(d)), PATCH, -1)
        canvas = cv2.addWeighted(overlay, 0.25, canvas, 0.75, 0)
        if (x1 - x0).mean() >= 6:  # grid lines only where patches are big enough to see
            for a, b, c, d in zip(x0, y0, x1, y1):
                cv2.rectangle(canvas, (int(a), int(b)), (int(c), int(d)), PATCH, 1)

    def to_thumb(poly: np.ndarray) -> np.ndarray:
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2) / (sx, sy)
        return np.round(pts).astype(np.int32).reshape(-1, 1, 2)

    if ink:
        # Filled at half strength with a solid outline, so the mark under it stays visible.
        shade = canvas.copy()
        cv2.fillPoly(shade, [to_thumb(c) for c in ink], INK)
        canvas = cv2.addWeighted(shade, 0.5, canvas, 0.5, 0)
        cv2.polylines(canvas, [to_thumb(c) for c in ink], True, INK, thick)
    if contours:
        cv2.polylines(canvas, [to_thumb(c) for c in contours], True, TISSUE, thick + 1)
    flat_holes = [h for group in holes for h in group]
    if flat_holes:
        cv2.polylines(canvas, [to_thumb(h) for h in flat_holes], True, HOLE, thick)

    band = max(18, canvas.shape[1] // 40)
    footer = _footer(canvas.shape[1], band, bool(ink), float(sx) * mpp if mpp else None)
    if footer.shape[1] > canvas.shape[1]:  # a narrow slide: widen the picture, never cut the legend
        canvas = np.hstack([canvas, np.full((canvas.shape[0], footer.shape[1] - canvas.shape[1], 3), 255, np.uint8)])
    canvas = np.vstack([canvas, footer])
    if caption:
        header = np.full((band + 8, canvas.shape[1], 3), 255, np.uint8)
        font_scale = band / 30
        thick = max(1, int(font_scale * 1.5))
        (text_w, _), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thick)
        if text_w + 8 > canvas.shape[1]:  # a narrow slide: widen the picture, never cut the caption
            pad = np.full((canvas.shape[0], text_w + 8 - canvas.shape[1], 3), 255, np.uint8)
            canvas = np.hstack([canvas, pad])
            header = np.full((band + 8, canvas.shape[1], 3), 255, np.uint8)
        cv2.putText(header, caption, (4, band), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0),
                    thick, cv2.LINE_AA)
        canvas = np.vstack([header, canvas])
    return canvas


def save_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB image as PNG, atomically: a reader never sees half a picture."""
    import cv2

    from extract.runtime import atomic_write

    ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    atomic_write(Path(path), lambda f: f.write(png.tobytes()))
