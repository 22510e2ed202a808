"""`extract --backbone a,b`: one read pass feeds every encoder; one bag each, same coords; resumable per encoder."""

from __future__ import annotations

import csv
import re

import h5py
import numpy as np
import pytest

from extract.bags import read_bag
from extract.patch_reader import PatchReader
from pipeline.cli import main


@pytest.fixture()
def read_counter(monkeypatch):
    """Counts the patches the reader decodes (a spy around the real read; nothing is replaced)."""
    counts = {"patches": 0}
    real = PatchReader.read_group

    def counting(self, coords, indices, out=None):
        counts["patches"] += len(indices)
        return real(self, coords, indices, out)

    monkeypatch.setattr(PatchReader, "read_group", counting)
    return counts


def test_two_encoders_read_each_patch_once_and_resume_separately(tmp_path, slides_dir, read_counter):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\ncmu,{slides_dir / 'cmu_small_region.svs'}\n")
    ws = tmp_path / "ws"
    # 512-px patches: 16 of them, a third of the 256-px grid's ResNet-50 forwards (done three times here)
    assert main(["segment", "--manifest", str(manifest), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "--patch-size", "512", "-q"]) == 0
    with h5py.File(ws / "segment" / "level0_512px_bwh_biopsy" / "coords" / "cmu.h5") as f:
        coords = f["coords"][:]
    run = ["extract", "--manifest", str(manifest), "--workspace", str(ws), "--backbone", "resnet18,resnet50_trunc",
           "--weights", "random", "--batch-size", "auto", "--num-workers", "0", "--dtype", "float32", "-q"]
    assert main(run) == 0
    assert read_counter["patches"] == len(coords) == 16  # not 32: both models fed from one read
    tag = "level0_512px_bwh_biopsy"
    r18 = read_bag(ws / "features" / "resnet18-random" / tag / "cmu.h5")
    r50 = read_bag(ws / "features" / "resnet50_trunc-random" / tag / "cmu.h5")
    assert r18.features.shape == (16, 512) and r50.features.shape == (16, 1024)
    assert np.array_equal(r18.coords, coords) and np.array_equal(r50.coords, coords)
    assert not list((ws / "features").rglob("*.staged"))
    # status.csv says where each encoder's time went (read wait, host->device + preprocessing, forward)
    with open(ws / "features" / "resnet18-random" / tag / "status.csv", newline="") as f:
        message = next(csv.DictReader(f))["message"]
    assert re.fullmatch(r"read \d+\.\d s, transfer \d+\.\d s, model \d+\.\d s \(one read pass for 2 encoders\)",
                        message), message

    # the same features as each encoder alone
    alone = ["extract", "--manifest", str(manifest), "--workspace", str(tmp_path / "ws_alone"), "--weights", "random",
             "--batch-size", "8", "--num-workers", "0", "--dtype", "float32", "-q"]
    (tmp_path / "ws_alone").mkdir()
    import shutil

    shutil.copytree(ws / "segment", tmp_path / "ws_alone" / "segment")
    assert main(alone + ["--backbone", "resnet50_trunc"]) == 0
    single = read_bag(tmp_path / "ws_alone" / "features" / "resnet50_trunc-random" / tag / "cmu.h5")
    np.testing.assert_allclose(single.features, r50.features, rtol=1e-5, atol=1e-5)

    # nothing to do: nothing read; one bag lost: only that encoder reads again
    read_counter["patches"] = 0
    assert main(run) == 0 and read_counter["patches"] == 0
    lost = ws / "features" / "resnet50_trunc-random" / tag / "cmu.h5"
    kept_mtime = (ws / "features" / "resnet18-random" / tag / "cmu.h5").stat().st_mtime_ns
    lost.unlink()
    assert main(run) == 0
    assert read_counter["patches"] == 16 and lost.is_file()
    assert (ws / "features" / "resnet18-random" / tag / "cmu.h5").stat().st_mtime_ns == kept_mtime
    np.testing.assert_allclose(read_bag(lost).features, r50.features, rtol=1e-5, atol=1e-5)


def test_several_backbones_need_one_weights_value_or_one_each(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\na,/nonexistent.svs\n")
    (tmp_path / "ws" / "segment" / "t").mkdir(parents=True)
    (tmp_path / "ws" / "segment" / "t" / "params.json").write_text('{"fingerprint": "x", "params": {}}')
    code = main(["extract", "--manifest", str(manifest), "--workspace", str(tmp_path / "ws"),
                 "--backbone", "resnet18,resnet50", "--weights", "random,random,random", "-q"])
    assert code == 2
    assert "one value or one per backbone (2: resnet18, resnet50)" in capsys.readouterr().err


def test_batch_size_is_a_number_or_auto():
    from extract.errors import ConfigError
    from pipeline.config import ExtractConfig

    assert ExtractConfig(batch_size="auto").batch_size == "auto"
    assert ExtractConfig(batch_size="32").batch_size == 32
    with pytest.raises(ConfigError, match="a number >= 1 or 'auto'"):
        ExtractConfig(batch_size="lots")
