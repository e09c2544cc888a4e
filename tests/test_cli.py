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


def test_help_and_version_do_not_import_the_model_stack():
    import subprocess
    import sys

    code = (
        "import sys, visualad_cli; visualad_cli.main(['--help']); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules and 'visualad_hf' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-c", "import visualad_cli; visualad_cli.main(['--version'])"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("visualad-hf ")


def test_user_errors_are_one_line_and_a_full_disk_is_named(monkeypatch, capsys):
    import errno
    import types

    import visualad_cli
    from visualad_hf.errors import VisualADError

    def failing(exc):
        module = types.SimpleNamespace(add_arguments=lambda parser: None, run=lambda args: (_ for _ in ()).throw(exc))
        return module

    monkeypatch.setitem(visualad_cli.COMMANDS, "fake", ("fake_module", "A fake command."))
    for exc, code, text in [
        (VisualADError("model.json: not a model folder; pass the folder of a saved model"), 2, "not a model folder"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/results.csv"), 1, "the disk is full while writing"),
    ]:
        monkeypatch.setattr(visualad_cli.importlib, "import_module", lambda name, exc=exc: failing(exc))
        assert visualad_cli.run_command("fake", []) == code
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_shared_flags_accept_old_spellings_with_a_note_and_check_devices(capsys):
    from visualad_hf.commands import _flags

    parser = argparse.ArgumentParser()
    _flags.add_output(parser)
    _flags.add_device(parser, cpu_alias=True)
    _flags.add_batch_size(parser)
    args = parser.parse_args(["--out", "x", "--cpu", "--batch_size", "3"])
    assert (args.output, args.device, args.batch_size) == ("x", "cpu", 3)
    err = capsys.readouterr().err
    assert "--out is deprecated" in err and "use --output" in err and "use --device cpu" in err
    assert parser.parse_args(["--output", "y"]).device == "auto" and not capsys.readouterr().err
    for bad, message in [("gpu", "not a device name"), ("tpu", "unknown device")]:
        with pytest.raises(SystemExit):
            parser.parse_args(["--output", "y", "--device", bad])
        assert message in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parser.parse_args(["--output", "y", "--device", "cuda"])
        assert "no CUDA GPU is visible" in capsys.readouterr().err
