"""Flags shared by the `visualad` commands: one spelling each (`--model`, `--output`, `--device`, `--dtype`,
`--batch-size`), with the spellings of the first release accepted as deprecated aliases for one release.

Nothing here imports torch at import time, so `--help` stays fast; `--device` is checked when it is parsed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DTYPE_NAMES = ("float32", "bfloat16", "float16")


class DeprecatedAlias(argparse.Action):
    """Stores like `store`, and says so on stderr when the option was spelled in an old way."""

    def __init__(self, option_strings, dest, canonical: str, **kwargs):
        self.canonical = canonical
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warn_alias(option_string, self.canonical)
        setattr(namespace, self.dest, values)


class DeprecatedConstAlias(argparse.Action):
    """A flag without a value standing for `canonical VALUE` (e.g. `--cpu` for `--device cpu`)."""

    def __init__(self, option_strings, dest, canonical: str, const, **kwargs):
        self.canonical = canonical
        super().__init__(option_strings, dest, nargs=0, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warn_alias(option_string, f"{self.canonical} {self.const}")
        setattr(namespace, self.dest, self.const)


def warn_alias(used: str | None, canonical: str) -> None:
    if used is not None and not canonical.startswith(used + " ") and used != canonical:
        print(
            f"note: {used} is deprecated and will be removed in the next release; use {canonical}.", file=sys.stderr
        )


def add_option(
    parser: argparse.ArgumentParser, canonical: str, *, aliases: Sequence[str] = (), **kwargs
) -> argparse.Action:
    """`parser.add_argument(canonical, *aliases, ...)` where each alias prints a deprecation note when used."""
    if not aliases:
        return parser.add_argument(canonical, **kwargs)
    kwargs.setdefault("dest", canonical.lstrip("-").replace("-", "_"))
    return parser.add_argument(canonical, *aliases, action=DeprecatedAlias, canonical=canonical, **kwargs)


def add_model(parser: argparse.ArgumentParser, *, required: bool = True, help: str | None = None) -> None:
    add_option(
        parser,
        "--model",
        required=required,
        help=help or "Model folder or Hub id (a trained, converted or exported VisualAD model).",
    )


def add_output(
    parser: argparse.ArgumentParser,
    *,
    required: bool = True,
    default: str | None = None,
    aliases: Sequence[str] = ("--out", "--output_dir", "--output-dir"),
    help: str | None = None,
) -> None:
    add_option(
        parser,
        "--output",
        aliases=aliases,
        required=required and default is None,
        default=default,
        metavar="DIR",
        help=help or "Folder to write into.",
    )


def parse_device(value: str) -> str:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps`, checked against this machine (argparse `type=`).

    `auto` and `cpu` are returned as they are, without importing torch; anything else is checked by
    `visualad_hf.inference.resolve_device`, the one place that knows what this machine has.
    """
    name = value.strip().lower()
    if name in ("auto", "cpu"):
        return name
    from visualad_hf.inference.loading import DeviceError, resolve_device

    try:
        return resolve_device(name)
    except DeviceError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_device(parser: argparse.ArgumentParser, *, default: str = "auto", cpu_alias: bool = False) -> None:
    """`--device auto|cpu|cuda|cuda:N|mps`; with `cpu_alias`, the old `--cpu` flag too (deprecated)."""
    parser.add_argument(
        "--device",
        type=parse_device,
        default=default,
        help="Device: auto (a CUDA GPU when visible, else the CPU), cpu, cuda, cuda:N or mps.",
    )
    if cpu_alias:
        parser.add_argument(
            "--cpu", dest="device", action=DeprecatedConstAlias, canonical="--device", const="cpu",
            help=argparse.SUPPRESS,
        )


def add_dtype(parser: argparse.ArgumentParser, *, default: str = "float32", help: str | None = None) -> None:
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=default, help=help or "Parameter dtype.")


def torch_dtype(name: str):
    """The torch dtype of a `--dtype` value."""
    from visualad_hf.inference.loading import resolve_dtype

    return resolve_dtype(name)


def add_batch_size(parser: argparse.ArgumentParser, *, default: int = 8) -> None:
    add_option(
        parser, "--batch-size", aliases=("--batch_size",), type=positive_int, default=default,
        help=f"Images per forward pass (default {default}).",
    )


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


__all__ = [
    "DTYPE_NAMES",
    "add_batch_size",
    "add_device",
    "add_dtype",
    "add_model",
    "add_option",
    "add_output",
    "parse_device",
    "positive_int",
    "torch_dtype",
]
