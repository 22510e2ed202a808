"""Ink and pen marks on a slide thumbnail, by colour rules measured on real slides.

Pathologists circle regions with felt-tip markers (blue, green, black, red) and smear ink on the
edges of biopsies; CLAM's saturation threshold keeps all of it as tissue. H&E only spans a narrow
band of hues (eosin pink 300-350 deg, hematoxylin purple 255-290 deg, with red the largest
channel), so marker colours outside that band are told apart by hue, saturation and the sign of
a channel difference. The rules run on the median-blurred segmentation image (the same blur as
CLAM's saturation mask), where a pixel is tens of micrometres wide and nuclei blend with stroma.

Thresholds (hue in degrees, saturation and value 0-255 as OpenCV's HSV_FULL, RGB 0-255), and what
they were measured on (``biopsy_he_with_ink.jpeg``, a real prostate biopsy with a blue ink smear
and black pigment specks, plus five other real H&E images and slides, all median-blurred with a
7-px kernel; "tissue" = saturation > 15):

=======  ===========================================================  =============================
colour   rule                                                          measured
=======  ===========================================================  =============================
blue     190 <= hue <= 250, S >= 50, B - R >= 25                       ink: hue 101-125 x 2 (median
                                                                       226 deg), B - R median 73;
                                                                       H&E: B - R <= -2 (99.9 %) in
                                                                       the biopsy, hematoxylin hue
                                                                       >= 255 deg; fires on <= 0.01 %
                                                                       of tissue in 5 other images
green    70 <= hue < 190, S >= 40, G - R >= 20                         H&E always has R > G (R - G
                                                                       >= 15 at 0.1 %); fires on 0 %
red      hue >= 345 or hue <= 15, S >= 110, R - G >= 70               eosin: B - G 3-40 puts its hue
                                                                       at 300-345 deg; fires on
                                                                       <= 0.06 % of tissue
black    V = max(R, G, B) <= 60                                        pigment/ink specks V 1-99
                                                                       (median 35); tissue V >= 92
                                                                       at 0.1 % in the biopsy,
                                                                       >= 56 in the darkest image
=======  ===========================================================  =============================

The marks found are grown by ``dilate_px`` pixels, because a marker's edge fades into the tissue
(a blurred blue halo whose pixels are half ink and half stain).

    masks = ink_masks(rgb)                       # strict rules: {'blue': bool [h, w], ...}
    regions = ink_regions(rgb)                   # the marks with their faded edges, per colour
    ink = ink_mask(rgb)                          # bool [h, w], every colour
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

__all__ = ["INK_COLOURS", "ink_masks", "ink_regions", "ink_mask", "parse_colours"]

#: Marker colours the rules know, in the order they are reported.
INK_COLOURS = ("blue", "green", "black", "red")


def parse_colours(colours: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``'blue,black'`` or a sequence -> a validated tuple of colour names."""
    items = colours.split(",") if isinstance(colours, str) else list(colours)
    names = tuple(str(c).strip().lower() for c in items if str(c).strip())
    bad = [c for c in names if c not in INK_COLOURS]
    if bad or not names:
        raise ConfigError(
            f"The 'ink_colours' parameter must list colours among {', '.join(INK_COLOURS)} "
            f"(comma-separated). Got {colours!r} instead."
        )
    return names


def ink_masks(rgb: np.ndarray, colours=INK_COLOURS, blur_px: int = 7, weak: bool = False) -> dict[str, np.ndarray]:
    """Pixels of each marker colour.

    Parameters
    ----------
    rgb : uint8 ndarray ``[h, w, 3]``
        The segmentation image (a thumbnail; tens of micrometres per pixel).
    colours : str or sequence of str
        Among :data:`INK_COLOURS`.
    blur_px : int
        Median blur kernel (odd) applied per channel before the rules; 1 = none.
    weak : bool
        The looser rules for a mark's faded edge (see :func:`ink_mask`) instead of the strict ones.

    Returns
    -------
    dict colour -> bool ndarray ``[h, w]``
    """
    import cv2

    names = parse_colours(colours)
    image = _blurred(rgb, blur_px, "ink_masks")
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    sat = hsv[..., 1]
    value = hsv[..., 2]
    r, g, b = (image[..., i].astype(np.int16) for i in range(3))
    reddish = (hue >= 345) | (hue <= 15)
    if weak:  # the faded edge of a mark: only kept where it touches a strong mark
        rules = {
            "blue": lambda: (sat >= 15) & (b - r >= 0),
            "green": lambda: (hue >= 60) & (hue < 200) & (g - r >= 5),
            "black": lambda: value <= 90,
            "red": lambda: reddish & (sat >= 80) & (r - g >= 50),
        }
    else:
        rules = {
            "blue": lambda: (hue >= 190) & (hue <= 250) & (sat >= 50) & (b - r >= 25),
            "green": lambda: (hue >= 70) & (hue < 190) & (sat >= 40) & (g - r >= 20),
            "black": lambda: value <= 60,
            "red": lambda: reddish & (sat >= 110) & (r - g >= 70),
        }
    return {name: rules[name]() for name in names}


def _blurred(rgb: np.ndarray, blur_px: int, func: str) -> np.ndarray:
    """The image the colour rules run on: ``rgb`` checked as uint8 ``[h, w, 3]``, median-blurred
    per channel with a ``blur_px`` kernel (1 = none)."""
    import cv2

    image = np.ascontiguousarray(np.asarray(rgb)[..., :3])
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ConfigError(
            f"The 'rgb' parameter of {func} must be a uint8 array [h, w, 3]. Got {image.dtype} {image.shape} instead."
        )
    if blur_px > 1:
        image = cv2.medianBlur(image, int(blur_px) | 1)
    return image


def ink_regions(rgb: np.ndarray, colours=INK_COLOURS, blur_px: int = 7, dilate_px: int = 2,
                reach_px: int = 8) -> dict[str, np.ndarray]:
    """The marks of each colour, with their faded edges: colour -> bool ``[h, w]``.

    Hysteresis, as in edge detection: the strict rules find the marks, which grow by
    ``dilate_px`` pixels unconditionally and by up to ``reach_px`` pixels into pixels that pass
    the weak rules (a marker's edge fades into the tissue as a tinted halo, too pale for the strict
    rules; measured on the biopsy, the halo is purple, hue 270-310 deg, with B >= R, which no H&E
    pixel of that slide has).

    Parameters
    ----------
    rgb : uint8 ndarray ``[h, w, 3]``
    colours, blur_px
        As in :func:`ink_masks`.
    dilate_px, reach_px : int
        Growth in pixels of the image (unconditional, and into weak pixels).
    """
    import cv2

    def disk(radius: int) -> np.ndarray:
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))

    image = _blurred(rgb, blur_px, "ink_regions")  # blurred once for both rule sets (the costly step)
    strong = ink_masks(image, colours, blur_px=1)
    weak = ink_masks(image, colours, blur_px=1, weak=True)
    regions = {}
    for name, mark in strong.items():
        region = mark.copy()
        if mark.any():
            seed = mark.view(np.uint8)
            if reach_px > 0:
                region |= cv2.dilate(seed, disk(int(reach_px))).astype(bool) & weak[name]
            if dilate_px > 0:
                region |= cv2.dilate(seed, disk(int(dilate_px))).astype(bool)
        regions[name] = region
    return regions


def ink_mask(rgb: np.ndarray, colours=INK_COLOURS, blur_px: int = 7, dilate_px: int = 2,
             reach_px: int = 8) -> np.ndarray:
    """Every marker colour at once (:func:`ink_regions` combined): bool ``[h, w]``."""
    ink = np.zeros(np.asarray(rgb).shape[:2], bool)
    for region in ink_regions(rgb, colours, blur_px, dilate_px, reach_px).values():
        ink |= region
    return ink
