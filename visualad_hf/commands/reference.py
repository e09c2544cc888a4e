"""`visualad reference`: write a model folder whose few-shot reference bank is built from good images."""

from __future__ import annotations

import argparse

from ._flags import add_batch_size, add_device, add_model, add_output, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument(
        "--normal", nargs="+", required=True, metavar="PATH",
        help="good images of one product: folders (searched recursively) or files; all are used (see --max-images)",
    )
    add_output(parser, help="Folder to write: the model with reference_bank.safetensors beside its weights.")
    parser.add_argument("--max-images", type=positive_int, default=None, help="use only the first N images (sorted)")
    parser.add_argument(
        "--fusion", choices=("add", "replace"), default=None,
        help="how the bank enters the maps (default: the model config's, 'add')",
    )
    parser.add_argument("--weight", type=float, default=None, help="weight of the bank's distance in 'add' fusion")
    add_batch_size(parser)
    add_device(parser)


def run(args: argparse.Namespace) -> int:
    from ..reference_folder import write_reference_model

    written = write_reference_model(
        args.model, args.normal, args.output, batch_size=args.batch_size, device=args.device,
        fusion=args.fusion, weight=args.weight, max_images=args.max_images,
    )
    print(
        f"wrote {written.output}: reference bank of {written.num_images} image(s), "
        f"{written.bank_bytes / 2**20:.1f} MiB (reference_bank.safetensors)"
    )
    return 0
