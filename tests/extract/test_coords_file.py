"""Coordinates file: round trip, empty slides, CLAM-written files, clear errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from extract.coords_file import FORMAT_VERSION, read_coords, write_coords
from extract.errors import BagError, ConfigError


def _attrs(**extra):
    return {
        "patch_size": 256, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
        "level_dim": np.array([2220, 2967]), "name": "cmu_small_region",
        "patch_size_level0": 256, "target_mpp": 0.5, "slide_mpp": 0.499,
        "params": {"preset": "bwh_biopsy", "a_t": 1, "contour_fn": "four_pt"},
        "fingerprint": "3f2a9c", **extra,
    }


def test_round_trip_keeps_coords_and_every_attribute(tmp_path):
    coords = np.array([[0, 0], [256, 0], [123456, 98765]], dtype=np.int32)
    path = write_coords(tmp_path / "a.h5", coords, _attrs())
    got, attrs = read_coords(path)
    assert got.dtype == np.int64 and got.tolist() == coords.tolist()
    assert attrs["patch_size"] == 256 and attrs["patch_level"] == 0
    assert attrs["downsample"].tolist() == [1.0, 1.0] and attrs["level_dim"].tolist() == [2220, 2967]
    assert attrs["name"] == "cmu_small_region" and attrs["fingerprint"] == "3f2a9c"
    assert attrs["params"] == {"preset": "bwh_biopsy", "a_t": 1, "contour_fn": "four_pt"}
    assert attrs["format_version"] == FORMAT_VERSION
    assert attrs["target_mpp"] == 0.5 and attrs["slide_mpp"] == 0.499
    # CLAM's readers look for the attributes on the coords dataset.
    with h5py.File(path) as f:
        assert f["coords"].attrs["patch_size"] == 256 and f["coords"].dtype == np.int64
        assert isinstance(f["coords"].attrs["params"], str)


def test_empty_slide_writes_and_reads_zero_rows(tmp_path):
    path = write_coords(tmp_path / "empty.h5", np.zeros((0, 2), np.int64), _attrs(slide_mpp=None))
    coords, attrs = read_coords(path)
    assert coords.shape == (0, 2) and coords.dtype == np.int64
    assert "slide_mpp" not in attrs                         # None is not written
    write_coords(tmp_path / "empty2.h5", [], _attrs())
    assert read_coords(tmp_path / "empty2.h5")[0].shape == (0, 2)


def test_reads_a_file_written_the_way_clam_writes_it(tmp_path):
    # CLAM save_hdf5: chunks (1, 2), maxshape (None, 2), attrs on the dataset, tuples as arrays.
    path = tmp_path / "clam.h5"
    coords = np.array([[1024, 2048], [1280, 2048]], dtype=np.int64)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", shape=coords.shape, maxshape=(None, 2), chunks=(1, 2), dtype=coords.dtype)
        d[:] = coords
        for key, value in {"patch_size": 256, "patch_level": 0, "downsample": (1.0, 1.0),
                           "downsampled_level_dim": (46000, 32914), "level_dim": (46000, 32914),
                           "name": "TCGA-XX", "save_path": "/results/patches"}.items():
            d.attrs[key] = value
    got, attrs = read_coords(path)
    assert got.tolist() == coords.tolist()
    assert attrs["name"] == "TCGA-XX" and attrs["patch_size"] == 256
    assert attrs["level_dim"].tolist() == [46000, 32914]


def test_missing_corrupt_and_wrong_files_raise_bag_error_naming_the_file(tmp_path):
    with pytest.raises(BagError, match="nope.h5: coordinates file not found"):
        read_coords(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(BagError, match="junk.h5: cannot read the coordinates file"):
        read_coords(junk)
    other = tmp_path / "features_only.h5"
    with h5py.File(other, "w") as f:
        f["features"] = np.zeros((3, 8), np.float32)
    with pytest.raises(BagError, match="features_only.h5: no 'coords' dataset \\(found: features\\)"):
        read_coords(other)
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f["coords"] = np.zeros((3, 3), np.int64)
    with pytest.raises(BagError, match="wrong.h5: 'coords' has shape \\(3, 3\\), expected \\[N, 2\\]"):
        read_coords(wrong)


def test_truncated_file_is_a_bag_error(tmp_path):
    path = write_coords(tmp_path / "t.h5", np.arange(2000).reshape(-1, 2), _attrs())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BagError, match="t.h5"):
        read_coords(path)


def test_write_rejects_non_integer_coordinates(tmp_path):
    with pytest.raises(ConfigError, match="The 'coords' parameter of write_coords must be an integer array \\[N, 2\\]"):
        write_coords(tmp_path / "x.h5", np.zeros((3, 2), np.float32), _attrs())
    with pytest.raises(ConfigError, match="must be an integer array"):
        write_coords(tmp_path / "x.h5", np.zeros((3, 3), np.int64), _attrs())
