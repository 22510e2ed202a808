"""Official data lists -> manifest, and the official fold procedure under protocol: paper."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from extract.errors import ManifestError
from mil.data import make_splits
from pipeline.manifest import load_manifest
from pipeline.official_lists import convert_official, read_official_labels, write_manifest

ROOT = Path(__file__).resolve().parents[2]


def _c16_list(path: Path, n: int = 30) -> Path:
    """A label_c16.csv-like file: 'tumor_XXX,1' / 'normal_XXX,0', no header, shuffled order."""
    rng = np.random.default_rng(0)
    items = [(f"tumor_{i:03d}", 1) for i in range(n // 3)] + [(f"normal_{i:03d}", 0) for i in range(n - n // 3)]
    items = [items[i] for i in rng.permutation(len(items))]
    path.write_text("".join(f"{s},{y}\n" for s, y in items))
    return path


def test_header_less_label_list_keeps_its_first_row_loudly(tmp_path, caplog):
    src = _c16_list(tmp_path / "label_c16.csv")
    first = src.read_text().splitlines()[0].split(",")[0]
    rows = read_official_labels(src)
    assert len(rows) == 30 and rows[0]["slide_id"] == first  # not lost, as pandas.read_csv would
    assert "KEPT as data" in caplog.text
    with_header = tmp_path / "with_header.csv"
    with_header.write_text("ID,Label\n" + src.read_text())
    caplog.clear()
    assert [r["slide_id"] for r in read_official_labels(with_header)] == [r["slide_id"] for r in rows]
    assert "read as a header" in caplog.text
    bad = tmp_path / "bad.csv"
    bad.write_text("a,1\nb\n")
    with pytest.raises(ManifestError, match=r"line\(s\) \[2\]"):
        read_official_labels(bad)


def test_tcga_lists_get_case_ids_and_survival_lists_one_row_per_slide(tmp_path):
    nsclc = tmp_path / "label_tcga_nsclc.csv"
    nsclc.write_text("TCGA-62-A46R-01Z-00-DX1,LUAD\nTCGA-62-A46R-01Z-00-DX2,LUAD\nTCGA-05-4417,LUSC\n")
    rows = convert_official(nsclc)
    assert [r["case_id"] for r in rows] == ["TCGA-62-A46R", "TCGA-62-A46R", "TCGA-05-4417"]
    surv = tmp_path / "label_blca_surv.csv"
    surv.write_text("Study,ID,Event,Status,WSI\n"
                    "TCGA-BLCA,TCGA-2F-A9KT,110.4666667,0,/x/TCGA-2F-A9KT-01Z-00-DX1.AD.pt;/x/TCGA-2F-A9KT-01Z-00-DX2.A0.pt\n"
                    "TCGA-BLCA,TCGA-4Z-AA7Q,17,1,/x/TCGA-4Z-AA7Q-01Z-00-DX1.9C.pt\n")
    rows = convert_official(surv)
    assert [(r["slide_id"], r["case_id"], r["time"], r["event"]) for r in rows] == [
        ("TCGA-2F-A9KT-01Z-00-DX1.AD", "TCGA-2F-A9KT", "110.4666667", "0"),
        ("TCGA-2F-A9KT-01Z-00-DX2.A0", "TCGA-2F-A9KT", "110.4666667", "0"),
        ("TCGA-4Z-AA7Q-01Z-00-DX1.9C", "TCGA-4Z-AA7Q", "17", "1")]
    manifest = load_manifest(write_manifest(rows, tmp_path / "blca.csv"), require=("time", "event"),
                             check_files=False)
    assert [r.case_id for r in manifest.rows] == ["TCGA-2F-A9KT", "TCGA-2F-A9KT", "TCGA-4Z-AA7Q"]


def _official_get_kflod(ids, labels, k, seed):
    """The official v1 steps, as written in main.py and dataloader.py (get_kflod, val_ratio 0)."""
    random.seed(seed)
    index = [i for i in range(len(ids))]
    random.shuffle(index)
    p, l = np.array(ids, dtype=object)[index], np.array(labels, dtype=object)[index]
    return [list(p[test]) for _, test in StratifiedKFold(n_splits=k).split(p, l)]


@pytest.mark.parametrize("seed", [2021, 2022])
def test_paper_protocol_reproduces_the_official_folds(tmp_path, seed):
    src = _c16_list(tmp_path / "label_c16.csv")
    out = tmp_path / "c16.csv"
    assert subprocess.run([sys.executable, str(ROOT / "data_manifests" / "from_official.py"), str(src), str(out)],
                          capture_output=True, text=True, check=True).returncode == 0
    manifest = load_manifest(out, require=("label",), check_files=False)
    folds = make_splits(manifest.rows, "classification", 3, seed=seed, protocol="paper")
    lines = [line.split(",") for line in src.read_text().splitlines()]
    official = _official_get_kflod([a for a, _ in lines], [b for _, b in lines], 3, seed)
    assert [sorted(f["test"]) for f in folds] == [sorted(t) for t in official]
    assert all(f["val"] == f["test"] for f in folds)  # C16: the test fold doubles as validation
    honest = make_splits(manifest.rows, "classification", 3, seed=seed)
    assert [sorted(f["test"]) for f in honest] != [sorted(t) for t in official]  # our own folds differ
