"""Segmentation previews a person can check at a glance.

One PNG per slide: the thumbnail with tissue outlines (green), holes (blue), ink and pen marks
removed from the tissue (magenta) and every kept patch as a translucent yellow square,
plus a caption with the slide id, patch count and scale.
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


def draw_preview(
    image: np.ndarray,
    scale: tuple[float, float],
    contours: list[np.ndarray],
    holes: list[list[np.ndarray]],
    coords: np.ndarray,
    patch_px_level0: int,
    caption: str = "",
    ink: list[np.ndarray] | None = None,
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

    if caption:
        band = max(18, canvas.shape[1] // 40)
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
    import os

    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
