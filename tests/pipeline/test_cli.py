"""The bare command and the help a user reads first."""

from pipeline.cli import main


def test_bare_command_prints_the_subcommands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in ("segment", "extract", "train", "evaluate", "run", "make-demo"):
        assert command in out
