"""Heatmaps and galleries: rank normalisation, drawing, aspect ratio, the right patches, real slides."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from extract.errors import ConfigError
from pipeline.heatmaps import (
    ALPHA_FLOOR,
    _colormap,
    absolute_scores,
    draw_gallery,
    draw_heatmap,
    heatmap_figure,
    heatmap_layout,
    rank_normalize,
    thumbnail_downsample,
    relative_attention,
    top_bottom,
    write_slide_heatmaps,
)
from tests.helpers import panel_box, read_png

TISSUE = (190, 150, 200)


def _grid(x0: int, y0: int, nx: int, ny: int, step: int) -> np.ndarray:
    return np.array([(x0 + i * step, y0 + j * step) for j in range(ny) for i in range(nx)], np.int64)


# -- pure compute -------------------------------------------------------------------------------

def test_rank_normalize_is_percentile_and_monotone_invariant():
    s = np.array([0.3, -2.0, 5.0, 0.3, 1.0])
    r = rank_normalize(s)
    np.testing.assert_allclose(r, [0.375, 0.0, 1.0, 0.375, 0.75])
    np.testing.assert_array_equal(rank_normalize(np.exp(3 * s) + 7), r)
    assert rank_normalize(np.array([4.0])).tolist() == [1.0]
    assert rank_normalize(np.array([])).shape == (0,)
    with pytest.raises(ConfigError, match="finite"):
        rank_normalize(np.array([1.0, np.nan]))


def test_top_bottom_never_overlap():
    s = np.array([5, 1, 9, 3, 7], float)
    top, bottom = top_bottom(s, 2)
    assert top.tolist() == [2, 4] and bottom.tolist() == [1, 3]
    top, bottom = top_bottom(s, 8)
    assert set(top) .isdisjoint(bottom) and len(top) + len(bottom) == 5 and top[0] == 2 and bottom[0] == 1


def test_thumbnail_downsample_targets_about_1200px():
    assert thumbnail_downsample((800, 600)) == 1.0
    assert thumbnail_downsample((120_000, 80_000)) == pytest.approx(100.0)


def test_draw_heatmap_colours_patches_by_rank_and_keeps_the_thumbnail_shape():
    thumb = np.full((90, 160, 3), 200, np.uint8)
    coords = _grid(0, 0, 4, 2, 40)  # 8 patches of 40 level-0 px, scale 1
    scores = np.array([0.1, 7.0, 3.0, -1.0, 2.0, 2.5, 0.0, 1.0])
    img = draw_heatmap(thumb, (1.0, 1.0), coords, scores, 40, title="s1", cmap="jet", alpha=0.5)
    lay = heatmap_layout((160, 90))
    assert img.shape == (lay.size[1], lay.size[0], 3)
    px, py, pw, ph = lay.panel
    panel = img[py:py + ph, px:px + pw].astype(int)
    assert panel.shape[:2] == (90, 160)
    lut = _colormap("jet").astype(float)
    blend = lambda c, a: np.round((1 - a) * 200 + a * c).astype(int)  # noqa: E731
    np.testing.assert_array_equal(panel[20, 60], blend(lut[255], 0.5))  # patch 1: highest score, full alpha
    # patch 3: lowest score, drawn fainter so the tissue shows through
    np.testing.assert_allclose(panel[20, 140], blend(lut[0], 0.5 * ALPHA_FLOOR), atol=1)
    np.testing.assert_array_equal(panel[85, 10], [200, 200, 200])  # no patch there
    assert panel_box(img) == lay.panel


def test_heatmap_identical_under_monotone_transform_of_scores():
    rng = np.random.default_rng(0)
    thumb = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
    coords = _grid(0, 0, 10, 6, 64)
    s = rng.normal(size=len(coords))
    a = draw_heatmap(thumb, (3.2, 3.2), coords, s, 64, title="x")
    b = draw_heatmap(thumb, (3.2, 3.2), coords, 10 * np.tanh(s) - 4, 64, title="x")
    c = draw_heatmap(thumb, (3.2, 3.2), coords, -s, 64, title="x")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_draw_heatmap_rejects_bad_inputs():
    thumb = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ConfigError, match="same length"):
        draw_heatmap(thumb, (1, 1), np.zeros((3, 2)), np.zeros(2), 4)
    with pytest.raises(ConfigError, match="colormap"):
        draw_heatmap(thumb, (1, 1), np.zeros((1, 2)), np.zeros(1), 4, cmap="no_such_map")
    with pytest.raises(ConfigError, match="uint8"):
        draw_heatmap(thumb.astype(float), (1, 1), np.zeros((1, 2)), np.zeros(1), 4)


def _coloured_tiles(img: np.ndarray, colour: str, tile_px: int) -> list[tuple[int, int]]:
    r, g, b = (img[..., i].astype(int) for i in range(3))
    mask = (r > 220) & (g < 40) & (b < 40) if colour == "red" else (b > 220) & (r < 40) & (g < 40)
    n, _, stats, cent = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    return [tuple(cent[i]) for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] > 0.6 * tile_px**2]


def test_draw_gallery_puts_top_row_above_bottom_row():
    red = [np.full((50, 50, 3), (255, 0, 0), np.uint8)] * 3
    blue = [np.full((70, 70, 3), (0, 0, 255), np.uint8)] * 2
    img = draw_gallery(red, blue, [1.0, 0.9, 0.8], [0.0, 0.1], title="t", tile_px=64)
    reds, blues = _coloured_tiles(img, "red", 64), _coloured_tiles(img, "blue", 64)
    assert len(reds) == 3 and len(blues) == 2
    assert max(y for _, y in reds) < min(y for _, y in blues)


# -- files: generated slides --------------------------------------------------------------------

@pytest.fixture(scope="module")
def marked_slide(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A 2400 x 1100 px SVS (wide) whose tissue grid has 3 pure red and 3 pure blue patches.

    Returns the path, the patch coords (128 px level 0) and scores that rank red top, blue bottom.
    """
    from extract.svs_writer import write_svs

    patch = 128
    img = np.full((1100, 2400, 3), 245, np.uint8)
    coords = _grid(256, 128, 14, 6, patch)
    for x, y in coords:
        img[y:y + patch, x:x + patch] = TISSUE
    rng = np.random.default_rng(1)
    scores = rng.uniform(-1, 1, len(coords))
    red_idx, blue_idx = [5, 40, 77], [0, 50, 83]
    for rank, i in enumerate(red_idx):
        x, y = coords[i]
        img[y:y + patch, x:x + patch] = (255, 0, 0)
        scores[i] = 10 - rank
    for rank, i in enumerate(blue_idx):
        x, y = coords[i]
        img[y:y + patch, x:x + patch] = (0, 0, 255)
        scores[i] = -10 + rank
    path = write_svs(tmp_path_factory.mktemp("slides") / "marked.svs", img, mpp=0.5, min_level_px=256)
    return path, coords, scores


def test_write_slide_heatmaps_pngs_have_slide_aspect_and_right_gallery(marked_slide, tmp_path):
    path, coords, scores = marked_slide
    heat_path, gallery_path = write_slide_heatmaps(
        path, coords, scores, 128, tmp_path / "heatmaps", "marked", title="marked  label 1  p(1) 0.9", k=3)
    assert heat_path == tmp_path / "heatmaps" / "marked.png" and gallery_path.name == "marked_gallery.png"
    heat = read_png(heat_path)
    x, y, w, h = panel_box(heat)
    assert 1000 <= max(w, h) <= 1500
    assert (w / h) == pytest.approx(2400 / 1100, rel=0.02)
    # the red (top-scored) patch in the panel is coloured with the top of the colormap (viridis: yellow)
    lut = _colormap("viridis").astype(int)
    sx = 2400 / w
    cx, cy = coords[5] + 64
    pixel = heat[y + int(cy / sx), x + int(cx / sx)].astype(int)
    np.testing.assert_allclose(pixel, np.round(0.4 * np.array([255, 0, 0]) + 0.6 * lut[255]), atol=6)

    gallery = read_png(gallery_path)
    reds, blues = _coloured_tiles(gallery, "red", 128), _coloured_tiles(gallery, "blue", 128)
    assert len(reds) == 3 and len(blues) == 3
    assert max(y for _, y in reds) < min(y for _, y in blues)
    assert not list(tmp_path.glob("heatmaps/.*")), "temporary files left behind"

    # small tiles come from a reduced pyramid level (4x here), still the right patches
    from extract.slide import Slide
    from pipeline.heatmaps import read_patches

    with Slide(path) as slide:
        assert slide.level_count >= 2
        for i, colour in ((5, (255, 0, 0)), (0, (0, 0, 255))):
            (patch,) = read_patches(slide, coords[[i]], 128, out_px=32)
            assert patch.shape == (32, 32, 3)
            np.testing.assert_allclose(patch[4:-4, 4:-4].reshape(-1, 3).mean(0), colour, atol=12)


def test_heatmap_on_real_slide(slides_dir, tmp_path):
    from extract.slide import Slide

    path = slides_dir / "cmu_small_region.svs"
    with Slide(path) as s:
        W, H = s.dimensions
    coords = _grid(0, 0, W // 256, H // 256, 256)
    scores = np.random.default_rng(0).normal(size=len(coords))
    heat_path, gallery_path = write_slide_heatmaps(path, coords, scores, 256, tmp_path, "cmu", title="cmu")
    x, y, w, h = panel_box(read_png(heat_path))
    assert (w / h) == pytest.approx(W / H, rel=0.02)
    gallery = read_png(gallery_path)
    assert gallery.shape[0] > 2 * 128 and gallery.shape[1] >= 8 * 128


def test_absolute_values_are_bag_probability_times_relative_attention():
    s = np.array([2.0, 0.0, -np.inf, 2.0 - np.log(4)])
    np.testing.assert_allclose(relative_attention(s), [1.0, np.exp(-2), 0.0, 0.25])
    np.testing.assert_allclose(absolute_scores(s, 0.8), [0.8, 0.8 * np.exp(-2), 0.0, 0.2])
    # a slide called normal stays cool however peaked its attention is
    assert absolute_scores(s, 0.05).max() == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="bag_weight"):
        absolute_scores(s, 1.5)


def test_heatmap_figure_has_one_colour_bar_with_its_range_and_label():
    panel = np.full((300, 500, 3), 180, np.uint8)
    fig = heatmap_figure(panel, "s1  label tumor  p(tumor) 0.9\nfold 0, model abmil", "viridis", (0.0, 1.0),
                         "p(tumor) x attention")
    (bar,) = fig.axes  # the panel is pasted pixels: the colour bar is the figure's only axes
    assert bar.get_ylim() == (0.0, 1.0) and bar.get_ylabel() == "p(tumor) x attention"
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert len(labels) == len(set(labels)) >= 3  # each tick labelled once
    texts = [t.get_text() for t in fig.texts]
    assert texts == ["s1  label tumor  p(tumor) 0.9", "fold 0, model abmil"]
