"""Slide access: one small context-manager class over OpenSlide.

All coordinates are in the level-0 reference frame unless a name says otherwise; sizes are
``(width, height)`` in pixels of the level they name; microns per pixel (mpp) are micrometres.

    with Slide("a.svs", mpp=None) as s:
        s.mpp, s.mpp_source          # 0.499, 'openslide.mpp-x'
        rgb = s.read_region((x, y), level, (w, h))   # uint8 [h, w, 3]
        thumb, scale = s.thumbnail(64)               # never refuses a huge level
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SlideError

# Sane bounds for a slide's resolution; anything outside is a broken header, not a slide.
_MPP_MIN, _MPP_MAX = 0.01, 100.0


@dataclass(frozen=True)
class Resolution:
    """Microns per pixel at level 0 and where the number came from."""

    mpp: float | None
    source: str


def resolve_mpp(properties: dict[str, str], override: float | None = None) -> Resolution:
    """Resolve level-0 microns per pixel from OpenSlide properties.

    Order: ``override`` (the manifest ``mpp`` column or a CLI flag), ``openslide.mpp-x``,
    ``aperio.MPP``, ``openslide.mirax.MPP``, ``hamamatsu.XResolution`` (pixels per cm),
    ``tiff.XResolution`` with ``tiff.ResolutionUnit``, then ``openslide.objective-power``
    (mpp ~ 10 / objective). Returns ``Resolution(None, 'none')`` when nothing is usable.
    """
    if override is not None and not _is_nan(override):
        return Resolution(float(override), "override")

    def number(key: str) -> float | None:
        try:
            value = float(properties[key])
        except (KeyError, TypeError, ValueError):
            return None
        return value if math.isfinite(value) and value > 0 else None

    for key in ("openslide.mpp-x", "aperio.MPP", "openslide.mirax.MPP"):
        value = number(key)
        if value is not None and _MPP_MIN <= value <= _MPP_MAX:
            return Resolution(value, key)

    per_cm = number("hamamatsu.XResolution")
    if per_cm is not None and _MPP_MIN <= 10000.0 / per_cm <= _MPP_MAX:
        return Resolution(10000.0 / per_cm, "hamamatsu.XResolution")

    per_unit = number("tiff.XResolution")
    unit = properties.get("tiff.ResolutionUnit", "").lower()
    microns_per_unit = {"centimeter": 10000.0, "inch": 25400.0}.get(unit)
    if per_unit is not None and microns_per_unit is not None:
        value = microns_per_unit / per_unit
        if _MPP_MIN <= value <= _MPP_MAX:
            return Resolution(value, f"tiff.XResolution ({unit})")

    objective = number("openslide.objective-power")
    if objective is not None:
        return Resolution(10.0 / objective, "openslide.objective-power")
    return Resolution(None, "none")


def _is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


class Slide:
    """An open whole-slide image.

    Parameters
    ----------
    path : str or Path
        Any file OpenSlide opens (SVS, generic tiled TIFF, NDPI, MRXS, ...).
    mpp : float, optional
        Level-0 microns per pixel that overrides whatever the file says.
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        import openslide

        self.path = Path(path)
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            raise SlideError(f"{self.path}: file not found; check the manifest 'path' column") from None
        except OSError as exc:
            raise SlideError(f"{self.path}: cannot be read ({exc.strerror or exc})") from exc
        # Only regular files are opened: a FIFO or a device would block OpenSlide's open() forever.
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise SlideError(f"{self.path}: {kind}, not a slide file; point the manifest 'path' at the slide file")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
            raise SlideError(
                f"{self.path}: OpenSlide cannot open this file ({exc}); "
                "convert it to a pyramidal TIFF/SVS or remove it from the manifest"
            ) from exc
        self.properties: dict[str, str] = dict(self._osr.properties)
        self.resolution = resolve_mpp(self.properties, mpp)

    # -- resource -----------------------------------------------------------------------------
    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- geometry -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def vendor(self) -> str:
        return self.properties.get("openslide.vendor", "unknown")

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return tuple(self._osr.dimensions)

    @property
    def level_count(self) -> int:
        return self._osr.level_count

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self._osr.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._osr.level_downsamples]

    @property
    def mpp(self) -> float | None:
        """Level-0 microns per pixel, or None when the slide carries no resolution."""
        return self.resolution.mpp

    @property
    def mpp_source(self) -> str:
        return self.resolution.source

    def require_mpp(self) -> float:
        """Level-0 mpp, or a :class:`SlideError` that lists the ways to supply one."""
        if self.mpp is None:
            raise SlideError(
                f"{self.path}: the slide carries no resolution (no mpp, no TIFF resolution, no "
                "objective power); add an 'mpp' column to the manifest for this row, pass "
                "--slide-mpp, or tile by pyramid level with --patch-level"
            )
        return self.mpp

    def best_level_for_downsample(self, downsample: float) -> int:
        """The level with the largest downsample that is <= ``downsample`` (level 0 at least)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample + 1e-6:
                best = level
        return best

    def tile_size(self, level: int) -> tuple[int, int] | None:
        """The file's stored tile ``(width, height)`` at ``level``, if OpenSlide reports it."""
        try:
            return (
                int(self.properties[f"openslide.level[{level}].tile-width"]),
                int(self.properties[f"openslide.level[{level}].tile-height"]),
            )
        except (KeyError, ValueError):
            return None

    # -- pixels -------------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read ``size`` pixels of ``level`` starting at level-0 ``location``.

        Returns uint8 RGB ``[height, width, 3]``; transparent pixels (outside the scanned area)
        come back white, as a pathologist sees glass.
        """
        import openslide

        w, h = int(size[0]), int(size[1])
        try:
            region = self._osr.read_region((int(location[0]), int(location[1])), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{self.path}: reading {w}x{h} px at level {level} from {tuple(location)} failed "
                f"({exc}); the file may be corrupt"
            ) from exc
        return rgba_to_rgb_on_white(np.asarray(region))

    def thumbnail(self, downsample: float = 64.0, block_px: int = 4096) -> tuple[np.ndarray, tuple[float, float]]:
        """An RGB image of the whole slide at about ``downsample`` x below level 0.

        Reads the deepest level that still has at least that resolution, in blocks of
        ``block_px`` level pixels, and area-downscales each block, so a huge single-level slide
        costs memory for the thumbnail only (CLAM refuses such slides).

        Returns
        -------
        image : uint8 ``[h, w, 3]``
        scale : ``(sx, sy)``, level-0 pixels per thumbnail pixel along x and y.
        """
        import cv2

        level = self.best_level_for_downsample(downsample)
        level_ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        W0, H0 = self.dimensions
        extra = max(downsample / level_ds, 1.0)
        tw, th = max(1, int(round(lw / extra))), max(1, int(round(lh / extra)))
        if extra <= 1.0 + 1e-6:
            image = self.read_region((0, 0), level, (lw, lh))
            return image, (W0 / lw, H0 / lh)

        out = np.empty((th, tw, 3), dtype=np.uint8)
        # Blocks are multiples of the downscale factor so block edges land on output pixels.
        step = max(1, int(block_px // extra)) 
        for oy in range(0, th, step):
            for ox in range(0, tw, step):
                ow, oh = min(step, tw - ox), min(step, th - oy)
                x0, y0 = int(round(ox * extra)), int(round(oy * extra))
                x1, y1 = min(lw, int(round((ox + ow) * extra))), min(lh, int(round((oy + oh) * extra)))
                if x1 <= x0 or y1 <= y0:
                    out[oy:oy + oh, ox:ox + ow] = 255
                    continue
                block = self.read_region(
                    (int(x0 * level_ds), int(y0 * level_ds)), level, (x1 - x0, y1 - y0)
                )
                out[oy:oy + oh, ox:ox + ow] = cv2.resize(block, (ow, oh), interpolation=cv2.INTER_AREA)
        return out, (W0 / tw, H0 / th)


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite premultiplied-free RGBA ``[h, w, 4]`` from OpenSlide onto white; uint8 RGB."""
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        return np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    # OpenSlide returns premultiplied colour un-premultiplied; transparent means "not scanned".
    rgb = rgba[..., :3].astype(np.uint16)
    a = alpha.astype(np.uint16)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)
