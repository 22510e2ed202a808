"""Tissue segmentation: CLAM parity on real slides, painted tissue found, presets, errors."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import yaml

from extract.errors import ConfigError
from extract.segmentation import (
    CONFIG_DIR,
    PRESETS,
    SegmentParams,
    list_presets,
    load_preset,
    segment_tissue,
    segmentation_image,
)
from extract.slide import Slide
from extract.svs_writer import write_svs
from extract.tiling import tile_tissue

PINK = (230, 160, 200)
WHITE = (243, 243, 243)


def _segment(path, preset):
    with Slide(path) as s:
        rgb, scale = segmentation_image(s, mode="clam")
        return segment_tissue(rgb, load_preset(preset), scale), s.dimensions


# CLAM 53e2409 run on these files (docs REFERENCE.md section 1): contours and patches at level 0,
# 256-px patches, four_pt, padding on.
@pytest.mark.parametrize(
    "name, preset, n_contours, n_patches",
    [
        ("cmu_small_region.svs", "bwh_biopsy", 1, 50),
        ("cmu_small_region.svs", "default", 0, 0),
        ("cmu_small_region.svs", "tcga", 0, 0),
        ("tcga_frozen_jp2k_nompp.svs", "bwh_biopsy", 1, 169),
        ("tcga_frozen_jp2k_nompp.svs", "tcga", 1, 168),
        ("tcga_frozen_jp2k_nompp.svs", "default", 0, 0),
    ],
)
def test_clam_parity_on_real_slides(slides_dir, name, preset, n_contours, n_patches):
    tissue, wh = _segment(slides_dir / name, preset)
    assert tissue.n_contours == n_contours
    assert len(tile_tissue(tissue, 256, wh)) == n_patches


def test_clam_level_choice_reads_the_real_pyramid_level(slides_dir):
    with Slide(slides_dir / "tcga_frozen_jp2k_nompp.svs") as s:
        rgb, scale = segmentation_image(s, mode="clam")
        assert rgb.shape == (1783, 2221, 3)                       # level 1, read whole
        assert scale == pytest.approx((4443 / 2221, 3567 / 1783))
        thumb, tscale = segmentation_image(s, mode="thumbnail")
        assert thumb.shape[1] == pytest.approx(4443 / 64, abs=1)
        assert tscale[0] == pytest.approx(64, rel=0.02)


def test_huge_level_falls_back_to_a_thumbnail_instead_of_refusing(slides_dir):
    # CLAM fails slides whose segmentation level is > 1e8 px; we build a thumbnail instead.
    with Slide(slides_dir / "cmu_small_region.svs") as s:
        rgb, scale = segmentation_image(s, mode="clam", max_level_px=1e6)
    assert rgb.shape[0] == pytest.approx(2967 / 64, abs=1)
    assert scale[0] == pytest.approx(64, rel=0.03)


def test_empty_result_says_the_area_filter_dropped_the_tissue(slides_dir):
    tissue, _ = _segment(slides_dir / "cmu_small_region.svs", "default")
    assert tissue.is_empty and tissue.n_raw_contours > 0       # found, then filtered
    assert tissue.min_area_px == 100 * 512 * 512                  # level 0 = segmentation level
    msg = tissue.describe_empty()
    assert "no tissue kept by the area filter (a_t = 100" in msg and "26.2 M level-0 px" in msg


def test_blank_image_reports_no_tissue_found():
    tissue = segment_tissue(np.full((200, 300, 3), 240, np.uint8), PRESETS["bwh_biopsy"], (16, 16))
    assert tissue.is_empty and tissue.n_raw_contours == 0
    assert "no tissue found" in tissue.describe_empty()


@pytest.fixture(scope="module")
def painted_slide(tmp_path_factory):
    """A 0.5 um/px slide with two pink pieces on glass, one with a white hole."""
    img = np.full((3072, 4096, 3), WHITE, np.uint8)
    cv2.ellipse(img, (1100, 1500), (800, 1100), 0, 0, 360, PINK, -1)
    cv2.ellipse(img, (3100, 1400), (700, 600), 30, 0, 360, PINK, -1)
    cv2.circle(img, (1100, 1500), 420, WHITE, -1)                       # hole: 0.55 M px
    rng = np.random.default_rng(0)
    noise = rng.integers(-12, 12, img.shape, dtype=np.int16)
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    path = write_svs(tmp_path_factory.mktemp("painted") / "painted.svs", img, mpp=0.5)
    return path


def test_painted_tissue_is_found_where_it_was_painted(painted_slide):
    tissue, wh = _segment(painted_slide, "bwh_biopsy")
    assert tissue.scale == pytest.approx((4.0, 4.0))                # CLAM's level: 1 (ds 4)
    assert tissue.n_contours == 2
    boxes = sorted(
        (int(c[:, 0].min()), int(c[:, 1].min()), int(c[:, 0].max()), int(c[:, 1].max()))
        for c in tissue.contours
    )
    # Painted: ellipse 1 bbox (300, 400)-(1900, 2600); ellipse 2 about (2390, 940)-(3810, 1860).
    assert boxes[0] == pytest.approx((300, 400, 1900, 2600), abs=24)
    assert boxes[1][0] == pytest.approx(2390, abs=40) and boxes[1][2] == pytest.approx(3810, abs=40)
    assert [len(h) for h in tissue.holes] in ([1, 0], [0, 1])


def test_no_patch_centre_lies_in_a_painted_hole(painted_slide):
    tissue, wh = _segment(painted_slide, "bwh_biopsy")
    coords = tile_tissue(tissue, 256, wh)
    centres = coords + 128
    d = np.hypot(centres[:, 0] - 1100, centres[:, 1] - 1500)
    assert len(coords) > 50
    # Hole radius 420 px; the hole is traced at 4 um/px after an 11-px median blur.
    assert (d < 420 - 24).sum() == 0
    # ... but the ring of tissue around the hole is tiled.
    assert ((d > 450) & (d < 800)).sum() > 5


def test_presets_match_the_yaml_configs_and_clam():
    assert list_presets() == ["biopsy_ink", "bwh_biopsy", "bwh_resection", "default", "tcga"]
    for name in list_presets():
        values = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
        assert SegmentParams(**values) == PRESETS[name], name
        assert load_preset(CONFIG_DIR / f"{name}.yaml") == PRESETS[name]
    assert PRESETS["default"] == SegmentParams()
    assert PRESETS["bwh_biopsy"] == SegmentParams(15, 11, 2, False, 1, 1, 2)
    assert PRESETS["tcga"].a_t == 16 and PRESETS["tcga"].a_h == 4
    # Ours: CLAM's biopsy preset plus ink removal.
    assert PRESETS["biopsy_ink"] == dataclasses.replace(PRESETS["bwh_biopsy"], remove_ink=True)


def test_load_preset_errors_name_the_choices_and_the_bad_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown segmentation preset 'biopsy'; choose one of biopsy_ink, bwh_biopsy"):
        load_preset("biopsy")
    bad = tmp_path / "mine.yaml"
    bad.write_text("sthresh: 10\nmthres: 7\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) 'mthres'"):
        load_preset(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("sthresh: 20\n")
    assert load_preset(ok) == SegmentParams(sthresh=20)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mthresh": 4}, "The 'mthresh' parameter of SegmentParams must be an odd int >= 3 .* Got 4 instead."),
        ({"sthresh": 300}, "The 'sthresh' parameter of SegmentParams must be an int in the range \\[0, 255\\]. Got 300"),
        ({"close": -1}, "The 'close' parameter"),
        ({"a_t": -1}, "The 'a_t' parameter"),
        ({"use_otsu": "yes"}, "The 'use_otsu' parameter of SegmentParams must be a bool. Got 'yes' instead."),
        ({"max_n_holes": 1.5}, "The 'max_n_holes' parameter"),
    ],
)
def test_params_validation_messages(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SegmentParams(**kwargs)


def test_otsu_and_no_closing_run(slides_dir):
    with Slide(slides_dir / "cmu_small_region.svs") as s:
        rgb, scale = segmentation_image(s, mode="thumbnail", downsample=16)
    otsu = segment_tissue(rgb, SegmentParams(use_otsu=True, close=0, a_t=1, a_h=1), scale)
    assert otsu.n_contours >= 1 and 0 < otsu.threshold < 255
    assert otsu.scale == pytest.approx(scale)


def test_bad_image_is_a_config_error():
    with pytest.raises(ConfigError, match="must be a uint8 array \\[h, w, 3\\]"):
        segment_tissue(np.zeros((10, 10), np.float32))
