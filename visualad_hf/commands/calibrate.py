"""`visualad calibrate`: set a model's decision threshold from images, and save the model folder with it.

```bash
visualad calibrate --model M --normal good/ --output M-calibrated [--percentile 99]     # a few normal images
visualad calibrate --model M --normal good/ --anomalous bad/ --output M-calibrated      # labelled: F1-max
visualad calibrate --model M --normal good/ --output M                                 # in place
```

The threshold and how it was obtained go into `config.json` (`anomaly_threshold`, `threshold_calibration`) and the
model card's threshold row; everything else in the folder (card, `eval_results/`, `training_args.yaml`, weights) is
kept. Rules: `visualad_hf/thresholds.py`; library code: `visualad_hf.inference.calibration`. Unreadable files are
reported and left out; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import _flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..thresholds import DEFAULT_PERCENTILE

    _flags.add_model(parser)
    parser.add_argument("--normal", nargs="+", required=True, help="Normal images and/or folders.")
    parser.add_argument(
        "--anomalous", nargs="+", default=None, help="Anomalous images/folders: calibrate by F1-max on both sets."
    )
    parser.add_argument(
        "--percentile",
        type=float,
        default=DEFAULT_PERCENTILE,
        help=f"Percentile of the normal scores used as threshold without --anomalous (default {DEFAULT_PERCENTILE:g}).",
    )
    _flags.add_output(parser, help="Folder to save the calibrated model into (the --model folder: in place).")
    parser.add_argument("--overwrite", action="store_true", help="Replace another model folder given as --output.")
    _flags.add_batch_size(parser)
    _flags.add_device(parser)
    _flags.add_dtype(parser, help="Model precision while scoring (the saved weights are copied unchanged).")
    parser.add_argument(
        "--max-pixels", type=_flags.positive_int, default=None, help="Refuse images with more pixels than this."
    )


def run(args: argparse.Namespace) -> int:
    from ..inference import build_detector, calibrate_from_inputs, check_calibration_output, save_calibrated_model
    from ..inference.calibration import CalibrationInputError

    check_calibration_output(args.model, args.output, args.overwrite)  # before minutes of scoring, not after
    detector = build_detector(args.model, args.device, args.dtype)
    try:
        outcome = calibrate_from_inputs(
            detector,
            args.normal,
            args.anomalous,
            percentile=args.percentile,
            batch_size=args.batch_size,
            max_pixels=args.max_pixels,
        )
    except CalibrationInputError as error:
        _report(error.failures)
        raise
    _report(outcome.failures)
    save_calibrated_model(detector, args.model, args.output, outcome.calibration, overwrite=args.overwrite)
    calibration = outcome.calibration
    print(json.dumps({"threshold": calibration.threshold, **calibration.to_dict()}, indent=2))
    print(f"Saved the calibrated model to {args.output}", file=sys.stderr)
    return 1 if outcome.failures else 0


def _report(failures) -> None:
    for path, reason in failures:
        print(f"error: {path}: {reason}", file=sys.stderr)


__all__ = ["add_arguments", "run"]
