"""Segmentation previews stay pictures a person can read, whatever the slide's size and shape."""

import cv2
import numpy as np

from pipeline.previews import MIN_LONG_PX, draw_preview, save_png


def test_tiny_slide_preview_is_enlarged_and_its_caption_is_whole(tmp_path):
    image = np.full((16, 16, 3), 240, np.uint8)
    caption = "tiny: 0 patches of 256 level-0 px, 0.499 um/px"
    out = draw_preview(image, (1.0, 1.0), [], [], np.zeros((0, 2), np.int64), 256, caption)
    assert max(out.shape[:2]) >= MIN_LONG_PX
    (text_w, _), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 18 / 30, 1)
    assert out.shape[1] >= text_w  # the caption is not cut off at the right edge
    save_png(tmp_path / "tiny.png", out)
    assert cv2.imread(str(tmp_path / "tiny.png")).shape == out.shape


def test_narrow_slide_keeps_its_aspect_ratio_and_the_caption_fits():
    image = np.full((1200, 100, 3), 240, np.uint8)  # a long thin biopsy strip
    caption = "strip_001: 40 patches of 512 level-0 px, 0.250 um/px"
    coords = np.array([[0, 0], [0, 512]], np.int64)
    out = draw_preview(image, (10.0, 10.0), [], [], coords, 512, caption)
    header = 18 + 8  # the caption band; the legend follows the slide at the bottom
    body = out[header:header + 1200]
    assert body.shape[0] == 1200 and (body[:, :100] != 255).any()  # slide drawn unscaled
    (text_w, _), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 18 / 30, 1)
    assert out.shape[1] >= text_w
    assert (body[:, 100:] == 255).all()  # the added width is plain white, not stretched tissue


def test_preview_has_a_legend_and_a_scale_bar_of_the_right_length():
    from pipeline.previews import HOLE, PATCH, TISSUE, scale_bar_um

    image = np.full((600, 1000, 3), 240, np.uint8)
    # 8 level-0 px per thumbnail px at 0.5 um/px: 4 um per preview pixel
    out = draw_preview(image, (8.0, 8.0), [], [], np.zeros((0, 2), np.int64), 256, "s1", mpp=0.5)
    um, px = scale_bar_um(4.0, 1000)
    assert um == 1000 and px == 250  # a fifth of the width is 800 um: the nearest round length is 1 mm
    footer = out[-40:]
    for colour in (TISSUE, HOLE, PATCH):  # one swatch of each in the legend
        assert np.all(footer == np.array(colour, np.uint8), axis=2).sum() > 20, colour
    assert _longest_black_run(footer) == px + 1  # the bar: one filled black run as long as 1 mm
    without = draw_preview(image, (8.0, 8.0), [], [], np.zeros((0, 2), np.int64), 256, "s1")
    assert _longest_black_run(without[-40:]) < 50  # no mpp: no scale bar, only text


def _longest_black_run(img: np.ndarray) -> int:
    best = 0
    for row in np.all(img == 0, axis=2):
        run = 0
        for v in row:
            run = run + 1 if v else 0
            best = max(best, run)
    return best
