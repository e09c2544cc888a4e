"""`visualad app`: a Gradio web app around a VisualAD model (and the files a Hugging Face Space needs).

Gradio is an optional extra: `pip install "visualad-hf[app]"`. Importing this package without it raises a
`VisualADError` that gives that command.
"""

from __future__ import annotations

from ..errors import VisualADError


class MissingExtraError(VisualADError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""


def require_gradio():
    """The `gradio` module, or a one-line error with the install command."""
    try:
        import gradio
    except ImportError as error:
        raise MissingExtraError(
            'the web app needs Gradio, which is an optional extra: pip install "visualad-hf[app]"'
        ) from error
    return gradio


from .space import write_space
from .ui import ModelFacts, build_app, load_detector, model_facts

__all__ = ["MissingExtraError", "ModelFacts", "build_app", "load_detector", "model_facts", "require_gradio", "write_space"]
