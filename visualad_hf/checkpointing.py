"""Deprecated import path, kept for one release: the checkpoint helpers live in `visualad_hf.trainer.checkpoints`.

`import visualad_hf.checkpointing` gives that very module (not a copy), so code that reads or replaces its functions
keeps working; new code should import `visualad_hf.trainer.checkpoints`.
"""

import sys

from .trainer import checkpoints as _checkpoints

sys.modules[__name__] = _checkpoints
