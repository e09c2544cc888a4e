"""`visualad synthetic`: write the synthetic zero-shot benchmark (MVTec layout plus `meta.json`) to a folder."""

from __future__ import annotations

import argparse

from . import _flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data.synthetic import DEFAULT_AUXILIARY, DEFAULT_TARGET, DEFECT_TYPES

    _flags.add_output(parser, help="folder to write (empty, new, or a previous synthetic benchmark)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=96, help="side of the square images in pixels")
    parser.add_argument("--auxiliary", default=",".join(DEFAULT_AUXILIARY), help="comma-separated training families")
    parser.add_argument("--target", default=",".join(DEFAULT_TARGET), help="comma-separated evaluation families")
    parser.add_argument("--defects", default=",".join(DEFECT_TYPES), help="comma-separated defect types")
    parser.add_argument("--num-train", type=int, default=8, help="train/good images per category")
    parser.add_argument("--num-normal", type=int, default=8, help="test/good images per category")
    parser.add_argument("--num-anomalous", type=int, default=12, help="defective test images per category")


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def run(args: argparse.Namespace) -> int:
    from ..data.synthetic import SyntheticBenchmarkError, generate_synthetic_benchmark

    try:
        benchmark = generate_synthetic_benchmark(
            args.output,
            seed=args.seed,
            image_size=args.image_size,
            auxiliary_categories=_names(args.auxiliary),
            target_categories=_names(args.target),
            defect_types=_names(args.defects),
            num_train=args.num_train,
            num_test_normal=args.num_normal,
            num_test_anomalous=args.num_anomalous,
        )
    except (ValueError, FileExistsError) as error:
        raise SyntheticBenchmarkError(str(error)) from error
    per_category = args.num_normal + args.num_anomalous
    print(f"wrote the synthetic benchmark to {benchmark.root} (seed {benchmark.seed}, {benchmark.image_size} px)")
    print(f"  auxiliary (train on): {', '.join(benchmark.auxiliary_categories)}")
    print(f"  target (evaluate on): {', '.join(benchmark.target_categories)}")
    print(
        f"  per category: {args.num_train} train/good, {args.num_normal} + {args.num_anomalous} test ({per_category})"
    )
    print(f'  load it: load_anomaly_dataset("mvtec", "{benchmark.root}", categories=[...])')
    return 0


__all__ = ["add_arguments", "run"]
