"""`visualad demo`: the whole method offline, end to end (synthetic benchmark -> train -> evaluate -> overlays)."""

from __future__ import annotations

import argparse

from . import _flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..demo import DEFAULT_THREADS

    _flags.add_output(parser, default="demo_output", help="folder for the benchmark, model and overlays")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's epochs)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (default: the config's, 111)")
    parser.add_argument(
        "--small", action="store_true", help="a smaller benchmark (fewer images per category), for quick checks"
    )
    parser.add_argument(
        "--threads", type=_flags.positive_int, default=DEFAULT_THREADS,
        help=f"torch CPU threads (default {DEFAULT_THREADS}: the tiny model gains nothing from more on a busy CPU)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..demo import run_demo

    torch.set_num_threads(args.threads)
    result = run_demo(args.output, steps=args.steps, seed=args.seed, small=args.small)
    return 0 if result["gain"]["image_auroc"] is not None else 1


__all__ = ["add_arguments", "run"]
