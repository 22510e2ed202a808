"""Every command in a ```bash block of README.md runs as written, offline, in order.

The commands run from a fresh folder that holds a copy of ``configs/`` (so ``--config
configs/...`` resolves as it does from the repository root). ``wsi-pipeline`` commands run
in-process through ``pipeline.cli.main`` (the console script's entry point) to spare a torch
import per command; any other command, or one using shell syntax, runs through bash with a
``wsi-pipeline`` shim on PATH. ```console blocks (model weights, GPUs, make) are not run.

Two sizes are scaled down so the suite stays fast, and only these: the demo cohort's
``--slides 24`` (to ``--slides 9``) and, in the copied ``configs/demo.yaml``, the training
length. Everything else is the README's text.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: The README's sizes -> the test's (the only edits made to a command).
SCALE_DOWN = {"--slides 24": "--slides 9"}
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


def _shrink_demo_config(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    cfg["train"].update({"epochs": 6, "min_epochs": 0, "patience": None})
    cfg["evaluate"]["heatmaps"] = 1
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_every_bash_command_of_the_readme_runs(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    _shrink_demo_config(tmp_path / "configs" / "demo.yaml")
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
        for old, new in SCALE_DOWN.items():
            command = command.replace(old, new)
        plain = _without_comment(command)
        if plain.startswith("wsi-pipeline ") and not _SHELL_SYNTAX.search(plain):
            try:
                code = main(shlex.split(plain)[1:])
            except SystemExit as exc:  # argparse
                code = exc.code
            out = capsys.readouterr()
            assert code == 0, f"README command failed ({code}): {command}\n{out.out[-3000:]}\n{out.err[-3000:]}"
        else:
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, f"README command failed: {command}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"

    # what the commands promise is there
    assert (tmp_path / "demo_workspace" / "workspace" / "experiments" / "demo" / "evaluation" / "metrics.json").is_file()
    assert (tmp_path / "ws" / "experiments" / "c16_mhim" / "evaluation" / "predictions.csv").is_file()
    assert list((tmp_path / "ws_clam" / "segment").glob("level0_256px*/coords/*.h5"))
