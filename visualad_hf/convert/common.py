"""What every part of the converter shares: its error type and two small helpers."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from ..errors import VisualADError


class ConversionError(VisualADError, ValueError):
    """An input that cannot be converted; the message names the file and what to do."""


def listing(names: Iterable[str], limit: int = 12) -> str:
    """`a, b, c, … and N more`: names in an error message, sorted, without flooding the line."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … and {len(names) - limit} more" if len(names) > limit else "")


def file_sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex), read in 1 MiB blocks; the model card records it as provenance."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["ConversionError", "file_sha256", "listing"]
