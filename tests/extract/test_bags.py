"""Bag files: round trips, CLAM's files, .pt export, clear errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from extract.bags import export_pt, read_bag, write_bag
from extract.errors import BagError, ConfigError

ATTRS = {
    "backbone": "resnet50_trunc",
    "weights": "imagenet",
    "feature_dim": 16,
    "input_size": 224,
    "patch_size_level0": 512,
    "target_mpp": 0.5,
    "dropped_patches": 0,
    "fingerprint": "abc123",
}


def _data(n=50, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 10**5, size=(n, 2))


def test_round_trip_float16_default_and_float32(tmp_path):
    feats, coords = _data()
    write_bag(tmp_path / "a.h5", feats, coords, ATTRS)
    bag = read_bag(tmp_path / "a.h5")
    assert bag.features.dtype == np.float32 and bag.coords.dtype == np.int64
    np.testing.assert_allclose(bag.features, feats, rtol=1e-3, atol=1e-3)
    assert np.array_equal(bag.coords, coords)
    assert {k: bag.attrs[k] for k in ATTRS} == ATTRS
    assert bag.attrs["format_version"] == 1 and len(bag) == 50 and bag.feature_dim == 16
    with h5py.File(tmp_path / "a.h5") as f:
        assert f["features"].dtype == np.float16 and f["features"].compression is None
    assert read_bag(tmp_path / "a.h5", keep_float16=True).features.dtype == np.float16

    write_bag(tmp_path / "b.h5", torch.from_numpy(feats), coords, ATTRS, dtype="float32")
    assert np.array_equal(read_bag(tmp_path / "b.h5").features, feats)


def test_large_bag_is_chunked_about_one_mib(tmp_path):
    feats, coords = _data(n=2000, d=1024)
    write_bag(tmp_path / "big.h5", feats, coords, dict(ATTRS, feature_dim=1024), dtype="float32")
    with h5py.File(tmp_path / "big.h5") as f:
        rows = f["features"].chunks[0]
    assert rows * 1024 * 4 <= 1 << 20 and rows >= 128


def test_empty_bag_and_extra_attrs(tmp_path):
    write_bag(tmp_path / "e.h5", np.zeros((0, 16), np.float32), np.zeros((0, 2), np.int64),
              dict(ATTRS, params={"a": [1, 2]}, slide_mpp=None))
    bag = read_bag(tmp_path / "e.h5")
    assert bag.features.shape == (0, 16) and bag.coords.shape == (0, 2)
    assert bag.attrs["params"] == {"a": [1, 2]} and bag.attrs["slide_mpp"] is None


def test_reads_clam_feature_files(tmp_path):
    feats, coords = _data(n=20, d=1024)
    with h5py.File(tmp_path / "clam.h5", "w") as f:  # CLAM: two datasets, no attributes
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords)
    bag = read_bag(tmp_path / "clam.h5")
    assert np.array_equal(bag.features, feats) and np.array_equal(bag.coords, coords)
    assert bag.attrs == {}


def test_errors_name_the_file(tmp_path):
    feats, coords = _data()
    with h5py.File(tmp_path / "coords_only.h5", "w") as f:
        f.create_dataset("coords", data=coords)
    with pytest.raises(BagError, match="coords_only.h5.*no 'features'"):
        read_bag(tmp_path / "coords_only.h5")
    with h5py.File(tmp_path / "mismatch.h5", "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords[:10])
    with pytest.raises(BagError, match="mismatch.h5.*'coords' must be"):
        read_bag(tmp_path / "mismatch.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(BagError, match="junk.h5"):
        read_bag(tmp_path / "junk.h5")
    with pytest.raises(BagError, match="not found"):
        read_bag(tmp_path / "missing.h5")
    with pytest.raises(BagError, match="coords must be"):
        write_bag(tmp_path / "w.h5", feats, coords[:3], ATTRS)
    with pytest.raises(BagError, match="NaN"):
        write_bag(tmp_path / "w.h5", np.full((2, 16), np.nan), coords[:2], ATTRS)
    with pytest.raises(ConfigError, match="'dtype' parameter"):
        write_bag(tmp_path / "w.h5", feats, coords, ATTRS, dtype="int8")


def test_export_pt_loads_with_torch_and_equals(tmp_path):
    feats, coords = _data()
    write_bag(tmp_path / "s1.h5", feats, coords, ATTRS)
    out = export_pt(tmp_path / "s1.h5", tmp_path / "pt_files" / "s1.pt")
    tensor = torch.load(out, weights_only=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.shape == (50, 16)
    assert np.array_equal(tensor.numpy(), read_bag(tmp_path / "s1.h5").features)
    # .pt files read back as bags too (no coords).
    bag = read_bag(out)
    assert bag.coords is None and np.array_equal(bag.features, tensor.numpy())
