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
    header = out.shape[0] - 1200
    body = out[header:]
    assert body.shape[0] == 1200 and (body[:, :100] != 255).any()  # slide drawn unscaled
    (text_w, _), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 18 / 30, 1)
    assert out.shape[1] >= text_w
    assert (body[:, 100:] == 255).all()  # the added width is plain white, not stretched tissue
