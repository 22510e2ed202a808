"""Patch QC: focus, background and ink per patch in the bag; train/evaluate drop patches by rules."""

from __future__ import annotations

import json

import cv2
import h5py
import numpy as np
import pytest
import yaml

from extract.errors import BagError, ConfigError
from extract.patch_qc import QCFilter, patch_qc, read_qc, write_qc
from pipeline.cli import main


@pytest.fixture(scope="module")
def he_patches(images_dir):
    """Four 256-px patches: sharp tissue, the same blurred, glass, and tissue with a blue pen line."""
    rgb = cv2.cvtColor(cv2.imread(str(images_dir / "he_1000.png")), cv2.COLOR_BGR2RGB)
    sharp = np.ascontiguousarray(rgb[100:356, 100:356])
    blurred = cv2.GaussianBlur(sharp, (0, 0), 3)
    glass = np.full_like(sharp, 242)
    inked = sharp.copy()
    cv2.line(inked, (0, 128), (255, 128), (40, 60, 190), 90)
    return np.stack([sharp, blurred, glass, inked])


def test_focus_background_and_ink_tell_the_patches_apart(he_patches):
    qc = patch_qc(he_patches)
    assert set(qc) == {"focus", "background", "ink"} and all(v.dtype == np.float32 for v in qc.values())
    assert qc["focus"][0] > 10 * qc["focus"][1]                  # blur lowers the Laplacian variance
    assert qc["background"][2] == 1.0 and qc["background"][0] < 0.05
    assert qc["ink"][3] > 0.25 and qc["ink"][0] < 0.01
    # torch batches (what the reader hands the extractor) give the same values
    import torch

    again = patch_qc(torch.from_numpy(he_patches), ("blur",))
    np.testing.assert_allclose(again["focus"], qc["focus"])


def test_filter_rules_parse_and_bad_ones_name_the_format():
    f = QCFilter.parse("focus>=50, background<0.5")
    assert str(f) == "focus>=50,background<0.5" and f.columns == ("focus", "background")
    keep = f.keep({"focus": np.array([10, 60, 80.0]), "background": np.array([0, 0, 0.7])})
    assert keep.tolist() == [False, True, False]
    with pytest.raises(ConfigError, match="focus>=50.*'sharpness>1'"):
        QCFilter.parse("sharpness>1")
    with pytest.raises(ConfigError, match="blur, background, ink"):
        patch_qc(np.zeros((1, 8, 8, 3), np.uint8), ("blurry",))


def test_extract_with_qc_stores_one_value_per_patch(tmp_path, slides_dir):
    m = tmp_path / "m.csv"
    m.write_text(f"slide_id,path\ncmu,{slides_dir / 'cmu_small_region.svs'}\n")
    ws = tmp_path / "ws"
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-level", "0", "-q"]) == 0
    assert main(["extract", "--manifest", str(m), "--workspace", str(ws), "--backbone", "resnet18", "--weights",
                 "random", "--batch-size", "16", "--num-workers", "0", "--qc", "blur,background,ink", "-q"]) == 0
    bag = ws / "features" / "resnet18-random" / "level0_256px_bwh_biopsy" / "cmu.h5"
    qc = read_qc(bag)
    with h5py.File(bag) as f:
        coords = f["coords"][:]
    assert all(len(v) == len(coords) == 50 for v in qc.values())
    assert qc["focus"].min() > 0 and qc["ink"].max() < 0.1 and np.median(qc["ink"]) < 0.01
    assert qc["background"].max() > 0.3 and np.median(qc["background"]) < 0.3   # edge patches hold glass

    from mil.data import load_bags

    full = load_bags(bag.parent, ["cmu"])
    kept = load_bags(bag.parent, ["cmu"], qc_filter="background<=0.3")
    n = int((qc["background"] <= 0.3).sum())
    assert 0 < n < 50 and kept.coords("cmu").shape == (n, 2)
    np.testing.assert_array_equal(kept.coords("cmu"), coords[qc["background"] <= 0.3])
    assert full.coords("cmu").shape == (50, 2)


def test_training_drops_patches_by_qc_and_evaluate_reuses_the_rules(tmp_path):
    from mil.train_config import TrainConfig
    from pipeline.evaluate_stage import run_evaluation
    from pipeline.train_stage import run_training
    from tests.helpers import binary_cohort

    ws, features, manifest, ids, _ = binary_cohort(tmp_path, 12, seed=1, prefix="q")
    config = TrainConfig(model="abmil", model_kw={"embed_dim": 8, "attn_dim": 4}, epochs=2, folds=2, lr=1e-2,
                         seeds=(0,), device="cpu", mhim=None, patience=None, val_ratio=0.3)
    with pytest.raises(BagError, match="re-extract with --qc blur"):
        run_training(manifest, ws, features, config, "noqc", progress=False, qc_filter="focus>=1")
    rng = np.random.default_rng(0)
    for sid in ids:
        with h5py.File(features / f"{sid}.h5") as f:
            n = f["features"].shape[0]
        write_qc(features / f"{sid}.h5", {"focus": rng.uniform(0, 100, n)})
    exp = run_training(manifest, ws, features, config, "qc", progress=False, qc_filter="focus>=30")
    assert yaml.safe_load((exp / "config.yaml").read_text())["qc_filter"] == "focus>=30"
    out = run_evaluation(ws, "qc", n_boot=10, device="cpu")
    path = sorted((out / "geojson").glob("*.geojson"))[0]
    fc, sid = json.loads(path.read_text()), path.stem
    focus = read_qc(features / f"{sid}.h5", ("focus",))["focus"]
    assert len(fc["features"]) - 1 == int((focus >= 30).sum())     # evaluate saw only the kept patches
    with pytest.raises(ConfigError, match="qc_filter"):                 # an experiment keeps its rules
        run_training(manifest, ws, features, config, "qc", progress=False, qc_filter="focus>=50")
