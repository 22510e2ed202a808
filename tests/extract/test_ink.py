"""Ink and pen-mark removal: a real inked biopsy and a generated slide with strokes of each colour.

"Ink kept as tissue" is measured against a reference drawn independently of the colour rules:
for the biopsy, the bluish pixels (B > R, saturated) inside the smear's bounding box read off the
image, at full resolution; for the generated slide, the strokes as drawn.
"""

from __future__ import annotations

import csv
import dataclasses

import cv2
import numpy as np
import pytest

from extract.errors import ConfigError
from extract.ink import INK_COLOURS, ink_mask, ink_masks, parse_colours
from extract.segmentation import PRESETS, SegmentParams, segment_tissue, segmentation_image, tissue_mask
from extract.slide import Slide
from extract.svs_writer import write_svs
from extract.synthetic import make_cohort
from extract.tiling import tile_tissue
from pipeline.cli import main

# Transmission of each marker's dye (multiplied onto the slide, as ink absorbs light).
MARKERS = {"blue": (0.25, 0.35, 0.85), "green": (0.3, 0.75, 0.45), "black": (0.12, 0.12, 0.14),
           "red": (0.85, 0.2, 0.25)}
# The blue smear of biopsy_he_with_ink.jpeg (5600 x 1000): rows 620-1000, columns 3500-4150.
SMEAR = (slice(620, 1000), slice(3500, 4150))


def _measure(tissue, reference, margin_px=12):
    """(ink kept as tissue, tissue away from the ink) in segmentation pixels."""
    kept = tissue_mask(tissue)
    near = cv2.dilate(reference.astype(np.uint8), np.ones((2 * margin_px + 1,) * 2, np.uint8)).astype(bool)
    return int((kept & reference).sum()), int((kept & ~near).sum())


@pytest.fixture(scope="module")
def ink_biopsy(tmp_path_factory, images_dir):
    """The inked biopsy as a 2-level SVS, and the reference ink mask at its segmentation level."""
    full = cv2.cvtColor(cv2.imread(str(images_dir / "biopsy_he_with_ink.jpeg")), cv2.COLOR_BGR2RGB)
    path = write_svs(tmp_path_factory.mktemp("ink") / "biopsy_ink.svs", full, mpp=2.0, min_level_px=200)
    r, b = full[..., 0].astype(int), full[..., 2].astype(int)
    sat = cv2.cvtColor(full, cv2.COLOR_RGB2HSV)[..., 1]
    reference = np.zeros(full.shape[:2], np.float32)
    reference[SMEAR] = ((b > r) & (sat > 20))[SMEAR]
    reference = cv2.resize(reference, (1400, 250), interpolation=cv2.INTER_AREA) >= 0.5
    return path, reference


@pytest.fixture(scope="module")
def stroked_slide(tmp_path_factory):
    """A generated cohort slide with one pen stroke of each colour across tissue and glass."""
    root = tmp_path_factory.mktemp("strokes")
    manifest = make_cohort(root / "cohort", n_slides=1, seed=3, size_px=(4000, 3000))
    with open(manifest) as f:
        row = next(csv.DictReader(f))
    with Slide(root / "cohort" / row["path"]) as s:
        clean = s.read_region((0, 0), 1, s.level_dimensions[1])       # 1000 x 750, 2 um/px
    img = clean.astype(np.float32)
    drawn = np.zeros(clean.shape[:2], np.uint8)
    strokes = {"blue": [(80, 150), (450, 330), (900, 250)], "green": [(120, 560), (500, 700), (980, 520)],
               "black": [(600, 60), (700, 420), (640, 720)], "red": [(60, 380), (330, 470), (520, 400)]}
    for colour, points in strokes.items():
        stroke = np.zeros_like(drawn)
        cv2.polylines(stroke, [np.array(points, np.int32).reshape(-1, 1, 2)], False, 1, 60)
        stroke = cv2.GaussianBlur(stroke.astype(np.float32), (0, 0), 4)  # a felt tip's soft edge
        img = img * (1 - stroke[..., None] * (1 - np.array(MARKERS[colour], np.float32)))
        drawn |= (stroke > 0.5).astype(np.uint8)
    inked = np.clip(img, 0, 255).astype(np.uint8)
    clean_path = write_svs(root / "clean.svs", clean, mpp=2.0, min_level_px=128)
    path = write_svs(root / "strokes.svs", inked, mpp=2.0, min_level_px=128)
    reference = cv2.resize(drawn.astype(np.float32), (250, 188), interpolation=cv2.INTER_AREA) >= 0.5
    return path, clean_path, reference


def _segment(path, params):
    with Slide(path) as s:
        rgb, scale = segmentation_image(s, mode="clam", downsample=4)
        return segment_tissue(rgb, params, scale), s.dimensions


def test_inked_biopsy_keeps_no_ink_and_the_same_tissue_elsewhere(ink_biopsy):
    path, reference = ink_biopsy
    before, wh = _segment(path, PRESETS["bwh_biopsy"])
    after, _ = _segment(path, PRESETS["biopsy_ink"])
    assert before.image_wh == (1400, 250)
    ink_before, rest_before = _measure(before, reference)
    ink_after, rest_after = _measure(after, reference)
    print(f"biopsy: ink kept {ink_before} -> {ink_after} px; tissue elsewhere {rest_before} -> {rest_after} px")
    # Measured: 3327 -> 36 px of the 3345-px smear; tissue elsewhere unchanged (101931 px).
    assert ink_before > 0.9 * reference.sum()
    assert ink_after < 0.02 * ink_before
    assert abs(rest_after - rest_before) < 0.02 * rest_before
    assert after.ink_px["blue"] > 0.9 * reference.sum() and after.ink_removed_px >= after.ink_px["blue"]
    assert 0.02 < after.ink_fraction < 0.05
    # Patches centred in the smear: measured 51 -> 5 (on its faded rim).
    def inked_patches(tissue):
        centres = (tile_tissue(tissue, 32, wh) + 16) // 4
        return int(reference[centres[:, 1], centres[:, 0]].sum())

    assert inked_patches(before) > 50 and inked_patches(after) <= 0.1 * inked_patches(before)


# The generated slide is 1000 x 750 level-0 px: a_t = 1 (a 512 x 512 patch) would drop its pieces.
SMALL = {"a_t": 0.1, "a_h": 0.1}


def test_pen_strokes_of_every_colour_are_removed(stroked_slide):
    path, clean_path, reference = stroked_slide
    before, _ = _segment(path, dataclasses.replace(PRESETS["bwh_biopsy"], **SMALL))
    after, _ = _segment(path, dataclasses.replace(PRESETS["biopsy_ink"], **SMALL))
    ink_before, rest_before = _measure(before, reference)
    ink_after, rest_after = _measure(after, reference)
    print(f"strokes: ink kept {ink_before} -> {ink_after} px; tissue elsewhere {rest_before} -> {rest_after} px")
    assert ink_before > 0.8 * reference.sum()                 # CLAM keeps the strokes, on glass too
    assert ink_after < 0.02 * ink_before
    assert abs(rest_after - rest_before) < 0.02 * rest_before
    assert all(after.ink_px[c] > 50 for c in INK_COLOURS), after.ink_px
    # On the same slide without strokes, ink removal changes nothing.
    plain, _ = _segment(clean_path, dataclasses.replace(PRESETS["bwh_biopsy"], **SMALL))
    plain_ink, _ = _segment(clean_path, dataclasses.replace(PRESETS["biopsy_ink"], **SMALL))
    assert plain_ink.ink_removed_px < 0.001 * plain_ink.threshold_px
    assert abs(int(tissue_mask(plain).sum()) - int(tissue_mask(plain_ink).sum())) < 0.005 * tissue_mask(plain).sum()


def test_only_the_chosen_colours_are_removed(stroked_slide):
    path, _, _ = stroked_slide
    params = dataclasses.replace(PRESETS["biopsy_ink"], ink_colours="blue,green,red", **SMALL)
    tissue, _ = _segment(path, params)
    assert set(tissue.ink_px) == {"blue", "green", "red"}


@pytest.mark.parametrize("name", ["prostate_he_2500.jpeg", "he_1000.png", "he_500x300.jpg"])
def test_rules_leave_real_h_and_e_alone(images_dir, name):
    rgb = cv2.cvtColor(cv2.imread(str(images_dir / name)), cv2.COLOR_BGR2RGB)
    tissue = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1] > 15
    for colour, mask in ink_masks(rgb, blur_px=7).items():
        assert (mask & tissue).sum() < 0.003 * tissue.sum(), colour
    assert ink_mask(np.full((50, 60, 3), 240, np.uint8)).sum() == 0


def test_bad_colours_are_one_clear_error():
    with pytest.raises(ConfigError, match="ink_colours.*blue, green, black, red.*purple"):
        SegmentParams(remove_ink=True, ink_colours="blue,purple")
    assert parse_colours("Blue, black") == ("blue", "black")


def test_segment_stage_counts_and_shows_the_ink(ink_biopsy, tmp_path):
    path, _ = ink_biopsy
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\nbiopsy,{path}\n")
    ws = tmp_path / "ws"
    rc = main(["segment", "--manifest", str(manifest), "--workspace", str(ws), "--preset", "biopsy_ink",
               "--seg-downsample", "4", "--target-mpp", "2", "--patch-size", "32", "--tag", "ink", "-q"])
    assert rc == 0
    with open(ws / "segment" / "ink" / "status.csv") as f:
        row = next(csv.DictReader(f))
    assert row["state"] == "done" and 2.0 < float(row["ink_pct"]) < 5.0
    assert float(row["ink_mm2"]) > 0 and "blue" in row["message"]
    preview = cv2.cvtColor(cv2.imread(str(ws / "segment" / "ink" / "previews" / "biopsy.png")), cv2.COLOR_BGR2RGB)
    magenta = (preview[..., 0] > 200) & (preview[..., 1] < 60) & (preview[..., 2] > 150)
    assert magenta.sum() > 100                                  # the removed smear, outlined
