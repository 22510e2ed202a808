"""Tissue segmentation: CLAM's saturation-threshold algorithm, as pure functions.

The algorithm and its defaults are CLAM's (mahmoodlab/CLAM ``WholeSlideImage.segmentTissue``),
reproduced step for step so that contour and patch counts match CLAM on the same image:

1. RGB -> HSV, keep saturation;
2. median blur with an odd kernel ``mthresh``;
3. ``saturation > sthresh`` (or Otsu's threshold when ``use_otsu``);
4. morphological close with a ``close x close`` kernel of ones (skipped when 0);
5. contours with a two-level hierarchy (``cv2.RETR_CCOMP``: outer boundaries and their holes);
6. keep an outer contour when its area minus its holes' areas exceeds ``a_t``; for each kept
   contour keep its ``max_n_holes`` largest holes, then those larger than ``a_h``.

Areas ``a_t``/``a_h`` are in units of one 512 x 512 px patch at level 0, converted to pixels of
the segmentation image, so a preset means the same physical-pixel area at every level.

    params = load_preset("bwh_biopsy")
    rgb, scale = segmentation_image(slide)             # CLAM's level, or a block thumbnail
    tissue = segment_tissue(rgb, params, scale)        # contours/holes in level-0 pixels
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = [
    "SegmentParams",
    "Tissue",
    "PRESETS",
    "list_presets",
    "load_preset",
    "segment_tissue",
    "segmentation_image",
    "segment_mask",
    "tissue_mask",
    "REF_PATCH_PX",
    "CLAM_MAX_LEVEL_PX",
]

# CLAM's unit of area for a_t / a_h: one 512 x 512 patch at level 0 (``ref_patch_size``).
REF_PATCH_PX = 512
# CLAM gives up (status failed_seg) above this many pixels in the segmentation level; we fall
# back to a block-built thumbnail instead.
CLAM_MAX_LEVEL_PX = 1e8
# Where the YAML presets live in a source checkout (not shipped in wheels: PRESETS below is the
# installed copy, and a test keeps the two equal).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "segment"


@dataclass(frozen=True)
class SegmentParams:
    """CLAM segmentation parameters (CLAM's names and defaults).

    Parameters
    ----------
    sthresh : int
        Saturation threshold (0-255): pixels with median-blurred saturation > sthresh are tissue.
    mthresh : int
        Median blur kernel size in segmentation-image pixels (odd, >= 3).
    close : int
        Side of the square closing kernel in segmentation-image pixels; 0 disables closing.
    use_otsu : bool
        Use Otsu's threshold instead of ``sthresh``.
    a_t : float
        Minimum tissue area (outer contour minus its holes), in 512 x 512 level-0 patches.
    a_h : float
        Minimum hole area, in 512 x 512 level-0 patches.
    max_n_holes : int
        Number of largest holes per contour considered before the ``a_h`` filter.
    remove_ink : bool
        Remove ink and pen marks (:mod:`extract.ink`) from the tissue mask before contours are
        found; the regions they leave inside tissue are holes kept whatever their size.
    ink_colours : str
        Comma-separated marker colours to remove, among blue, green, black, red (drop ``black``
        on pigmented tissue such as melanoma, where melanin is as dark as a marker).
    """

    sthresh: int = 8
    mthresh: int = 7
    close: int = 4
    use_otsu: bool = False
    a_t: float = 100
    a_h: float = 16
    max_n_holes: int = 8
    remove_ink: bool = False
    ink_colours: str = "blue,green,black,red"

    def __post_init__(self) -> None:
        def fail(name: str, what: str) -> None:
            raise ConfigError(
                f"The '{name}' parameter of SegmentParams must be {what}. "
                f"Got {getattr(self, name)!r} instead."
            )

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        if not (is_int(self.sthresh) and 0 <= self.sthresh <= 255):
            fail("sthresh", "an int in the range [0, 255]")
        if not (is_int(self.mthresh) and self.mthresh >= 3 and self.mthresh % 2 == 1):
            fail("mthresh", "an odd int >= 3 (median blur kernel size in pixels)")
        if not (is_int(self.close) and self.close >= 0):
            fail("close", "an int >= 0 (closing kernel size in pixels; 0 disables closing)")
        if not isinstance(self.use_otsu, (bool, np.bool_)):
            fail("use_otsu", "a bool")
        if not (is_num(self.a_t) and math.isfinite(self.a_t) and self.a_t >= 0):
            fail("a_t", "a float >= 0 (area in 512 x 512 level-0 patches)")
        if not (is_num(self.a_h) and math.isfinite(self.a_h) and self.a_h >= 0):
            fail("a_h", "a float >= 0 (area in 512 x 512 level-0 patches)")
        if not (is_int(self.max_n_holes) and self.max_n_holes >= 0):
            fail("max_n_holes", "an int >= 0")
        if not isinstance(self.remove_ink, (bool, np.bool_)):
            fail("remove_ink", "a bool")
        from .ink import parse_colours

        if not isinstance(self.ink_colours, str):
            fail("ink_colours", "a comma-separated string such as 'blue,green,black,red'")
        parse_colours(self.ink_colours)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "segmentation parameters") -> "SegmentParams":
        """Build from a mapping; unknown keys are a :class:`ConfigError` naming them."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a mapping of parameters. Got {type(values).__name__} instead.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys are {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# CLAM's presets (CLAM presets/*.csv); configs/segment/<name>.yaml hold the same values.
PRESETS: dict[str, SegmentParams] = {
    "default": SegmentParams(sthresh=8, mthresh=7, close=4, use_otsu=False, a_t=100, a_h=16, max_n_holes=8),
    "tcga": SegmentParams(sthresh=8, mthresh=7, close=4, use_otsu=False, a_t=16, a_h=4, max_n_holes=8),
    "bwh_biopsy": SegmentParams(sthresh=15, mthresh=11, close=2, use_otsu=False, a_t=1, a_h=1, max_n_holes=2),
    "bwh_resection": SegmentParams(sthresh=15, mthresh=11, close=4, use_otsu=False, a_t=100, a_h=16, max_n_holes=8),
    # Ours: bwh_biopsy with ink and pen marks removed (biopsies are inked at their margins).
    "biopsy_ink": SegmentParams(sthresh=15, mthresh=11, close=2, use_otsu=False, a_t=1, a_h=1, max_n_holes=2,
                                remove_ink=True),
}


def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted(PRESETS)


def load_preset(name: str | os.PathLike) -> SegmentParams:
    """A built-in preset by name, or the parameters in a YAML file.

    Parameters
    ----------
    name : str or Path
        ``'default'``, ``'tcga'``, ``'bwh_biopsy'``, ``'bwh_resection'``, ``'biopsy_ink'``, or a path to a YAML
        file with any of :class:`SegmentParams`' fields (missing ones take CLAM's defaults).
    """
    text = str(name)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"segmentation preset file {path} not found")
        import yaml

        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        return SegmentParams.from_dict(values, where=str(path))
    raise ConfigError(
        f"unknown segmentation preset {text!r}; choose one of {', '.join(list_presets())} "
        "or give the path of a YAML file"
    )


@dataclass(frozen=True)
class Tissue:
    """Segmented tissue in level-0 pixel coordinates.

    Attributes
    ----------
    contours : list of int32 ndarray ``[K, 2]``
        Outer boundary of each kept tissue region, ``(x, y)`` level-0 pixels, in the order
        OpenCV found them (CLAM's order).
    holes : list of list of int32 ndarray ``[K, 2]``
        ``holes[i]`` are the kept holes of ``contours[i]``.
    n_raw_contours : int
        Outer contours found by thresholding, before the area filter.
    threshold : float
        Saturation threshold used (``sthresh``, or Otsu's value).
    min_area_px : float
        The tissue area filter in segmentation-image pixels (``a_t`` converted).
    min_hole_area_px : float
        The hole area filter in segmentation-image pixels (``a_h`` converted).
    scale : (float, float)
        Level-0 pixels per segmentation-image pixel along x and y.
    image_wh : (int, int)
        Size of the segmentation image.
    params : SegmentParams
    ink_contours : list of int32 ndarray ``[K, 2]``
        Outlines of the ink removed from the tissue (level-0 px); empty without ``remove_ink``.
    ink_px : dict colour -> int
        Segmentation-image pixels each marker colour removed from the thresholded tissue.
    ink_removed_px : int
        Pixels removed by all colours together (a pixel can match two colours' edges).
    threshold_px : int
        Pixels of the thresholded, closed mask before ink removal (what CLAM calls tissue).
    """

    contours: list[np.ndarray]
    holes: list[list[np.ndarray]]
    n_raw_contours: int
    threshold: float
    min_area_px: float
    min_hole_area_px: float
    scale: tuple[float, float]
    image_wh: tuple[int, int]
    params: SegmentParams = field(default_factory=SegmentParams)
    ink_contours: list[np.ndarray] = field(default_factory=list)
    ink_px: dict[str, int] = field(default_factory=dict)
    ink_removed_px: int = 0
    threshold_px: int = 0

    @property
    def ink_fraction(self) -> float:
        """Share of the thresholded tissue removed as ink (0-1)."""
        return self.ink_removed_px / self.threshold_px if self.threshold_px else 0.0

    @property
    def n_contours(self) -> int:
        return len(self.contours)

    @property
    def is_empty(self) -> bool:
        return not self.contours

    def describe_empty(self) -> str:
        """Why no tissue was kept, in words a user can act on."""
        if self.n_raw_contours == 0 and self.threshold < 0:
            return "no tissue found: the tissue model labelled no pixel as tissue"
        if self.n_raw_contours == 0:
            return (
                f"no tissue found: no pixel has saturation > {self.threshold:g} after the median blur; "
                "lower sthresh or try use_otsu"
            )
        a_t = self.params.a_t
        level0 = a_t * REF_PATCH_PX**2
        return (
            f"no tissue kept by the area filter (a_t = {a_t:g} -> {self.min_area_px:.0f} px at the "
            f"segmentation level, {level0 / 1e6:.1f} M level-0 px): {self.n_raw_contours} region(s) "
            "found, all smaller; lower --a-t"
            + ("" if a_t <= 1 else " or use a preset with a smaller a_t (e.g. bwh_biopsy) for small tissue")
        )


def segment_tissue(
    rgb: np.ndarray, params: SegmentParams | None = None, scale: tuple[float, float] = (1.0, 1.0)
) -> Tissue:
    """Segment tissue on a low-resolution RGB image of a slide (CLAM's algorithm).

    Parameters
    ----------
    rgb : uint8 ndarray ``[h, w, 3]``
        The slide at the segmentation resolution (white or black where nothing was scanned).
    params : SegmentParams, optional
        Defaults to CLAM's defaults (preset ``default``).
    scale : (float, float)
        Level-0 pixels per image pixel along x and y (``(W0 / w, H0 / h)``).

    Returns
    -------
    Tissue
        Contours and holes in level-0 pixels, plus the diagnostics of the filter.
    """
    import cv2

    params = params or SegmentParams()
    image = np.asarray(rgb)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ConfigError(
            "The 'rgb' parameter of segment_tissue must be a uint8 array [h, w, 3]. "
            f"Got {image.dtype} {image.shape} instead."
        )
    sx, sy = float(scale[0]), float(scale[1])
    if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
        raise ConfigError(f"The 'scale' parameter of segment_tissue must be two floats > 0. Got {scale!r} instead.")
    image = np.ascontiguousarray(image[..., :3])
    h, w = image.shape[:2]

    saturation = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[:, :, 1]
    blurred = cv2.medianBlur(saturation, params.mthresh)
    if params.use_otsu:
        threshold, mask = cv2.threshold(blurred, 0, 255, cv2.THRESH_OTSU + cv2.THRESH_BINARY)
    else:
        threshold, mask = cv2.threshold(blurred, params.sthresh, 255, cv2.THRESH_BINARY)
    if params.close > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((params.close, params.close), np.uint8))
    return _tissue_from_mask(mask, float(threshold), image, params, sx, sy)


def segment_mask(mask: np.ndarray, params: SegmentParams | None = None, scale: tuple[float, float] = (1.0, 1.0),
                 rgb: np.ndarray | None = None) -> Tissue:
    """Contours and holes of a tissue mask made elsewhere (a deep model), with CLAM's filters.

    Parameters
    ----------
    mask : bool or uint8 ndarray ``[h, w]`` (nonzero = tissue)
    params : SegmentParams, optional
        Only the area/hole filters (``a_t``, ``a_h``, ``max_n_holes``) and ink removal apply.
    scale : (float, float)
        Level-0 pixels per mask pixel.
    rgb : uint8 ndarray ``[h, w, 3]``, optional
        The image the mask was made from; needed for ``remove_ink``.
    """
    params = params or SegmentParams()
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ConfigError(f"The 'mask' parameter of segment_mask must be a 2-d array. Got shape {m.shape} instead.")
    if params.remove_ink and (rgb is None or np.asarray(rgb).shape[:2] != m.shape):
        raise ConfigError("segment_mask: remove_ink needs the RGB image the mask was made from (same size)")
    image = np.zeros(m.shape + (3,), np.uint8) if rgb is None else np.ascontiguousarray(np.asarray(rgb)[..., :3])
    return _tissue_from_mask(np.where(m > 0, 255, 0).astype(np.uint8), -1.0, image, params,
                             float(scale[0]), float(scale[1]))


def _tissue_from_mask(mask: np.ndarray, threshold: float, image: np.ndarray, params: SegmentParams,
                      sx: float, sy: float) -> Tissue:
    """CLAM's steps 5-6 (and ink removal) on a binary uint8 mask (0/255) of the segmentation image."""
    import cv2

    h, w = mask.shape[:2]
    ink = _remove_ink(image, mask, params) if params.remove_ink else None

    # CLAM truncates the reference-patch area to whole pixels before multiplying.
    ref_area = int(REF_PATCH_PX**2 / (sx * sy))
    min_area = params.a_t * ref_area
    min_hole_area = params.a_h * ref_area

    found = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    contours, hierarchy = found[-2], found[-1]
    empty = Tissue([], [], 0, float(threshold), float(min_area), float(min_hole_area), (sx, sy), (w, h), params)
    if ink is not None:
        removed, ink_px = ink
        ink_found = cv2.findContours(removed.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[-2]
        empty = dataclasses.replace(
            empty, ink_contours=[_to_level0(c, sx, sy) for c in ink_found], ink_px=ink_px,
            ink_removed_px=int(removed.sum()), threshold_px=int(np.count_nonzero(mask) + removed.sum()))
    if hierarchy is None or len(contours) == 0:
        return empty
    parent = hierarchy.reshape(-1, 4)[:, 3]
    outer = np.flatnonzero(parent == -1)
    areas = np.array([cv2.contourArea(c) for c in contours])
    # Holes left by removed ink are exclusions, not lumens: kept whatever their size or rank.
    inked = _holes_with(removed, contours, parent) if ink is not None else set()

    # A piece cut in two by a pen line keeps both halves: the area filter judges the piece as it
    # was before the ink was removed (pixels of its connected region).
    before_ink = _region_areas(mask | removed, contours, outer) if ink is not None else {}

    kept, kept_holes = [], []
    for idx in outer:
        hole_ids = np.flatnonzero(parent == idx)
        # Tissue area excludes its holes (a ring of tissue around a big lumen is small).
        area = areas[idx] - areas[hole_ids].sum()
        if area == 0 or not max(area, before_ink.get(int(idx), 0)) > min_area:
            continue
        # Largest holes first; Python's sort is stable, as CLAM's sorted() is.
        plain = [i for i in hole_ids.tolist() if i not in inked]
        ranked = sorted(plain, key=lambda i: areas[i], reverse=True)[: params.max_n_holes]
        kept.append(_to_level0(contours[idx], sx, sy))
        kept_holes.append([_to_level0(contours[i], sx, sy) for i in ranked if areas[i] > min_hole_area]
                          + [_to_level0(contours[i], sx, sy) for i in hole_ids.tolist() if i in inked])

    return dataclasses.replace(empty, contours=kept, holes=kept_holes, n_raw_contours=len(outer))


def _remove_ink(image: np.ndarray, mask: np.ndarray, params: SegmentParams):
    """Clear ink from ``mask`` in place; returns (removed bool ``[h, w]``, pixels per colour)."""
    from .ink import ink_regions

    tissue = mask > 0
    regions = ink_regions(image, params.ink_colours, blur_px=params.mthresh)
    removed = np.zeros_like(tissue)
    ink_px = {}
    for colour, region in regions.items():
        hit = region & tissue
        ink_px[colour] = int(hit.sum())
        removed |= hit
    mask[removed] = 0
    return removed, ink_px


def _region_areas(mask: np.ndarray, contours, outer: np.ndarray) -> dict[int, int]:
    """Pixel area of the connected region of ``mask`` each outer contour lies in."""
    import cv2

    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = {}
    for idx in outer:
        x, y = contours[idx][0, 0]
        areas[int(idx)] = int(stats[labels[y, x], cv2.CC_STAT_AREA]) if labels[y, x] else 0
    return areas


def _holes_with(pixels: np.ndarray, contours, parent: np.ndarray) -> set[int]:
    """Indices of the hole contours (``parent >= 0``) whose inside holds any of ``pixels``."""
    import cv2

    if not pixels.any():
        return set()
    labels = np.zeros(pixels.shape, np.int32)
    for i in np.flatnonzero(parent >= 0):
        cv2.drawContours(labels, contours, int(i), int(i) + 1, thickness=-1)
    return {int(v) - 1 for v in np.unique(labels[pixels]) if v > 0}


def _to_level0(contour: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Image-pixel contour ``[K, 1, 2]`` -> level-0 int32 ``[K, 2]``, truncated as CLAM does."""
    points = contour.reshape(-1, 2).astype(np.float64) * (sx, sy)
    return points.astype(np.int32)


def segmentation_image(
    slide, mode: str = "clam", downsample: float = 64.0, max_level_px: float = CLAM_MAX_LEVEL_PX
) -> tuple[np.ndarray, tuple[float, float]]:
    """The image to segment a slide on and its scale; never refuses a slide.

    Parameters
    ----------
    slide : extract.slide.Slide
    mode : {'clam', 'thumbnail'}
        ``'clam'``: the whole pyramid level OpenSlide picks for ``downsample``
        (``get_best_level_for_downsample``), exactly what CLAM segments, when that level has at
        most ``max_level_px`` pixels; above that (where CLAM fails the slide) the block thumbnail.
        ``'thumbnail'``: always :meth:`Slide.thumbnail`, area-downscaled to about ``downsample``
        x below level 0, so kernel sizes mean the same on every slide.
    downsample : float
        Target level-0 pixels per segmentation pixel.
    max_level_px : float
        Largest level (width x height) read whole in ``'clam'`` mode; CLAM's limit is 1e8.

    Returns
    -------
    rgb : uint8 ndarray ``[h, w, 3]``
    scale : (float, float)
        Level-0 pixels per image pixel along x and y.
    """
    if mode not in ("clam", "thumbnail"):
        raise ConfigError(
            f"The 'mode' parameter of segmentation_image must be 'clam' or 'thumbnail'. Got {mode!r} instead."
        )
    if not (isinstance(downsample, (int, float)) and downsample >= 1):
        raise ConfigError(
            f"The 'downsample' parameter of segmentation_image must be a number >= 1. Got {downsample!r} instead."
        )
    if mode == "clam":
        level = slide.best_level_for_downsample(downsample)
        lw, lh = slide.level_dimensions[level]
        if lw * lh <= max_level_px:
            w0, h0 = slide.dimensions
            rgb = slide.read_region((0, 0), level, (lw, lh))
            # CLAM's level_downsamples: measured per axis from the level sizes.
            return rgb, (w0 / lw, h0 / lh)
    return slide.thumbnail(downsample)


def tissue_mask(tissue: Tissue, image_wh: tuple[int, int] | None = None,
                scale: tuple[float, float] | None = None) -> np.ndarray:
    """The kept tissue (contours minus their holes) drawn as a bool mask ``[h, w]``.

    Parameters
    ----------
    tissue : Tissue
    image_wh : (int, int), optional
        Size of the mask; defaults to the segmentation image (``tissue.image_wh``).
    scale : (float, float), optional
        Level-0 pixels per mask pixel; defaults to ``tissue.scale``.
    """
    import cv2

    w, h = image_wh or tissue.image_wh
    sx, sy = scale or tissue.scale
    canvas = np.zeros((int(h), int(w)), np.uint8)

    def pts(poly):
        return np.round(np.asarray(poly, np.float64).reshape(-1, 2) / (sx, sy)).astype(np.int32).reshape(-1, 1, 2)

    for contour, holes in zip(tissue.contours, tissue.holes):
        cv2.drawContours(canvas, [pts(contour)], -1, 1, thickness=-1)
        if holes:
            cv2.drawContours(canvas, [pts(hole) for hole in holes], -1, 0, thickness=-1)
    return canvas.astype(bool)
