"""The `visualad` command line.

Each sub-command lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`;
a command's module is imported only when that command runs. (Importing the package itself registers the model with
transformers, which loads torch and transformers: a few seconds before any command, `--help` included.)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Keep in the order a newcomer meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("visualad_hf.demo", "Offline end to end: synthetic benchmark -> train a tiny model -> evaluate -> overlays."),
    "synthetic": ("visualad_hf.data.synthetic", "Write the synthetic zero-shot benchmark (MVTec layout) to a folder."),
    "detect": ("visualad_hf.detect", "Score images/folders: overlay panels plus results.csv/json."),
    "calibrate": ("visualad_hf.calibrate", "Set a model's decision threshold from normal (or labelled) images."),
    "evaluate": ("visualad_hf.evaluation", "Evaluate a model on a benchmark: per-category metrics table, files, figures."),
    "convert": ("visualad_hf.convert", "Convert the authors' released VisualAD checkpoint (CLIP.pth) to a model folder."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visualad", description="VisualAD zero-shot anomaly detection.")
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
        parser.error(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
    return run_command(argv[0], argv[1:])


def run_command(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse `argv` for one command and run it: what `visualad NAME ARGS...` does (also behind `python -m` entries)."""
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog or f"visualad {name}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
