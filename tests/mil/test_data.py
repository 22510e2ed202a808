"""mil.data: bags read once from real HDF5 files, labels, and case-level stratified splits."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.bags import find_bag, write_bag
from extract.errors import BagError, ConfigError
from mil.data import (
    BagSet,
    encode_labels,
    load_bags,
    make_splits,
    make_targets,
)
from pipeline.manifest import SlideRow
from tests.helpers import synthetic_bags


def _write(folder: Path, features: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for sid, x in features.items():
        coords = np.stack([np.arange(len(x)) * 256, np.zeros(len(x))], axis=1).astype(np.int64)
        write_bag(folder / f"{sid}.h5", x, coords, attrs={"backbone": "synthetic"})
    return folder


def rows(n: int, labels=None, slides_per_case: int = 1, **extra) -> list[SlideRow]:
    out = []
    for i in range(n):
        label = labels[i] if labels is not None else ("tumor" if i % 2 else "normal")
        kw = {k: (v[i] if isinstance(v, (list, tuple)) else v) for k, v in extra.items()}
        out.append(SlideRow(f"s{i:03d}", i + 2, label=label, case_id=f"c{i // slides_per_case:03d}", **kw))
    return out


# ------------------------------------------------------------------------------------- bags


def test_bags_are_read_once_kept_float16_on_host_and_served_as_float32(tmp_path):
    feats, _ = synthetic_bags(4, (5, 9), 8, seed=1)
    folder = _write(tmp_path / "bags", feats)
    bags = load_bags(folder, list(feats))
    assert len(bags) == 4 and bags.in_dim == 8 and bags.slide_ids == list(feats)
    sid = "bag_002"
    assert bags.host(sid).dtype == torch.float16  # stored dtype kept: half the memory
    x = bags.get(sid, "cpu")
    assert x.dtype == torch.float32 and tuple(x.shape) == feats[sid].shape
    np.testing.assert_allclose(x.numpy(), feats[sid], atol=1e-2)
    assert bags.coords(sid).shape == (len(feats[sid]), 2)
    # moved once: the same tensor object every epoch
    assert bags.to_device("cpu") is True
    assert bags.get(sid, "cpu") is bags.get(sid, "cpu")
    # a budget too small: per-call conversion instead
    assert bags.to_device("cpu", max_bytes=16) is False
    assert bags.get(sid, "cpu") is not bags.get(sid, "cpu")
    sub = bags.subset(["bag_000", sid])
    assert sub.slide_ids == ["bag_000", sid] and sub.host(sid) is bags.host(sid)


def test_missing_bags_are_all_listed_or_skipped_with_a_warning(tmp_path, caplog):
    feats, _ = synthetic_bags(3, 6, 4, seed=0)
    folder = _write(tmp_path / "bags", feats)
    wanted = list(feats) + ["ghost_1", "ghost_2"]
    with pytest.raises(BagError) as err:
        load_bags(folder, wanted)
    msg = str(err.value)
    assert "2 slide(s) have no bag" in msg and "ghost_1" in msg and "ghost_2" in msg and "--allow-missing" in msg
    with caplog.at_level(logging.WARNING):
        bags = load_bags(folder, wanted, allow_missing=True)
    assert bags.slide_ids == list(feats)
    assert "ghost_1" in caplog.text and "ghost_2" in caplog.text


def test_an_empty_bag_is_named_and_refused_unless_allowed(tmp_path):
    feats, _ = synthetic_bags(2, 6, 4, seed=0)
    folder = _write(tmp_path / "bags", feats)
    write_bag(folder / "empty_one.h5", np.zeros((0, 4), np.float32), np.zeros((0, 2), np.int64))
    with pytest.raises(BagError, match=r"0 instances.*empty_one"):
        load_bags(folder, list(feats) + ["empty_one"])
    assert "empty_one" not in load_bags(folder, list(feats) + ["empty_one"], allow_missing=True)


def test_bags_of_different_backbones_and_missing_folders_fail_clearly(tmp_path):
    folder = _write(tmp_path / "bags", {"a": np.ones((3, 4), np.float32), "b": np.ones((3, 6), np.float32)})
    with pytest.raises(BagError, match="different feature sizes"):
        load_bags(folder, ["a", "b"])
    with pytest.raises(BagError, match="feature folder not found"):
        load_bags(tmp_path / "nowhere", ["a"])


def test_clam_layout_and_pt_exports_are_found(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    _write(tmp_path / "clam" / "h5_files", {"s1": x})
    (tmp_path / "clam" / "pt_files").mkdir()
    torch.save(torch.from_numpy(x), tmp_path / "clam" / "pt_files" / "s2.pt")
    assert find_bag(tmp_path / "clam", "s1").name == "s1.h5"
    bags = load_bags(tmp_path / "clam", ["s1", "s2"])
    np.testing.assert_allclose(bags.get("s2").numpy(), x)


# ------------------------------------------------------------------------------------- labels


def test_labels_names_sorted_integers_kept_and_explicit_classes():
    assert encode_labels(rows(4, ["tumor", "normal", "tumor", "normal"])).classes == ("normal", "tumor")
    m = encode_labels(rows(3, ["1", "0", "01"]))
    assert m.classes == ("0", "1") and m.index("01") == 1
    t = make_targets(rows(3, ["b", "a", "b"]), "classification", classes=("b", "a"))
    assert t.y == {"s000": 0, "s001": 1, "s002": 0} and t.to_dict()["mapping"] == {"b": 0, "a": 1}


def test_bad_labels_give_clear_errors():
    with pytest.raises(ConfigError, match=r"outside the configured classes.*s001 \('tumour'\)"):
        encode_labels(rows(2, ["tumor", "tumour"]), classes=("normal", "tumor"))
    with pytest.raises(ConfigError, match="at least two classes"):
        encode_labels(rows(3, ["tumor"] * 3))
    with pytest.raises(ConfigError, match="0..C-1"):
        encode_labels(rows(2, ["1", "2"]))
    with pytest.raises(ConfigError, match="no label"):
        encode_labels(rows(2, ["a", None]))
    with pytest.raises(ConfigError, match="every slide is censored"):
        make_targets(rows(2, time=[1.0, 2.0], event=0), "survival")


# ------------------------------------------------------------------------------------- splits


def _case_of(rs):
    return {r.slide_id: r.case_id for r in rs}


def test_folds_are_by_case_stratified_complete_and_repeatable():
    rs = rows(60, slides_per_case=3, labels=["tumor" if (i // 3) % 3 == 0 else "normal" for i in range(60)])
    case = _case_of(rs)
    label = {r.slide_id: r.label for r in rs}
    folds = make_splits(rs, "classification", n_folds=4, seed=7, val_ratio=0.2)
    assert len(folds) == 4
    tested = [s for f in folds for s in f["test"]]
    assert sorted(tested) == sorted(case)  # every slide tested exactly once
    for f in folds:
        parts = {k: {case[s] for s in f[k]} for k in ("train", "val", "test")}
        # no case spans two parts of a fold: one patient never in train and test
        assert not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
        assert not parts["train"] & parts["val"]
        assert sorted(f["train"] + f["val"] + f["test"]) == sorted(case)
        assert set(Counter(label[s] for s in f["test"])) == {"tumor", "normal"}
        assert set(Counter(label[s] for s in f["val"])) == {"tumor", "normal"}
    assert make_splits(rs, "classification", 4, seed=7, val_ratio=0.2) == folds
    assert make_splits(rs, "classification", 4, seed=8, val_ratio=0.2) != folds


def test_survival_splits_stratify_by_event():
    rs = rows(40, time=[float(i) for i in range(40)], event=[int(i % 4 == 0) for i in range(40)])
    event = {r.slide_id: r.event for r in rs}
    for f in make_splits(rs, "survival", n_folds=5, seed=0):
        assert sum(event[s] for s in f["test"]) == 2  # 10 events over 5 folds


def test_predefined_fold_and_split_columns_win():
    rs = rows(12, fold=[i % 3 for i in range(12)])
    folds = make_splits(rs, "classification", n_folds=5, seed=0)
    assert len(folds) == 3
    for k, f in enumerate(folds):
        assert f["test"] == [f"s{i:03d}" for i in range(12) if i % 3 == k]
        assert f["val"] and not set(f["val"]) & set(f["test"])
    split = ["train"] * 6 + ["val"] * 2 + ["test"] * 4
    (only,) = make_splits(rows(12, split=split), "classification", n_folds=5, seed=0)
    assert only["val"] == ["s006", "s007"] and only["test"] == ["s008", "s009", "s010", "s011"]
    paper = make_splits(rows(12, fold=[i % 3 for i in range(12)]), "classification", 3, seed=0, protocol="paper")
    assert all(f["val"] == f["test"] for f in paper)


def test_a_case_across_predefined_folds_is_refused():
    rs = rows(6, slides_per_case=2, fold=[0, 1, 0, 0, 1, 1])
    with pytest.raises(ConfigError, match=r"case\(s\) have slides in different folds.*c000"):
        make_splits(rs, "classification", 2, seed=0)
    with pytest.raises(ConfigError, match="folds"):
        make_splits(rows(6), "classification", n_folds=1, seed=0)


def test_bagset_rejects_unknown_slide():
    bags = BagSet({"a": torch.ones(2, 3)})
    with pytest.raises(BagError, match="'b'"):
        bags.get("b")


def test_a_features_folder_with_no_bag_at_all_points_at_the_folder(tmp_path):
    with pytest.raises(BagError, match=r"no bag in .* for any of the 3 manifest slide\(s\).*check --features"):
        load_bags(tmp_path, ["a", "b", "c"], allow_missing=True)
