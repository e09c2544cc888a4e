"""`visualad app --write-space DIR`: the files of a Hugging Face Space that serves the app around a Hub model.

The Space folder holds `app.py`, `requirements.txt`, a `README.md` with the Space metadata, and a copy of this
package's source (`visualad_hf/`), so it runs without the package being published anywhere: upload the folder
(`hf upload --repo-type space user/name DIR`) and the Space builds.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
from pathlib import Path

from ..errors import VisualADError
from ..hub import staged_folder

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")

APP_PY = '''"""Hugging Face Space: VisualAD zero-shot anomaly detection around {model_id}."""

import os

from visualad_hf.app import build_app, load_detector
from visualad_hf.app.ui import offline_theme

MODEL_ID = os.environ.get("VISUALAD_MODEL", "{model_id}")
app = build_app(load_detector(MODEL_ID, device="cuda" if os.environ.get("VISUALAD_DEVICE") == "cuda" else "cpu"),
                MODEL_ID, title="{title}")

if __name__ == "__main__":
    app.launch(theme=offline_theme())
'''

README = """---
title: {title}
emoji: 🔍
colorFrom: blue
colorTo: red
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: apache-2.0
models:
- {model_id}
tags:
- anomaly-detection
- visualad
---

# {title}

Zero-shot anomaly detection with [VisualAD](https://arxiv.org/abs/2603.07952) and the model
[{model_id}](https://huggingface.co/{model_id}): drop images, see image | heatmap | overlay on one fixed colour
scale, the score and the decision against the model's threshold (adjustable), and download the results.

API: `gradio_client.Client("<this space>").predict(handle_file("part.png"), api_name="/detect")` returns the overlay,
the score and the decision. Written by `visualad app --write-space`; the `visualad_hf/` folder is a copy of the
package it runs.
"""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _requirements() -> list[str]:
    """The package's runtime requirements (no extras) plus the Gradio version this app was tested with."""
    try:
        requires = importlib.metadata.requires("visualad-hf") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise VisualADError("visualad-hf is not installed; install it (pip install -e .) to write a Space") from error
    lines = [req for req in requires if "extra ==" not in req]
    lines.append(f"gradio=={importlib.metadata.version('gradio')}")
    return lines


def write_space(output: str | Path, model_id: str, *, title: str = "VisualAD") -> Path:
    """Write the Space for the Hub model `model_id` into `output` (replaced as a whole, see `hub.staged_folder`)."""
    if not _HUB_ID.match(model_id) or Path(model_id).exists():
        raise VisualADError(
            f"{model_id!r} is not a Hub model id (user/name) but a local path; a Space loads its model from the Hub: "
            "upload the model first (`hf upload user/name MODEL_DIR`) and pass that id"
        )
    try:
        gradio_version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError as error:
        raise VisualADError('writing a Space needs Gradio: pip install "visualad-hf[app]"') from error
    output = Path(output)
    with staged_folder(output) as staging:
        shutil.copytree(_PACKAGE_DIR, staging / "visualad_hf", ignore=_IGNORE)
        (staging / "app.py").write_text(APP_PY.format(model_id=model_id, title=title), encoding="utf-8")
        (staging / "requirements.txt").write_text("\n".join(_requirements()) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(
            README.format(model_id=model_id, title=title, gradio_version=gradio_version), encoding="utf-8"
        )
    return output


__all__ = ["write_space"]
