"""GeoJSON in and out: segment writes tissue for QuPath; include/exclude annotations restrict tiling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from extract.errors import ConfigError
from extract.geojson import (
    feature_collection,
    filter_coords,
    read_polygons,
    tile_features,
    validate_feature_collection,
)
from pipeline.cli import main
from tests.helpers import coords_of
from tests.helpers import read_status as _status


def _coords(seg: Path, sid: str) -> np.ndarray:
    return coords_of(seg, sid)[0]


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, slides_dir):
    """Two real slides segmented once (the tissue GeoJSON comes with it)."""
    root = tmp_path_factory.mktemp("geo")
    m = root / "m.csv"
    m.write_text(f"slide_id,path\ncmu,{slides_dir / 'cmu_small_region.svs'}\n"
                 f"tcga,{slides_dir / 'tcga_frozen_jp2k_nompp.svs'}\n")
    ws = root / "ws"
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "--patch-size", "128", "--tag", "base", "-q"]) == 0
    return root, m, ws, ws / "segment" / "base"


def test_tissue_geojson_is_a_feature_collection_of_closed_rings_in_level0_px(segmented, slides_dir):
    _, _, _, seg = segmented
    for sid, wh in (("cmu", (2220, 2967)), ("tcga", (4443, 3567))):
        fc = json.loads((seg / "geojson" / f"{sid}.geojson").read_text())
        validate_feature_collection(fc, sid)
        assert fc["features"] and all(f["properties"]["objectType"] == "annotation" for f in fc["features"])
        assert {f["properties"]["classification"]["name"] for f in fc["features"]} == {"Tissue"}
        xy = np.concatenate([np.asarray(r) for f in fc["features"] for r in f["geometry"]["coordinates"]])
        # level-0 pixels: the tissue spans a good part of the slide and stays inside it
        assert xy.min() >= 0 and (xy.max(0) <= np.array(wh)).all()
        assert xy[:, 0].max() - xy[:, 0].min() > 0.3 * wh[0]
        # every kept patch lies on the tissue outline's bounding box
        coords = _coords(seg, sid)
        assert (coords.min(0) >= xy.min(0) - 128).all() and (coords.max(0) <= xy.max(0)).all()


def test_our_tissue_geojson_as_include_reproduces_the_patch_set(segmented):
    _, m, ws, seg = segmented
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "--patch-size", "128", "--tag", "again",
                 "--include-geojson", str(seg / "geojson"), "-q"]) == 0
    again = ws / "segment" / "again"
    for sid in ("cmu", "tcga"):
        assert np.array_equal(_coords(seg, sid), _coords(again, sid)), sid
        assert "0 patch(es) dropped" in _status(again)[sid]["message"]


def test_include_and_exclude_polygons_restrict_tiling(segmented, tmp_path):
    _, m, ws, seg = segmented
    base = _coords(seg, "tcga")
    box = [[0, 0], [2000, 0], [2000, 3567], [0, 3567], [0, 0]]      # the left part of the slide
    qupath = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [box]},
               "properties": {"objectType": "annotation"}}]            # QuPath 0.2 writes a bare list
    inc, exc = tmp_path / "inc", tmp_path / "exc"
    inc.mkdir(), exc.mkdir()
    (inc / "tcga.geojson").write_text(json.dumps(qupath))
    (inc / "cmu.json").write_text(json.dumps(feature_collection([])))   # an empty annotation: no patch
    (exc / "tcga.geojson").write_text(json.dumps(feature_collection(qupath)))
    code = main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "--patch-size", "128", "--tag", "inc", "--include-geojson", str(inc), "-q"])
    assert code == 0
    kept = _coords(ws / "segment" / "inc", "tcga")
    # include = a contour (four_pt: any of the points centre +/- 32 px inside); exclude = a hole (centre)
    assert 0 < len(kept) < len(base) and ((kept + 64 - 32)[:, 0] <= 2000).all()
    assert len(kept) == ((base + 64 - 32)[:, 0] <= 2000).sum()
    assert _status(ws / "segment" / "inc")["cmu"]["state"] == "empty"
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "--patch-size", "128", "--tag", "exc", "--exclude-geojson", str(exc), "-q"]) == 0
    dropped = _coords(ws / "segment" / "exc", "tcga")
    assert np.array_equal(dropped, base[(base + 64)[:, 0] >= 2000])
    assert np.array_equal(_coords(ws / "segment" / "exc", "cmu"), _coords(seg, "cmu"))   # no file: nothing excluded


def test_a_slide_without_its_include_file_fails_alone_with_the_expected_path(segmented, tmp_path):
    _, m, ws, seg = segmented
    inc = tmp_path / "only_cmu"
    inc.mkdir()
    (inc / "cmu.geojson").write_bytes((seg / "geojson" / "cmu.geojson").read_bytes())
    code = main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "--patch-size", "128", "--tag", "partial", "--include-geojson", str(inc), "-q"])
    st = _status(ws / "segment" / "partial")
    assert code == 1 and st["cmu"]["state"] == "done"
    assert st["tcga"]["state"] == "failed" and str(inc / "tcga.geojson") in st["tcga"]["message"]


def test_reading_rejects_what_is_not_geojson_and_validation_catches_open_rings():
    with pytest.raises(ConfigError, match="not GeoJSON"):
        read_polygons({"type": "Nope"}, "x.geojson")
    square = [[0, 0], [10, 0], [10, 10], [0, 10]]
    with pytest.raises(ConfigError, match="not closed"):
        validate_feature_collection(feature_collection(
            [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}}]))
    multi = {"type": "MultiPolygon", "coordinates": [[square + [[0, 0]]], [[[20, 20], [30, 20], [30, 30], [20, 20]]]]}
    polys = read_polygons(multi)
    assert len(polys) == 2 and polys[0][0].shape == (4, 2)             # closing point dropped on read
    tiles = feature_collection(tile_features(np.array([[0, 0], [32, 0]]), 32, {"score": np.array([0.5, np.nan])}))
    validate_feature_collection(tiles)
    assert tiles["features"][1]["properties"]["measurements"]["score"] is None   # NaN is not JSON


def test_exclude_with_a_hole_keeps_the_patches_in_the_hole():
    coords = np.array([[x, y] for x in range(0, 100, 10) for y in range(0, 100, 10)])
    outer = np.array([[0, 0], [100, 0], [100, 100], [0, 100]])
    hole = np.array([[30, 30], [70, 30], [70, 70], [30, 70]])
    keep = filter_coords(coords, 10, exclude=[(outer, [hole])])
    centres = coords[keep] + 5
    assert len(centres) == 16 and ((centres >= 30) & (centres <= 70)).all()


def test_a_missing_annotation_folder_is_one_clear_error(segmented, tmp_path, capsys):
    _, m, ws, _ = segmented
    code = main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "--tag", "nofolder", "--exclude-geojson", str(tmp_path / "nope"), "-q"])
    assert code == 2 and "--exclude-geojson" in capsys.readouterr().err
