"""The `visualad` command line: the dispatcher.

It lives outside the `visualad_hf` package on purpose: importing the package registers the model with transformers
(torch and transformers load: seconds), and `visualad --help` / `visualad --version` should answer at once. A
command's module (`visualad_hf.commands.<name>`, with `add_arguments(parser)` and `run(args) -> int`) is imported
only when that command runs.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Keep in the order a newcomer meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("visualad_hf.commands.demo", "Offline end to end: synthetic benchmark -> train a tiny model -> evaluate -> overlays."),
    "synthetic": ("visualad_hf.commands.synthetic", "Write the synthetic zero-shot benchmark (MVTec layout) to a folder."),
    "detect": ("visualad_hf.commands.detect", "Score images/folders: overlay panels plus results.csv/json."),
    "calibrate": ("visualad_hf.commands.calibrate", "Set a model's decision threshold from normal (or labelled) images."),
    "evaluate": ("visualad_hf.commands.evaluate", "Evaluate a model on a benchmark: per-category metrics table, files, figures."),
    "reference": ("visualad_hf.commands.reference", "Few-shot: add a reference bank built from good images to a model folder."),
    "convert": ("visualad_hf.commands.convert", "Convert the authors' released VisualAD checkpoint (CLIP.pth) to a model folder."),
    "export": ("visualad_hf.commands.export", "Export a model to ONNX / OpenVINO (optionally int8) to run without PyTorch."),
    "app": ("visualad_hf.commands.app", "Serve the web app (Gradio) around a model, or write a Hugging Face Space."),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("visualad-hf")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visualad", description="VisualAD zero-shot anomaly detection.")
    parser.add_argument("--version", action="version", version=f"visualad-hf {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0 if argv else 2
        if argv[0] == "--version":
            parser.parse_args(argv[:1])  # prints and exits 0
        parser.error(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
    return run_command(argv[0], argv[1:])


def run_command(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse `argv` for one command and run it: what `visualad NAME ARGS...` does (also behind `python -m` entries).

    Errors a user can fix (`visualad_hf.errors.VisualADError`, a full disk) end in one line on stderr and exit code 2
    (1 for a full disk), without a traceback; `VISUALAD_DEBUG=1` shows the traceback too.
    """
    module_name, help_text = COMMANDS[name]
    prog = prog or f"visualad {name}"
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog, description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    from visualad_hf.errors import VisualADError

    try:
        return int(module.run(args) or 0)
    except VisualADError as error:
        if os.environ.get("VISUALAD_DEBUG"):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("VISUALAD_DEBUG"):
            raise
        where = f" while writing {error.filename}" if error.filename else ""
        print(
            f"{prog}: error: the disk is full{where}; free some space and run the same command again "
            "(finished results were kept)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
