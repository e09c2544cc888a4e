"""The `visualad` dispatcher: every registered command builds its parser; help and errors are clear."""

from __future__ import annotations

import argparse
import importlib

import pytest

from visualad_hf.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert set(COMMANDS) >= {"demo", "synthetic", "detect", "calibrate", "evaluate", "convert"}


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["detetc"])
    assert exit_info.value.code == 2
    assert "unknown command 'detetc'; choose one of demo" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_module_builds_its_parser(name, capsys):
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"visualad {name}")
    module.add_arguments(parser)
    assert callable(module.run)
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: visualad {name}" in capsys.readouterr().out
