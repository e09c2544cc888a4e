"""`visualad detect`: score images and folders into an output folder: one overlay panel per image, results.csv/json.

```bash
visualad detect images/ extra.jpg --model path/or/hub-id --output results/ [--threshold T] [--batch-size 8]
```

Writes `results/overlays/<relative path>.png` (image | heatmap | overlay with a colour bar, the score and, when a
threshold is known, the decision), `results/results.csv` and `results/results.json`. A file that cannot be read or
scored is a row with its reason and the run goes on; the exit status is then 1 (2 for a usage error). The folder is
crash-safe: rerunning the same command after a kill completes it and skips the images already done (`--overwrite`
redoes them). Library code: `visualad_hf.inference`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from . import _flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="Image files and/or folders (searched recursively).")
    _flags.add_model(parser)
    _flags.add_output(parser, help="Output folder (overlays/, results.csv, results.json).")
    parser.add_argument(
        "--threshold", type=float, default=None, help="Decision threshold (default: the model's calibrated one)."
    )
    _flags.add_batch_size(parser)
    _flags.add_device(parser)
    _flags.add_dtype(parser, help="Model precision.")
    parser.add_argument(
        "--max-pixels",
        type=_flags.positive_int,
        default=Image.MAX_IMAGE_PIXELS,
        help=f"Refuse images with more pixels than this (default {Image.MAX_IMAGE_PIXELS:,}, Pillow's limit).",
    )
    parser.add_argument(
        "--heatmap-range",
        type=float,
        nargs=2,
        metavar=("VMIN", "VMAX"),
        default=None,
        help="Colour range of all heatmaps (default: the model's full map range, -2L..2L for L feature layers).",
    )
    parser.add_argument("--no-overlays", action="store_true", help="Write only results.csv/json.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Redo every image, replacing an earlier run's outputs in --output."
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..inference import build_detector, detect_to_folder, find_images
    from ..visualization import ColourScale

    files, missing = find_images(args.inputs, exclude=[args.output])
    if not files:
        print(f"No images found in {', '.join(map(str, args.inputs))}.", file=sys.stderr)
        for item in missing:
            print(f"error: {item.path}: {item.error}", file=sys.stderr)
        return 2
    detector = build_detector(args.model, args.device, args.dtype)
    scale = None
    if args.heatmap_range:
        low, high = args.heatmap_range
        if not high > low:
            print(f"--heatmap-range {low:g} {high:g}: VMAX must be greater than VMIN", file=sys.stderr)
            return 2
        scale = ColourScale(low, high, "--heatmap-range")
    with tqdm(total=len(files), unit="img", desc="visualad detect", disable=args.quiet) as bar:
        summary = detect_to_folder(
            detector,
            files,
            Path(args.output),
            missing=missing,
            model=args.model,
            threshold=args.threshold,
            colour_scale=scale,
            overlays=not args.no_overlays,
            batch_size=args.batch_size,
            max_pixels=args.max_pixels,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=bar.update,
        )
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    failed = summary.failed
    print(
        f"{len(summary.records) - len(failed)} image(s) scored, {len(failed)} failed; results in "
        f"{Path(args.output) / 'results.csv'}",
        file=sys.stderr,
    )
    for record in failed:
        print(f"error: {record.path}: {record.error}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["add_arguments", "run"]
