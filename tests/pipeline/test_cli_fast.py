"""The CLI answers at once: listings, help and input errors load no torch (fresh processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import runpy, sys
sys.argv = ['wsi-pipeline'] + sys.argv[1:]
try:
    runpy.run_module('pipeline.cli', run_name='__main__')
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ('torch', 'timm', 'sklearn', 'pandas') if m in sys.modules)
print('HEAVY=' + ','.join(heavy), file=sys.stderr)
sys.exit(code)
"""


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def heavy(res: subprocess.CompletedProcess) -> str:
    return res.stderr.rsplit("HEAVY=", 1)[1].strip()


@pytest.mark.parametrize("args, expect", [
    (("extract", "--list-backbones"), "resnet50_trunc"),
    (("train", "--list-models"), "transmil"),
    (("--help",), "segment"),
    (("train", "--help"), "--recipe"),
])
def test_listings_and_help_load_no_torch(args, expect):
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    assert expect in res.stdout
    assert heavy(res) == "", f"{' '.join(args)} imported {heavy(res)}"


def test_model_listing_agrees_with_the_registry():
    from mil.model_catalog import model_options, model_summaries
    from mil.models import list_models, model_info

    assert model_summaries() == {name: model_info(name).summary for name in list_models()}
    # what TrainConfig validates model_kw against without importing torch
    assert model_options() == {name: model_info(name).options for name in list_models()}


def test_a_flag_typo_names_the_subcommands_closest_flag():
    res = cli("train", "--epochz", "3")
    assert res.returncode == 2
    assert "usage: wsi-pipeline train" in res.stderr  # the subcommand's usage, not the top level's
    assert "--epochz (did you mean --epochs?)" in res.stderr
    assert heavy(res) == ""


def test_manifest_errors_answer_before_torch_and_write_nothing(tmp_path):
    manifest = tmp_path / "bad.csv"
    manifest.write_text("slide_id,path,label\nA,a.svs,1\nB,b.svs,0,extra\n")
    ws = tmp_path / "ws"
    for command in ("segment", "extract", "train"):
        res = cli(command, "--manifest", str(manifest), "--workspace", str(ws))
        assert res.returncode == 2, (command, res.stderr)
        assert "line 3: 4 field(s) but the header has 3" in res.stderr
        assert heavy(res) == "", f"{command} imported {heavy(res)} before refusing the manifest"
        assert not ws.exists(), f"{command} wrote {list(ws.rglob('*'))} before the manifest passed"
    res = cli("evaluate", "--workspace", str(ws), "--experiment", "nope")
    assert res.returncode == 2 and "no such experiment" in res.stderr and not ws.exists()


def test_train_config_module_imports_no_torch():
    code = ("import sys, mil.train_config, extract.runtime; "
            "print(','.join(m for m in ('torch', 'timm', 'sklearn', 'pandas') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"mil.train_config imported {res.stdout.strip()}"


@pytest.mark.parametrize("section, message", [
    ("  epochz: 3", "'train.epochz' (did you mean 'epochs'?)"),
    ("  mhim: {mask_ration: 0.3}", "'train.mhim.mask_ration' (did you mean 'mask_ratio'?)"),
    ("  lr: -1", "The 'lr' parameter of TrainConfig must be a float > 0"),
    ("evaluate: {n_bot: 5}", "'evaluate.n_bot' (did you mean 'n_boot'?)"),
])
def test_a_train_section_error_answers_before_torch(tmp_path, section, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"name: x\nmanifest: m.csv\nworkspace: ws\ntrain:\n  recipe: mhim_abmil_c16\n{section}\n")
    res = cli("train", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert heavy(res) == "", f"a train-section error imported {heavy(res)} before answering"
