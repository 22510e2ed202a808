"""``wsi-pipeline train`` end to end on a tiny workspace of real HDF5 bags."""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from extract.errors import ConfigError
from mil.train_config import TrainConfig
from pipeline.cli import main
from pipeline.train_stage import experiment_runs, resolve_train_config, run_training
from tests.helpers import synthetic_bags, write_bags


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread on a shared 2-core box


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """24 cases, some with two slides; bags in <ws>/features/<backbone>/<seg>/; a manifest."""
    root = tmp_path_factory.mktemp("ws")
    feats, labels = synthetic_bags(30, (40, 80), 16, shift=5.0, seed=2)
    write_bags(root / "features" / "synthetic-random" / "mpp0.50_256px", feats)
    lines = ["slide_id,label,case_id"]
    for i, sid in enumerate(feats):
        case = f"case{i // 2:02d}" if i < 12 else f"case{i:02d}"  # the first 12 slides in pairs
        lines.append(f"{sid},{'tumor' if labels[sid] else 'normal'},{case}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    # a pair must share a label: give each pair the label of its first slide
    rows = [line.split(",") for line in lines[1:]]
    first = {}
    for r in rows:
        first.setdefault(r[2], r[1])
    manifest.write_text("slide_id,label,case_id\n" + "\n".join(f"{r[0]},{first[r[2]]},{r[2]}" for r in rows) + "\n")
    return root, manifest


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_cli_writes_the_experiment_and_skips_finished_folds(workspace, tmp_path, capsys):
    ws, manifest = workspace
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"workspace": str(ws), "manifest": str(manifest),
                                   "train": {"recipe": "abmil", "min_epochs": 0, "lr": 1e-3, "patience": 5}}))
    args = ["train", "--config", str(cfg), "--epochs", "2", "--folds", "2", "--device", "cpu", "-q"]
    assert main(args) == 0
    exp = ws / "experiments" / "abmil"
    for k in (0, 1):
        for name in ("last.pt", "best.pt", "history.csv", "done.json"):
            assert (exp / f"fold_{k}" / name).is_file(), (k, name)
    recorded = yaml.safe_load((exp / "config.yaml").read_text())
    assert recorded["train"]["epochs"] == 2 and recorded["train"]["model_kw"] == {"gated": False}
    assert recorded["features"].endswith("mpp0.50_256px") and recorded["software"]["torch"]
    labels = json.loads((exp / "labels.json").read_text())
    assert labels["classes"] == ["normal", "tumor"] and labels["mapping"] == {"normal": 0, "tumor": 1}

    splits = read_csv(exp / "splits.csv")
    assert set(splits[0]) == {"slide_id", "seed", "fold", "split"}
    case = {r["slide_id"]: r["case_id"] for r in read_csv(manifest)}
    for k in ("0", "1"):
        part = {p: {case[r["slide_id"]] for r in splits if r["fold"] == k and r["split"] == p}
                for p in ("train", "val", "test")}
        assert not part["train"] & part["test"] and not part["val"] & part["test"]
    out = capsys.readouterr().out
    assert "best epoch" in out and "s/epoch" in out

    # the rerun skips both folds; a different setting is refused
    assert main(args) == 0
    assert [r["status"] for r in read_csv(exp / "summary.csv")] == ["done", "done"]
    assert "skipped" in capsys.readouterr().out  # this run's own table says it skipped them
    assert main(args[:4] + ["3"] + args[5:]) == 2
    assert "epochs: 2 -> 3" in capsys.readouterr().err
    assert [r["dir"] for r in experiment_runs(exp)] == [exp / "fold_0", exp / "fold_1"]


def test_summary_lists_every_fold_whichever_array_task_finishes_last(workspace, capsys):
    """Two fold tasks one after the other, as array tasks overlap: each passes the fold the
    other holds; the summary written last still lists both folds as trained."""
    ws, manifest = workspace
    exp = ws / "experiments" / "array"
    args = ["train", "--manifest", str(manifest), "--workspace", str(ws), "--experiment", "array",
            "--recipe", "abmil", "--seeds", "7", "--epochs", "1", "--folds", "2", "--device", "cpu", "-q"]

    def held_by_a_live_task(fold: int):
        (exp / ".locks").mkdir(parents=True, exist_ok=True)
        lock = exp / ".locks" / f"seed7_fold{fold}.lock"
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}))
        return lock

    lock = held_by_a_live_task(0)  # task B trains fold 1 while task A trains fold 0
    assert main(args) == 1
    assert [r["status"] for r in read_csv(exp / "summary.csv")] == ["running", "done"]
    lock.unlink()
    lock = held_by_a_live_task(1)  # task A ends last: it passed fold 1 while B held it
    assert main(args) == 1
    lock.unlink()
    rows = read_csv(exp / "summary.csv")
    assert [(r["fold"], r["status"]) for r in rows] == [("0", "done"), ("1", "done")]
    assert all(r["best_epoch"] and r["value"] for r in rows)
    capsys.readouterr()


def test_missing_bags_are_listed_and_can_be_skipped(workspace, tmp_path, capsys):
    ws, manifest = workspace
    extra = tmp_path / "manifest.csv"
    extra.write_text(manifest.read_text() + "ghost_a,tumor,gx\nghost_b,normal,gy\n")
    base = ["train", "--manifest", str(extra), "--workspace", str(ws), "--experiment", "missing",
            "--epochs", "1", "--folds", "2", "--device", "cpu", "-q"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "ghost_a" in err and "ghost_b" in err and "--allow-missing" in err
    assert main(base + ["--allow-missing"]) == 0
    splits = read_csv(ws / "experiments" / "missing" / "splits.csv")
    assert "ghost_a" not in {r["slide_id"] for r in splits}


def test_list_models_and_bad_inputs(workspace, tmp_path, capsys):
    ws, manifest = workspace
    assert main(["train", "--list-models"]) == 0
    out = capsys.readouterr().out
    assert "abmil" in out and "transmil" in out
    single = tmp_path / "single.csv"
    single.write_text("slide_id,label\nbag_000,tumor\nbag_001,tumor\nbag_002,tumor\n")
    assert main(["train", "--manifest", str(single), "--workspace", str(ws), "--device", "cpu", "-q"]) == 2
    assert "at least two classes" in capsys.readouterr().err
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("slide_id\nbag_000\n")
    assert main(["train", "--manifest", str(nolabel), "--workspace", str(ws), "-q"]) == 2
    assert "missing required column 'label'" in capsys.readouterr().err
    assert main(["train", "--manifest", str(manifest), "--workspace", str(ws), "--seeds", "1,x", "-q"]) == 2
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_train_config({"recipe": "abmil", "epoch": 3}, Path.cwd())


def test_run_training_mhim_with_two_seeds(workspace):
    ws, manifest = workspace
    cfg, _ = resolve_train_config({"recipe": "mhim_abmil_c16", "epochs": 1, "min_epochs": 0, "folds": 2,
                                   "seeds": [5, 6], "device": "cpu", "lr": 1e-3}, Path.cwd())
    assert isinstance(cfg, TrainConfig) and cfg.mhim.mask_ratio == 0.5
    exp = run_training(manifest, ws, None, cfg, "mhim_two_seeds", resume=False, progress=False)
    runs = experiment_runs(exp)
    assert [(r["seed"], r["fold"]) for r in runs] == [(5, 0), (5, 1), (6, 0), (6, 1)]
    for r in runs:
        assert r["done"] and r["dir"] == exp / f"seed_{r['seed']}" / f"fold_{r['fold']}"
        assert (r["dir"] / "baseline" / "best.pt").is_file()


def test_survival_experiment_from_a_manifest_with_time_and_event(workspace, tmp_path):
    ws, manifest = workspace
    rng = np.random.default_rng(0)
    lines = ["slide_id,case_id,time,event"]
    for r in read_csv(manifest):
        lines.append(f"{r['slide_id']},{r['case_id']},{rng.uniform(1, 60):.1f},{int(rng.random() < 0.7)}")
    surv = tmp_path / "survival.csv"
    surv.write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "surv.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"model": "meanpool", "task": "survival", "n_bins": 2,
                                             "epochs": 1, "patience": None, "folds": 2}}))
    assert main(["train", "--config", str(cfg), "--manifest", str(surv), "--workspace", str(ws),
                 "--experiment", "surv", "--device", "cpu", "-q"]) == 0
    exp = ws / "experiments" / "surv"
    assert json.loads((exp / "labels.json").read_text())["task"] == "survival"
    done = json.loads((exp / "fold_0" / "done.json").read_text())
    assert done["metric"] == "c_index" and 0 <= done["best_value"] <= 1
    assert "val_c_index" in read_csv(exp / "fold_1" / "history.csv")[0]


def test_recipe_flag_and_bare_recipe_config_train_the_same_experiment(workspace, tmp_path, capsys):
    ws, manifest = workspace
    common = ["--workspace", str(ws), "--manifest", str(manifest), "--epochs", "1", "--folds", "2",
              "--device", "cpu", "-q", "--experiment", "recipe_forms"]
    assert main(["train", "--recipe", "abmil", *common]) == 0
    # the same recipe as a bare file: detected by its keys, the experiment is found finished
    recipe = Path(__file__).resolve().parents[2] / "configs" / "train" / "abmil.yaml"
    assert main(["train", "--config", str(recipe), *common]) == 0
    out = capsys.readouterr()
    assert "skipped" in out.out
    assert " INFO " not in out.err  # -q: warnings and the summary only (the trainer's lines too)
    assert main(["train", "--config", str(recipe), "--recipe", "transmil", *common]) == 2
    assert "is a train recipe and --recipe transmil is another" in capsys.readouterr().err


def test_evaluate_finds_the_experiment_train_named_from_the_same_config(workspace, tmp_path, capsys):
    ws, manifest = workspace
    cfg = tmp_path / "x.yaml"
    cfg.write_text(yaml.safe_dump({"name": "top_name", "workspace": str(ws), "manifest": str(manifest),
                                   "train": {"recipe": "abmil", "experiment": "section_name", "epochs": 1,
                                             "folds": 2, "device": "cpu"},
                                   "evaluate": {"n_boot": 10}}))
    assert main(["train", "--config", str(cfg), "-q"]) == 0
    assert (ws / "experiments" / "section_name" / "fold_1" / "done.json").is_file()
    assert main(["evaluate", "--config", str(cfg), "-q"]) == 0
    assert (ws / "experiments" / "section_name" / "evaluation" / "metrics.json").is_file()
