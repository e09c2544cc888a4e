"""`visualad app`: serve the Gradio web app around a model, or write a Hugging Face Space for one."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._flags import add_device, add_model, add_option, positive_int

DEMO_MODEL = Path("demo_output") / "model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser, required=False, help="Model folder or Hub id (e.g. demo_output/model after `visualad demo`).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0 for every interface).")
    parser.add_argument("--port", type=positive_int, default=7860, help="Port to serve on (default 7860).")
    add_device(parser)
    add_option(parser, "--max-file-size", default="50mb", help="Largest upload Gradio accepts (default 50mb).")
    add_option(
        parser, "--write-space", metavar="DIR", default=None,
        help="Write a Hugging Face Space (app.py, requirements.txt, README.md) around the Hub model --model, then exit.",
    )


def _no_model_message() -> str:
    hint = f"`--model {DEMO_MODEL}` (found here)" if (DEMO_MODEL / "config.json").is_file() else (
        f"run `visualad demo` (it trains one offline in about a minute) and pass `--model {DEMO_MODEL}`"
    )
    return f"no model given: {hint}, or pass a converted (`visualad convert`) or trained model folder or Hub id"


def run(args: argparse.Namespace) -> int:
    from visualad_hf.errors import VisualADError

    if not args.model:
        raise VisualADError(_no_model_message())
    if args.write_space:
        from visualad_hf.app import write_space

        folder = write_space(args.write_space, args.model)
        print(f"Wrote the Space to {folder}; publish it with: hf upload --repo-type space <user>/<space> {folder}")
        return 0
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from visualad_hf.app import build_app, load_detector, require_gradio
    from visualad_hf.app.ui import offline_theme

    require_gradio()
    app = build_app(load_detector(args.model, device=args.device), args.model)
    print(f"Serving {args.model} on http://{args.host}:{args.port} (Ctrl+C to stop)")
    app.launch(
        server_name=args.host, server_port=args.port, max_file_size=args.max_file_size, theme=offline_theme(),
        show_error=False, quiet=True,
    )
    return 0
