"""Every command in a ```bash block of README.md runs as written, offline, in order.

The commands run from a fresh folder that holds a copy of ``configs/`` (so ``--config
configs/...`` resolves as it does from the repository root). ``wsi-pipeline`` commands run
in-process through ``pipeline.cli.main`` (the console script's entry point) to spare a torch
import per command; any other command, or one using shell syntax, runs through bash with a
``wsi-pipeline`` shim on PATH. ```console blocks (model weights, GPUs, make) are not run.

Nothing is scaled down: the demo runs as ``make demo`` runs it (24 slides, ``configs/demo.yaml``
as it is; about 100 CPU-seconds) and its model must separate the classes on every fold; the
stage examples then reuse its workspace. (On a 12-slide cohort the demo does not separate every
fold: 6 training slides, 2 for validation.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

_SHELL_SYNTAX = re.compile(r"[|&;<>$`*?~]")


def readme_blocks(text: str, language: str) -> list[list[str]]:
    """The commands of every fenced block of ``language``: one per line, ``\\`` joins lines."""
    blocks = re.findall(rf"^```{language}[ \t]*\n(.*?)^```", text, flags=re.M | re.S)
    out = []
    for body in blocks:
        body = body.replace("\\\n", " ")
        out.append([ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")])
    return out


def _without_comment(command: str) -> str:
    return shlex.join(shlex.split(command, comments=True))


def test_readme_has_runnable_commands():
    text = README.read_text()
    commands = [c for block in readme_blocks(text, "bash") for c in block]
    assert any(c.startswith("wsi-pipeline run ") for c in commands)
    for stage in ("segment", "extract", "train", "evaluate"):
        assert any(c.startswith(f"wsi-pipeline {stage} ") for c in commands), f"no runnable `{stage}` example"
    # no placeholder that cannot run as written
    for c in commands:
        assert " ... " not in c and "/models/" not in c, c


def test_every_bash_command_of_the_readme_runs(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "wsi-pipeline"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pipeline.cli "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    monkeypatch.chdir(tmp_path)

    commands = [c for block in readme_blocks(README.read_text(), "bash") for c in block]
    assert commands
    for command in commands:
        plain = _without_comment(command)
        if plain.startswith("wsi-pipeline ") and not _SHELL_SYNTAX.search(plain):
            try:
                code = main(shlex.split(plain)[1:])
            except SystemExit as exc:  # argparse
                code = exc.code
            out = capsys.readouterr()
            assert code == 0, f"README command failed ({code}): {command}\n{out.out[-3000:]}\n{out.err[-3000:]}"
            assert "\r" not in out.out + out.err, f"progress-bar carriage returns in non-TTY output: {command}"
        else:
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, f"README command failed: {command}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"

    # what the commands promise is there, and the demo's model separates the classes on every fold
    metrics = json.loads((tmp_path / "demo_workspace" / "workspace" / "experiments" / "demo" / "evaluation"
                          / "metrics.json").read_text())
    assert len(metrics["folds"]) == 3
    for fold in metrics["folds"]:
        assert fold["auc"] >= 0.95 and fold["balanced_accuracy"] >= 0.85, fold
    assert (tmp_path / "demo_workspace" / "workspace" / "experiments" / "c16_mhim" / "evaluation"
            / "predictions.csv").is_file()
    assert list((tmp_path / "ws_clam" / "segment").glob("level0_256px*/coords/*.h5"))
