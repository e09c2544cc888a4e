"""Deprecated import path, kept for one release: the checkpoint helpers live in `visualad_hf.trainer.checkpoints`.

`import visualad_hf.checkpointing` gives that very module (not a copy), so code that reads or replaces its functions
keeps working; new code should import `visualad_hf.trainer.checkpoints`.
"""

import sys
import warnings

from .trainer import checkpoints as _checkpoints

warnings.warn(
    "visualad_hf.checkpointing is deprecated and will be removed in the next release; "
    "import visualad_hf.trainer.checkpoints instead.",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _checkpoints
