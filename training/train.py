"""Train VisualAD: `accelerate launch training/train.py --config training/configs/clip_visa.yaml [--name value ...]`.

Also runs as plain `python training/train.py ...`. Arguments and recipe: `visualad_hf/trainer/` (or `--help`).
"""

import sys

from visualad_hf.trainer import main

if __name__ == "__main__":
    sys.exit(main())
