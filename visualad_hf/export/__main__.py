"""`python -m visualad_hf.export ...`: the same as `visualad export ...`."""

import sys

from visualad_hf.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("export", sys.argv[1:], prog="python -m visualad_hf.export"))
