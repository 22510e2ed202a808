"""Tiling: exact CLAM semantics, vectorised; level-0 patch size from mpp; edge cases."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from extract.errors import ConfigError
from extract.segmentation import Tissue, load_preset, segment_tissue, segmentation_image
from extract.slide import Slide
from extract.svs_writer import write_svs
from extract.tiling import level0_patch_px, points_in_polygon, tile_tissue


# -- the slow reference: CLAM's per-candidate loop with cv2.pointPolygonTest -------------------
def _clam_loop(tissue, patch, slide_wh, contour_fn="four_pt", step=None, use_padding=True):
    step = step or patch
    out = []
    for cont, holes in zip(tissue.contours, tissue.holes):
        cont = cont.reshape(-1, 1, 2).astype(np.int32)
        x0, y0, w, h = cv2.boundingRect(cont)
        stop_x, stop_y = x0 + w, y0 + h
        if not use_padding:
            stop_x = min(stop_x, slide_wh[0] - patch + 1)
            stop_y = min(stop_y, slide_wh[1] - patch + 1)
        shift = int(patch // 2 * 0.5)
        for x in range(x0, stop_x, step):
            for y in range(y0, stop_y, step):
                c = (x + patch // 2, y + patch // 2)
                if contour_fn == "basic":
                    pts = [(x, y)]
                elif contour_fn == "center" or shift == 0:
                    pts = [c]
                else:
                    pts = [(c[0] - shift, c[1] - shift), (c[0] + shift, c[1] + shift),
                           (c[0] + shift, c[1] - shift), (c[0] - shift, c[1] + shift)]
                inside = [cv2.pointPolygonTest(cont, (float(px), float(py)), False) >= 0 for px, py in pts]
                ok = all(inside) if contour_fn == "four_pt_hard" else any(inside)
                if not ok:
                    continue
                centre = (x + patch / 2, y + patch / 2)
                if any(cv2.pointPolygonTest(hl.reshape(-1, 1, 2).astype(np.int32), centre, False) > 0 for hl in holes):
                    continue
                if (x, y) not in out:
                    out.append((x, y))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _random_tissue(rng, size=(160, 120), scale=(16.0, 16.0)):
    """Random blobs with holes, segmented at 1/16 scale like a real thumbnail."""
    img = np.full((size[1], size[0], 3), 243, np.uint8)
    for _ in range(rng.integers(2, 5)):
        c = tuple(int(v) for v in rng.integers(10, min(size) - 10, 2))
        axes = tuple(int(v) for v in rng.integers(8, 40, 2))
        cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, (220, 140, 190), -1)
        if rng.random() < 0.7:
            cv2.circle(img, c, int(min(axes) * 0.5), (243, 243, 243), -1)
    params = load_preset("bwh_biopsy").__class__(sthresh=15, mthresh=3, close=0, a_t=0.5, a_h=0.1, max_n_holes=8)
    return segment_tissue(img, params, scale)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("contour_fn", ["four_pt", "four_pt_hard", "center", "basic"])
def test_vectorised_equals_clam_loop_on_random_contours(seed, contour_fn):
    rng = np.random.default_rng(seed)
    tissue = _random_tissue(rng)
    assert tissue.n_contours >= 1
    patch = int(rng.choice([96, 128, 201, 256]))   # odd size: half-pixel hole-test centres
    for use_padding in (True, False):
        fast = tile_tissue(tissue, patch, (2560, 1920), contour_fn, use_padding=use_padding)
        slow = _clam_loop(tissue, patch, (2560, 1920), contour_fn, use_padding=use_padding)
        np.testing.assert_array_equal(fast, slow)


def test_vectorised_equals_clam_loop_with_overlap_on_a_real_slide(slides_dir):
    with Slide(slides_dir / "tcga_frozen_jp2k_nompp.svs") as s:
        rgb, scale = segmentation_image(s)
        tissue = segment_tissue(rgb, load_preset("bwh_biopsy"), scale)
        wh = s.dimensions
    fast = tile_tissue(tissue, 256, wh, step_px_level0=128)
    np.testing.assert_array_equal(fast, _clam_loop(tissue, 256, wh, step=128))
    assert len(fast) > 4 * 169 * 0.9                     # half step: ~4x the patches


def test_points_in_polygon_matches_opencv_including_boundary():
    rng = np.random.default_rng(0)
    for _ in range(30):
        poly = rng.integers(0, 30, (int(rng.integers(3, 12)), 2)).astype(np.int32)
        pts = rng.integers(-2, 64, (300, 2)) / 2.0
        pts = np.concatenate([pts, poly.astype(float), (poly[:-1] + poly[1:]) / 2.0])
        pts = np.round(pts * 2) / 2
        ref = [cv2.pointPolygonTest(poly.reshape(-1, 1, 2), (float(x), float(y)), False) for x, y in pts]
        np.testing.assert_array_equal(points_in_polygon(poly, pts), np.array(ref, np.int8))


def test_coordinates_are_clam_ordered_unique_and_int64(slides_dir):
    with Slide(slides_dir / "cmu_small_region.svs") as s:
        rgb, scale = segmentation_image(s)
        tissue = segment_tissue(rgb, load_preset("bwh_biopsy"), scale)
        coords = tile_tissue(tissue, 256, s.dimensions)
    assert coords.dtype == np.int64 and coords.shape == (50, 2)
    assert len(np.unique(coords, axis=0)) == len(coords)
    # One contour: column by column (x), then down each column (y), as CLAM writes them.
    order = np.lexsort((coords[:, 1], coords[:, 0]))
    np.testing.assert_array_equal(order, np.arange(len(coords)))
    # Grid anchored at the contour's bounding-box corner, step = patch.
    x0, y0 = tissue.contours[0].min(axis=0)
    assert ((coords - (x0, y0)) % 256 == 0).all()


def test_overlapping_contours_give_each_patch_once():
    square = np.array([[0, 0], [1000, 0], [1000, 1000], [0, 1000]], np.int32)
    tissue = Tissue([square, square.copy()], [[], []], 2, 8.0, 0.0, 0.0, (1.0, 1.0), (1000, 1000))
    coords = tile_tissue(tissue, 256, (1000, 1000))
    assert len(coords) == 16                              # 4 x 4, not 32


def test_padding_controls_patches_past_the_slide_edge():
    square = np.array([[0, 0], [999, 0], [999, 999], [0, 999]], np.int32)
    tissue = Tissue([square], [[]], 1, 8.0, 0.0, 0.0, (1.0, 1.0), (1000, 1000))
    padded = tile_tissue(tissue, 256, (1000, 1000), use_padding=True)
    fitted = tile_tissue(tissue, 256, (1000, 1000), use_padding=False)
    assert len(padded) == 16 and padded.max() == 768      # 768 + 256 > 1000: runs past the edge
    assert len(fitted) == 9 and (fitted + 256 <= 1000).all()


def test_slide_smaller_than_a_patch_gives_zero_patches(slides_dir):
    with Slide(slides_dir / "openslide_small.svs") as s:
        rgb, scale = segmentation_image(s)
        for preset in ("default", "bwh_biopsy"):
            tissue = segment_tissue(rgb, load_preset(preset), scale)
            for padding in (True, False):
                coords = tile_tissue(tissue, 256, s.dimensions, use_padding=padding)
                assert coords.shape == (0, 2) and coords.dtype == np.int64
        # Even tissue forced through the filter cannot fit a patch without padding.
        forced = segment_tissue(np.full((16, 16, 3), (200, 100, 150), np.uint8),
                                load_preset("bwh_biopsy").__class__(a_t=0, a_h=0), scale)
        assert tile_tissue(forced, 256, s.dimensions, use_padding=False).shape == (0, 2)


@pytest.mark.parametrize(
    "patch, target, slide, expected",
    [(256, 0.5, 0.25, 512), (256, 0.5, 0.5, 256), (256, 0.5, 0.265, 483), (256, 0.5, 0.499, 257),
     (224, 1.0, 0.25, 896), (512, 0.25, 0.5, 256)],
)
def test_level0_patch_px_uses_the_exact_mpp_ratio(patch, target, slide, expected):
    assert level0_patch_px(patch, target, slide) == expected


def test_level0_patch_px_rejects_missing_mpp():
    with pytest.raises(ConfigError, match="The 'slide_mpp' parameter of level0_patch_px must be a float > 0"):
        level0_patch_px(256, 0.5, None)


def test_same_tissue_at_two_resolutions_gives_the_same_patches(tmp_path):
    """A 0.25 um/px and a 0.5 um/px scan of one section: 512 vs 256 level-0 px, same grid."""
    img = np.full((1536, 2048, 3), 243, np.uint8)
    cv2.ellipse(img, (700, 760), (520, 600), 15, 0, 360, (225, 150, 195), -1)
    cv2.ellipse(img, (1550, 700), (330, 420), 0, 0, 360, (225, 150, 195), -1)
    paths = {0.5: write_svs(tmp_path / "x20.svs", img, mpp=0.5),
             0.25: write_svs(tmp_path / "x40.svs", cv2.resize(img, (4096, 3072), interpolation=cv2.INTER_NEAREST), mpp=0.25)}
    result = {}
    for mpp, path in paths.items():
        with Slide(path) as s:
            assert s.mpp == mpp
            patch0 = level0_patch_px(256, 0.5, s.mpp)
            rgb, scale = segmentation_image(s, mode="thumbnail", downsample=32 * 0.5 / mpp)
            tissue = segment_tissue(rgb, load_preset("bwh_biopsy"), scale)
            result[mpp] = (patch0, tile_tissue(tissue, patch0, s.dimensions))
    assert result[0.25][0] == 512 and result[0.5][0] == 256
    n20, n40 = len(result[0.5][1]), len(result[0.25][1])
    assert n20 > 20 and abs(n20 - n40) <= 0.1 * n20
    # In microns, the patch areas cover the same tissue.
    um20 = result[0.5][1].min(axis=0) * 0.5
    um40 = result[0.25][1].min(axis=0) * 0.25
    assert np.abs(um20 - um40).max() <= 64


def test_bad_arguments_are_config_errors():
    empty = Tissue([], [], 0, 8.0, 0.0, 0.0, (1.0, 1.0), (10, 10))
    with pytest.raises(ConfigError, match="The 'contour_fn' parameter of tile_tissue must be one of"):
        tile_tissue(empty, 256, (10, 10), contour_fn="six_pt")
    with pytest.raises(ConfigError, match="The 'patch_px_level0' parameter"):
        tile_tissue(empty, 0, (10, 10))
