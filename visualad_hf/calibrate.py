"""`visualad calibrate`: set a model's decision threshold from images, and save the model with it.

```bash
visualad calibrate --model M --normal good/ --output M-calibrated [--percentile 99]     # a few normal images
visualad calibrate --model M --normal good/ --anomalous bad/ --output M-calibrated      # labelled: F1-max
```

The threshold and how it was obtained go into the saved `config.json` (`anomaly_threshold`,
`threshold_calibration`), so `pipeline("anomaly-detection", model="M-calibrated")` and `visualad detect` use it.
Rules: `visualad_hf/thresholds.py`. Unreadable files are reported and left out; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .detect import build_detector, find_images, load_for_detection
from .thresholds import DEFAULT_PERCENTILE, calibrate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="VisualAD model folder or Hub id")
    parser.add_argument("--normal", nargs="+", required=True, help="normal images and/or folders")
    parser.add_argument(
        "--anomalous", nargs="+", default=None, help="anomalous images/folders: calibrate by F1-max on both sets"
    )
    parser.add_argument(
        "--percentile",
        type=float,
        default=DEFAULT_PERCENTILE,
        help=f"percentile of the normal scores used as threshold without --anomalous (default {DEFAULT_PERCENTILE:g})",
    )
    parser.add_argument("--output", required=True, type=Path, help="folder to save the calibrated model into")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--max-pixels", type=int, default=None, help="refuse images with more pixels than this")


def run(args: argparse.Namespace) -> int:
    detector = build_detector(args.model, args.device, args.dtype)
    bit_depth = detector.image_processor.bit_depth_scaling
    failures: list[tuple[str, str]] = []

    def readable_images(inputs: list[str]) -> list:
        files, missing = find_images(inputs)
        failures.extend((record.path, record.error) for record in missing)
        images = []
        for file, image, error in load_for_detection(files, bit_depth, args.max_pixels):
            if error is None:
                images.append(image)
            else:
                failures.append((str(file.path), error.reason))
        return images

    normal = readable_images(args.normal)
    anomalous = readable_images(args.anomalous) if args.anomalous else None
    for path, reason in failures:
        print(f"error: {path}: {reason}", file=sys.stderr)
    if not normal or (args.anomalous and not anomalous):
        print("Calibration needs readable normal images (and anomalous ones with --anomalous).", file=sys.stderr)
        return 2
    calibration = calibrate(detector, normal, anomalous, percentile=args.percentile, batch_size=args.batch_size)
    detector.save_pretrained(args.output)
    print(json.dumps({"threshold": calibration.threshold, **calibration.to_dict()}, indent=2))
    print(f"Saved the calibrated model to {args.output}", file=sys.stderr)
    return 1 if failures else 0


__all__ = ["add_arguments", "run"]
