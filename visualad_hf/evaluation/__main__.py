"""`python -m visualad_hf.evaluation ...`: the same as `visualad evaluate ...`."""

import sys

from . import main

sys.exit(main(prog="python -m visualad_hf.evaluation"))
