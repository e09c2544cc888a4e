"""`visualad export`: a model folder -> an ONNX or OpenVINO folder that runs without PyTorch.

```bash
visualad export --model M --output M-onnx                       # ONNX, dynamic batch, opset 18, float32
visualad export --model M --output M-int8 --quantize int8       # ONNX Runtime dynamic int8 quantisation
visualad export --model M --output M-ov --format openvino       # OpenVINO IR (from the ONNX graph)
visualad export --model M --output M-b8 --static-batch 8 --opset 20
```
"""

from __future__ import annotations

import argparse
import sys

from ._flags import add_model, add_output, positive_int

FORMAT_CHOICES = ("onnx", "openvino")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser, help="VisualAD model folder or Hub id to export (a trained or converted model).")
    add_output(parser, help="Folder to write the exported graph, config, preprocessor and README into.")
    parser.add_argument(
        "--format",
        default="onnx",
        choices=FORMAT_CHOICES,
        help="onnx (ONNX Runtime, default) or openvino (OpenVINO IR).",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18..23 (default 18).")
    parser.add_argument(
        "--static-batch",
        type=positive_int,
        nargs="?",
        const=1,
        default=None,
        metavar="N",
        help="Fix the batch size to N (1 when N is omitted); default: dynamic batch.",
    )
    parser.add_argument(
        "--quantize",
        default=None,
        choices=("int8",),
        help="int8: ONNX Runtime dynamic quantisation of the weights (smaller, faster).",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="Skip running the exported graph against the PyTorch model."
    )


def run(args: argparse.Namespace) -> int:
    from ..export import export_model

    result = export_model(
        args.model,
        args.output,
        format=args.format,
        opset=args.opset,
        static_batch=args.static_batch,
        quantize=args.quantize,
        check=not args.no_check,
    )
    manifest = result.manifest
    print(f"Exported {args.model} to {result.folder} ({manifest.describe()}).", file=sys.stderr)
    if manifest.parity:
        print(
            f"Checked against PyTorch on {manifest.parity['batch']} random inputs: largest difference "
            f"{manifest.parity['max_abs_diff_anomaly_map']:.2e} on the maps, "
            f"{manifest.parity['max_abs_diff_score']:.2e} on the scores.",
            file=sys.stderr,
        )
    return 0


__all__ = ["add_arguments", "run"]
