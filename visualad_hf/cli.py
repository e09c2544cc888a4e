"""The `visualad` command line (import path kept): the dispatcher itself is the top-level module `visualad_cli`, so
that `visualad --help` and `--version` answer without importing this package (which loads torch and transformers)."""

from __future__ import annotations

import sys

from visualad_cli import COMMANDS, build_parser, main, run_command

__all__ = ["COMMANDS", "build_parser", "main", "run_command"]

if __name__ == "__main__":
    sys.exit(main())
