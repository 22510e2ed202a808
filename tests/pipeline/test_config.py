"""Config files as a user writes them: mistakes are one clear line naming the file and the key."""

import pytest

from pipeline.cli import main


def test_typo_key_names_the_file_and_suggests_the_real_key(tmp_path, capsys):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("segment: {pach_px: 256}\nworkspace: ws\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\na,a.svs\n")
    code = main(["segment", "--config", str(cfg), "--manifest", str(manifest), "-q"])
    assert code == 2
    (message,) = capsys.readouterr().err.strip().splitlines()  # one line, no traceback
    assert str(cfg) in message and "'segment.pach_px'" in message and "did you mean 'patch_px'" in message
    assert not (tmp_path / "ws").exists()  # nothing written


def test_bad_value_in_config_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("segment: {target_mpp: 0}\nworkspace: ws\nmanifest: m.csv\n")
    assert main(["segment", "--config", str(cfg), "-q"]) == 2
    assert f"{cfg}: The 'target_mpp' parameter must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("sections, expected", [
    ("train: {recipe: abmil, epohcs: 3}\n", "'train.epohcs' (did you mean 'epochs'?)"),
    ("train: {recipe: abmil}\nevaluate: {heatmaps: lots}\n", "The 'heatmaps' parameter must be a number >= 0"),
])
def test_run_checks_every_section_before_touching_a_slide(tmp_path, capsys, sections, expected):
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path,label\na,a.svs,x\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("manifest: m.csv\nworkspace: ws\nsegment: {preset: bwh_biopsy}\n"
                   "extract: {backbone: resnet18, weights: random}\n" + sections)
    assert main(["run", "--config", str(cfg), "-q"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(cfg) in line and expected in line
    assert not (tmp_path / "ws").exists()  # the typo was caught before segmentation started


def test_run_accepts_every_evaluate_key_that_evaluate_accepts(tmp_path, capsys):
    """Regression: `run` once checked `evaluate:` against its own key list and refused n_boot,
    gallery_k and cmap. Here it gets past every section and stops at the missing manifest."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("manifest: missing.csv\nworkspace: ws\nsegment: {preset: bwh_biopsy}\n"
                   "train: {recipe: abmil}\n"
                   "evaluate: {n_boot: 50, gallery_k: 4, cmap: magma, threshold: argmax, heatmap_mode: rank,\n"
                   "           protocol: paper, heatmaps: all, device: cpu}\n")
    assert main(["run", "--config", str(cfg), "-q"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{tmp_path / 'missing.csv'}: manifest not found" in line
    cfg.write_text("manifest: missing.csv\nworkspace: ws\nevaluate: {n_bot: 50}\n")
    assert main(["run", "--config", str(cfg), "-q"]) == 2
    assert "'evaluate.n_bot' (did you mean 'n_boot'?)" in capsys.readouterr().err


def test_one_root_config_resolves_paths_once_and_every_command_checks_all_of_it(tmp_path, capsys):
    from pipeline.config import EvaluateConfig, load_config

    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "sub" / "c.yaml"
    cfg.write_text("name: n\nmanifest: ../m.csv\nworkspace: /abs/ws\nevaluate: {n_boot: 7}\n"
                   "train: {recipe: abmil, epochs: 3}\n")
    config = load_config(cfg)
    assert config.manifest == tmp_path / "sub" / ".." / "m.csv" and str(config.workspace) == "/abs/ws"
    assert config.evaluate == EvaluateConfig(n_boot=7) and config.train.epochs == 3 and config.name == "n"
    assert config.resolve_train()[0].epochs == 3
    # a typo in a section the command does not use is still refused, before anything is written
    cfg.write_text("manifest: ../m.csv\nworkspace: ws\nevaluate: {cmpa: jet}\n")
    assert main(["segment", "--config", str(cfg), "-q"]) == 2
    assert "'evaluate.cmpa' (did you mean 'cmap'?)" in capsys.readouterr().err
    cfg.write_text("manifests: m.csv\n")
    assert main(["status", "--config", str(cfg)]) == 2
    assert "'manifests' (did you mean 'manifest'?)" in capsys.readouterr().err
