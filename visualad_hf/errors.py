"""The base class of every error a user can fix: its message is one line naming the file or setting and the fix.

Commands (`visualad_hf.cli.run_command`) print such errors as one line, without a traceback; library users can
catch `VisualADError` to tell bad input from bugs.
"""

from __future__ import annotations


class VisualADError(Exception):
    """Bad input, a bad file or a bad setting; `str(error)` says what is wrong and how to fix it."""


__all__ = ["VisualADError"]
