"""Errors of export and of running exported folders: one line each, naming the file or setting and the fix.

They derive from `VisualADError` only (not `ValueError`/`OSError`), so that `pipeline(...)`, which tries its model
classes one after another and swallows those, lets them reach the user unchanged.
"""

from __future__ import annotations

from ..errors import VisualADError

ONNX_EXTRA = 'pip install "visualad-hf[onnx]"'
OPENVINO_EXTRA = 'pip install "visualad-hf[openvino]"'


class ExportError(VisualADError):
    """Base class of the errors below."""


class UnknownFormatError(ExportError):
    """An export format (or quantisation) that does not exist."""


class MissingRuntimeError(ExportError):
    """onnx / onnxruntime / openvino is not installed; the message gives the pip command."""


class InputSizeError(ExportError):
    """`pixel_values` whose shape the exported graph cannot take."""


class ExportMismatchError(ExportError):
    """An exported folder whose files disagree: config vs graph, graph vs manifest, or a damaged graph."""


class ExportUnsupportedError(ExportError):
    """A combination of settings the export cannot produce (e.g. an opset outside the supported range)."""


class NotAnExportedFolderError(OSError):
    """Not an exported folder: an `OSError`, so the pipeline's loader goes on to the torch model classes."""


def require(module: str, extra: str):
    """Import an optional runtime module, or fail with the pip command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingRuntimeError(f"{module} is not installed ({error}); install it with: {extra}") from error


__all__ = [
    "ExportError",
    "ExportMismatchError",
    "ExportUnsupportedError",
    "InputSizeError",
    "MissingRuntimeError",
    "NotAnExportedFolderError",
    "UnknownFormatError",
    "require",
]
