"""Synthetic slides: real Aperio-layout pyramids that OpenSlide opens, and the demo cohort."""

from __future__ import annotations

import csv
import hashlib
import json

import cv2
import numpy as np
import openslide
import pytest

from extract.errors import ConfigError
from extract.svs_writer import pyramid_dimensions, write_svs, write_svs_tiles
from extract.synthetic import make_cohort, write_large_svs


def _read(slide, level, loc=(0, 0), size=None):
    size = size or slide.level_dimensions[level]
    return np.asarray(slide.read_region(loc, level, size))[..., :3].astype(np.int16)


@pytest.fixture(scope="module")
def he_image(images_dir):
    bgr = cv2.imread(str(images_dir / "prostate_he_2500.jpeg"))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_write_svs_opens_as_aperio_with_mpp_and_pyramid(tmp_path, he_image):
    image = np.ascontiguousarray(np.concatenate([he_image, he_image[:, ::-1]], axis=1)[:, :4100])  # 4100 x 2500
    path = write_svs(tmp_path / "a.svs", image, mpp=0.25)
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.objective-power"]) == pytest.approx(40)
        assert s.level_count == 2
        assert s.level_dimensions == ((4100, 2500), (1025, 625))
        assert s.level_downsamples[1] == pytest.approx(4.0)
        assert "thumbnail" in s.associated_images
        assert s.properties["openslide.level[0].tile-width"] == "256"
        # JPEG q85: pixels survive to within a few grey levels on average.
        assert np.abs(_read(s, 0) - image).mean() < 3
        level1 = cv2.resize(image, (1025, 625), interpolation=cv2.INTER_AREA)
        assert np.abs(_read(s, 1) - level1).mean() < 8


def test_pyramid_levels_stop_at_min_level_px_and_never_overshoot_the_downsample():
    dims = pyramid_dimensions((80_000, 60_000))
    assert dims == [(80_000, 60_000), (20_000, 15_000), (5_000, 3_750), (1_250, 938)]
    # ceil keeps the measured downsample <= 64, so get_best_level_for_downsample(64) picks it.
    assert 80_000 / dims[3][0] <= 64 and 60_000 / dims[3][1] <= 64
    assert pyramid_dimensions((600, 400)) == [(600, 400)]


def test_write_svs_rejects_bad_input_with_a_clear_message(tmp_path):
    with pytest.raises(ConfigError, match="The 'image_rgb' parameter of write_svs must be a uint8 array"):
        write_svs(tmp_path / "x.svs", np.zeros((10, 10), np.uint8), mpp=0.5)
    with pytest.raises(ConfigError, match="The 'mpp' parameter"):
        write_svs(tmp_path / "x.svs", np.zeros((10, 10, 3), np.uint8), mpp=0)


def test_write_svs_tiles_renders_each_level_without_the_full_image(tmp_path):
    calls = []

    def render(ds, x, y, w, h):
        calls.append((ds, h, w))
        yy, xx = np.mgrid[y:y + h, x:x + w]
        # A colour ramp in level-0 units, so every level shows the same picture.
        rgb = np.stack([(xx * ds) // 40 % 256, (yy * ds) // 40 % 256, np.full_like(xx, 128)], -1)
        return rgb.astype(np.uint8)

    path = write_svs_tiles(tmp_path / "r.svs", (5000, 3000), render, mpp=0.5, tile=256)
    # Strips of one tile row: no call ever asked for more than 256 rows of level 0.
    assert max(h for ds, h, w in calls if ds == 1) == 256
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_dimensions == ((5000, 3000), (1250, 750))
        a = _read(s, 0, (2000, 1000), (400, 400))
        b = _read(s, 1, (2000, 1000), (100, 100))
        small = cv2.resize(a.astype(np.uint8), (100, 100), interpolation=cv2.INTER_AREA)
        assert np.abs(small.astype(int) - b).mean() < 4


def test_write_large_svs_is_tissue_on_glass_with_consistent_levels(tmp_path, images_dir):
    path = write_large_svs(tmp_path / "big.svs", 8192, 6144, mpp=0.25,
                           texture=images_dir / "prostate_he_2500.jpeg", seed=3)
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.level_dimensions == ((8192, 6144), (2048, 1536))
        thumb = _read(s, 1).astype(np.uint8)
        sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1]
        tissue = (sat > 15).mean()
        assert 0.15 < tissue < 0.6, tissue          # tissue pieces on glass
        assert (sat[:8, :8] == 0).all()             # the corner is glass


def _cohort(tmp_path, **kw):
    kw = {"n_slides": 6, "seed": 1, "size_px": (3000, 2000), **kw}
    manifest = make_cohort(tmp_path / "cohort", **kw)
    with open(manifest) as fh:
        rows = list(csv.DictReader(fh))
    return manifest, rows


def test_make_cohort_writes_manifest_slides_and_lesion_truth(tmp_path):
    manifest, rows = _cohort(tmp_path, n_slides=8, seed=1)
    assert list(rows[0]) == ["slide_id", "path", "label", "case_id", "time", "event"]
    assert len(rows) == 8 and len({r["slide_id"] for r in rows}) == 8
    assert {r["label"] for r in rows} == {"normal", "tumor"}
    assert len({r["case_id"] for r in rows}) < 8           # some case has two slides
    for r in rows:
        assert float(r["time"]) > 0 and r["event"] in ("0", "1")
        path = manifest.parent / r["path"]
        truth = json.loads((manifest.parent / "ground_truth" / f"{r['slide_id']}.json").read_text())
        assert truth["label"] == r["label"]
        with openslide.OpenSlide(str(path)) as s:
            assert s.properties["openslide.vendor"] == "aperio"
            assert float(s.properties["openslide.mpp-x"]) == 0.5
            assert s.dimensions == (3000, 2000)
            if r["label"] == "normal":
                assert truth["lesions"] == []
                continue
            assert truth["lesions"]
            assert 0.01 <= truth["lesion_patch_fraction"] <= 0.15
            # A lesion is dark purple: much darker than the cohort's pink tissue.
            x0, y0, x1, y1 = truth["lesions"][0]["box"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            patch = _read(s, 0, (cx - 16, cy - 16), (32, 32))
            assert patch.mean() < 150, patch.mean()


def test_cohort_tissue_and_lesions_are_found_by_segmentation(tmp_path):
    from extract.segmentation import load_preset, segment_tissue, segmentation_image
    from extract.slide import Slide
    from extract.tiling import tile_tissue

    # Full-size demo slides (6000 x 4000): seed 2 gives a hole and lesions on both.
    manifest, rows = _cohort(tmp_path, n_slides=2, seed=2, positive_fraction=1.0, size_px=(6000, 4000))
    n_holes = 0
    for r in rows:
        truth = json.loads((manifest.parent / "ground_truth" / f"{r['slide_id']}.json").read_text())
        with Slide(manifest.parent / r["path"]) as s:
            rgb, scale = segmentation_image(s)
            tissue = segment_tissue(rgb, load_preset("bwh_biopsy"), scale)
            coords = tile_tissue(tissue, 256, s.dimensions)
        assert tissue.n_contours == len(truth["tissue_boxes"])
        assert sum(map(len, tissue.holes)) == len(truth["hole_boxes"])
        n_holes += len(truth["hole_boxes"])
        for x0, y0, x1, y1 in truth["hole_boxes"]:        # no patch centre deep inside a hole
            inset = 0.3 * min(x1 - x0, y1 - y0)
            centre = coords + 128
            inside = ((centre[:, 0] > x0 + inset) & (centre[:, 0] < x1 - inset)
                      & (centre[:, 1] > y0 + inset) & (centre[:, 1] < y1 - inset))
            assert not inside.any()
        for x0, y0, x1, y1 in truth["tissue_boxes"]:     # every painted piece has a contour on it
            assert any(c[:, 0].min() < x1 and c[:, 0].max() > x0 and c[:, 1].min() < y1 and c[:, 1].max() > y0
                       for c in tissue.contours)
        for lesion in truth["lesions"]:                   # every lesion lies under some patch
            x0, y0, x1, y1 = lesion["box"]
            hit = (coords[:, 0] < x1) & (coords[:, 0] + 256 > x0) & (coords[:, 1] < y1) & (coords[:, 1] + 256 > y0)
            assert hit.sum() >= 1
    assert n_holes >= 2


def test_make_cohort_is_deterministic_and_three_class(tmp_path):
    m1, rows1 = _cohort(tmp_path / "a", n_slides=3, seed=7, n_classes=3, positive_fraction=1.0)
    m2, rows2 = _cohort(tmp_path / "b", n_slides=3, seed=7, n_classes=3, positive_fraction=1.0)
    assert rows1 == rows2
    assert {r["label"] for r in rows1} <= {"tumor_a", "tumor_b"}
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(m1.parent / rows1[0]["path"]) == digest(m2.parent / rows2[0]["path"])


def test_make_cohort_validates_arguments(tmp_path):
    with pytest.raises(ConfigError, match="The 'n_classes' parameter of make_cohort must be 2 or 3"):
        make_cohort(tmp_path, n_classes=5)
