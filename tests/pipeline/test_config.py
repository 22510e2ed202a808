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
