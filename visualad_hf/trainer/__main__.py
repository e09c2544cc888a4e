"""`accelerate launch -m visualad_hf.trainer ...` (or `python -m visualad_hf.trainer ...`): the training script."""

import sys

from .loop import main

if __name__ == "__main__":
    sys.exit(main())
