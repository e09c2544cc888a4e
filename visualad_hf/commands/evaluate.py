"""`visualad evaluate`: a model on a benchmark, the paper's table, files and figures (SPEC §7).

Also `accelerate launch training/evaluate.py ...` (several processes) and `python -m visualad_hf.evaluation ...`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import VisualADError
from . import _flags


class DatasetOptionError(VisualADError):
    """A `--dataset-option` that is not KEY=VALUE."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluation.figures import DEFAULT_FIGURE_SAMPLES
    from ..metrics.functional import DEFAULT_FPR_LIMIT, DEFAULT_NUM_THRESHOLDS

    _flags.add_model(parser)
    parser.add_argument("--dataset", required=True, help="benchmark name (mvtec, visa, ..., folder); see the README")
    parser.add_argument("--data-dir", required=True, help="the benchmark's root folder")
    parser.add_argument("--categories", nargs="+", default=None, help="evaluate only these categories")
    parser.add_argument("--split", default="test")
    _flags.add_output(
        parser, required=False, help="write metrics.{json,csv,md}, scores.csv and figures/ into this folder"
    )
    _flags.add_batch_size(parser)
    _flags.add_device(parser, cpu_alias=True)
    parser.add_argument(
        "--aupro", choices=("exact", "classic"), default="exact",
        help="exact: every distinct threshold (default); classic: AnomalyCLIP's --num-thresholds formula (SPEC §7)",
    )
    parser.add_argument("--num-thresholds", type=_flags.positive_int, default=DEFAULT_NUM_THRESHOLDS)
    parser.add_argument("--fpr-limit", type=float, default=DEFAULT_FPR_LIMIT)
    parser.add_argument(
        "--figures", type=int, default=DEFAULT_FIGURE_SAMPLES, help="samples per category figure (0: none)"
    )
    parser.add_argument(
        "--figure-range", type=float, nargs=2, metavar=("VMIN", "VMAX"), default=None,
        help="score range of the figures' colour scale (default: lowest to highest map value of the run)",
    )
    parser.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--metric-workers", type=int, default=2, help="threads computing the metrics")
    parser.add_argument("--storage-dir", type=Path, default=None, help="spill pixel data here instead of memory")
    parser.add_argument("--cache-dir", type=Path, default=None, help="datasets cache folder")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None)
    parser.add_argument(
        "--dataset-option", action="append", default=[], metavar="KEY=VALUE",
        help="loader option, e.g. protocol=official for ksdd2 (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--few-shot", type=_flags.positive_int, default=None, metavar="K",
        help="few-shot protocol: per category, a reference bank of K normal images drawn from its train split",
    )
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="draw seed(s) for --few-shot; several: mean ± std")
    parser.add_argument("--reference-split", default="train", help="split the --few-shot images are drawn from")


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` loader options; values are read as YAML scalars (`seed=1` is an int)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DatasetOptionError(f"--dataset-option {pair!r} is not KEY=VALUE (e.g. protocol=official)")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _accelerator(device: str, mixed_precision: str | None):
    from accelerate import Accelerator

    if device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(int(device.partition(":")[2]))
    return Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision)


def run(args: argparse.Namespace) -> int:
    from ..data import DatasetLayoutError, load_anomaly_dataset
    from ..evaluation import evaluate_model, load_model_and_processor
    from ..evaluation.runner import describe_no_mask

    options = parse_options(args.dataset_option)
    accelerator = _accelerator(args.device, args.mixed_precision)
    model, processor = load_model_and_processor(args.model)
    model.to(accelerator.device)
    try:
        with accelerator.main_process_first():  # one process builds the datasets cache, the others read it
            dataset = load_anomaly_dataset(
                args.dataset, args.data_dir, args.split, args.categories, cache_dir=args.cache_dir, **options
            )
    except (DatasetLayoutError, FileNotFoundError, ValueError, TypeError) as error:
        raise _as_user_error(error) from error
    import warnings

    settings = {
        "batch_size": args.batch_size,
        "accelerator": accelerator,
        "dataset_name": dataset.info.dataset_name,
        "aupro_method": args.aupro,
        "num_thresholds": args.num_thresholds,
        "fpr_limit": args.fpr_limit,
        "num_figure_samples": args.figures,
        "figure_value_range": tuple(args.figure_range) if args.figure_range else None,
        "num_workers": args.num_workers,
        "metric_workers": args.metric_workers,
        "storage_dir": args.storage_dir,
        "progress": not args.quiet,
    }
    if args.few_shot:  # per-category reference banks drawn from the train split (visualad_hf/few_shot_evaluation.py)
        references = load_anomaly_dataset(
            args.dataset, args.data_dir, args.reference_split, args.categories, cache_dir=args.cache_dir, **options
        )
        return _few_shot(args, model, processor, dataset, references, accelerator, settings)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*have no ground-truth mask.*")  # printed below, once
        result = evaluate_model(model, processor, dataset, **settings)
    result.info["model"] = args.model
    if accelerator.is_main_process:
        _report(result, args.output, describe_no_mask)
    accelerator.wait_for_everyone()
    return 1 if result.failures else 0


def _few_shot(args, model, processor, dataset, references, accelerator, settings) -> int:
    """`--few-shot K --seed S...`: one table per seed and the mean ± std, written under `--output`."""
    from ..few_shot_evaluation import evaluate_few_shot_seeds
    from ..hub import write_json

    summary = evaluate_few_shot_seeds(
        model, processor, dataset, references, num_shots=args.few_shot, seeds=args.seed, **settings
    )
    output = Path(args.output) if args.output is not None and accelerator.is_main_process else None
    failures = 0
    for seed, result in zip(summary.seeds, summary.results):
        accelerator.print(
            f"\n{result.info.get('dataset')}: {args.few_shot}-shot, seed {seed}, {result.info['num_images']} images"
        )
        accelerator.print(result.format_table())
        failures += len(result.failures)
        if output is not None:
            result.save(output / f"seed_{seed}")
    accelerator.print("\n" + summary.format_table())
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / "few_shot.json", summary.to_dict())
        accelerator.print(f"Results in {output}/ (few_shot.json; seed_<S>/ per seed)")
    if failures:
        print(f"{failures} image(s) could not be read and were left out.", file=sys.stderr)
    return 1 if failures else 0


def _as_user_error(error: Exception) -> VisualADError:
    """The loaders' FileNotFoundError/ValueError/TypeError messages already say what to do: print them as one."""
    return error if isinstance(error, VisualADError) else VisualADError(str(error))


def _report(result, output: str | None, describe_no_mask) -> None:
    from ..data import display_name

    name = result.info["dataset"]
    title = display_name(name) if name else "dataset"
    print(f"\n{title} — {result.info['num_images']} images, {result.info['seconds']:.1f} s")
    print(result.format_table())
    if output is not None:
        result.save(output)
        print(f"Results in {output}/ (metrics.json, metrics.csv, metrics.md, scores.csv, figures/)")
    excluded = result.info.get("pixel_metrics_excluded") or []
    if excluded:
        print(f"warning: {describe_no_mask(excluded)}", file=sys.stderr)
    for failure in result.failures:
        print(f"error: {failure['image_path']}: {failure['error']}", file=sys.stderr)
    if result.failures:
        print(f"{len(result.failures)} image(s) could not be read and were left out.", file=sys.stderr)


__all__ = ["add_arguments", "parse_options", "run"]
