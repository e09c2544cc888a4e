"""`python -m visualad_hf.convert ...`: the same command as `visualad convert ...`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from visualad_cli import run_command


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("convert", argv, prog="python -m visualad_hf.convert")


if __name__ == "__main__":
    sys.exit(main())
