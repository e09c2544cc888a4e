"""The evaluation runner (SPEC §7): a model and a benchmark in, an `EvaluationResult` out.

Each image goes through the image processor (resize to the model's input size), the model and
`post_process_anomaly_detection` (Gaussian smoothing, top-k mean score) with the model config's settings, as the
pipeline does. Pixel metrics compare the smoothed maps at input size with the masks resized by the processor
(bilinear, > 0.5). Anomaly-only datasets report pixel metrics only; datasets without masks image metrics only;
anomalous images without a mask are left out of the pixel metrics (with a warning that lists them).

Several processes: the dataset is cut into contiguous runs of whole batches, one per process, so every batch is the
one a single process would build; the metric states are gathered with `accelerate.utils.gather_object`, the main
process computes the metrics and `broadcast_object_list` shares the result, so the numbers equal a single-process
run's on every process.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..inference.loading import ModelLoadError  # one error type for every model mistake
from ..metrics import AnomalyMetrics
from ..metrics.functional import DEFAULT_FPR_LIMIT, DEFAULT_NUM_THRESHOLDS
from .figures import DEFAULT_FIGURE_SAMPLES, FigureCollector, pick_samples, render_category_figure
from .result import EvaluationResult
from .rows import EvaluationCollator, EvaluationDataError, dataset_flags, decode_image_cell, undecoded

MAX_LISTED = 20  # file names a warning lists before it says "(+N more)"

CategoryHook = Callable[[str], None]
"""Called with a category's name before the first of its images is scored (e.g. to set few-shot references)."""


@dataclass(frozen=True)
class RunSettings:
    """What every process does with its shard (the same on all of them)."""

    image_metrics: bool
    pixel_metrics: bool
    figure_samples: int = DEFAULT_FIGURE_SAMPLES
    progress: bool = True
    before_category: CategoryHook | None = None


@dataclass
class ShardState:
    """What one process collected: metric state, per-image rows, failures, figure tiles, images left out of the
    pixel metrics. Picklable, so that the main process can gather it."""

    metrics: AnomalyMetrics
    per_image: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    figures: FigureCollector | None = None
    no_mask: list[str] = field(default_factory=list)


@dataclass
class _Shard:
    model: Any
    processor: Any
    loader: torch.utils.data.DataLoader
    first_row: int
    accelerator: Any = None


def evaluate_model(
    model,
    image_processor=None,
    dataset=None,
    *,
    batch_size: int = 8,
    accelerator=None,
    dataset_name: str | None = None,
    image_metrics: bool | None = None,
    pixel_metrics: bool | None = None,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    aupro_method: str = "exact",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
    num_figure_samples: int = DEFAULT_FIGURE_SAMPLES,
    figure_value_range: tuple[float, float] | None = None,
    num_workers: int = 0,
    metric_workers: int = 1,
    storage_dir: str | os.PathLike | None = None,
    progress: bool = True,
    before_category: CategoryHook | None = None,
) -> EvaluationResult:
    """Run SPEC §7 on `dataset` (rows with `image`, `mask`, `label`, `category`, ...; see
    `visualad_hf.data.load_anomaly_dataset`) and return per-category metrics, their mean and per-image scores.

    Args:
        model: a `VisualADModel` (possibly wrapped by `accelerator.prepare`); evaluated in eval mode, with its
            training mode restored afterwards.
        image_processor: defaults to `VisualADImageProcessor.from_model_config(model.config)`. Smoothing and top-k
            always use the model config's values, as the pipeline does.
        dataset: a `datasets.Dataset`.
        batch_size: images per forward pass.
        accelerator: an `accelerate.Accelerator`; with several processes each evaluates a contiguous run of
            batches and the result (identical to one process's) is returned on every process.
        dataset_name: registry name for the dataset's flags (default `dataset.info.dataset_name`).
        image_metrics, pixel_metrics: force the metric families on or off (default: from the dataset's flags:
            anomaly-only datasets get no image metrics, datasets without masks no pixel metrics).
        fpr_limit, aupro_method, num_thresholds: AUPRO settings (see `visualad_hf.metrics.aupro`).
        num_figure_samples: samples per category in the figure grids (0: no figures).
        figure_value_range: the score range of the figures' colour scale (default: the lowest to the highest map
            value of the whole run, so one colour means one score in every figure).
        num_workers: data-loader worker processes.
        metric_workers: threads computing categories' metrics in parallel on the main process.
        storage_dir: spill pixel data to `.npy` files there instead of memory (a few GB for a full benchmark).
        progress: show progress bars (on the main process).
        before_category: called with a category's name before its first image is scored (each process calls it
            for the categories of its shard); batches are then split at category boundaries.
    """
    from ..image_processing_visualad import VisualADImageProcessor

    if dataset is None:
        raise TypeError("evaluate_model needs a dataset (see visualad_hf.data.load_anomaly_dataset).")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    config = unwrapped.config
    if image_processor is None:
        image_processor = VisualADImageProcessor.from_model_config(config)
    flags = dataset_flags(dataset, dataset_name)
    settings = RunSettings(
        image_metrics=flags["image_metrics"] if image_metrics is None else image_metrics,
        pixel_metrics=flags["pixel_metrics"] if pixel_metrics is None else pixel_metrics,
        figure_samples=num_figure_samples,
        progress=progress and (accelerator is None or accelerator.is_local_main_process),
        before_category=before_category,
    )
    if not (settings.image_metrics or settings.pixel_metrics):
        raise EvaluationDataError("Both image and pixel metrics are switched off; nothing to evaluate.")
    categories = list(dict.fromkeys(dataset["category"])) if "category" in dataset.column_names else ["all"]

    start = time.perf_counter()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    rows = batch_aligned_shard(len(dataset), batch_size, rank, world)
    loader = torch.utils.data.DataLoader(
        undecoded(dataset).select(rows),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=EvaluationCollator(image_processor, return_masks=settings.pixel_metrics),
    )
    state = ShardState(
        metrics=AnomalyMetrics(
            fpr_limit=fpr_limit, aupro_method=aupro_method, num_thresholds=num_thresholds, storage_dir=storage_dir
        ),
        figures=FigureCollector(per_type=num_figure_samples) if num_figure_samples > 0 else None,
    )
    was_training = unwrapped.training
    unwrapped.eval()
    try:
        _run_shard(_Shard(unwrapped, image_processor, loader, rows.start, accelerator), settings, state)
    finally:
        unwrapped.train(was_training)

    gathered = _gather_to_main(state, accelerator)
    result = None
    if gathered is not None:
        result = _combine(gathered, dataset, categories, metric_workers, settings, figure_value_range)
        result.info.update(
            dataset=flags["dataset"],
            model=getattr(config, "name_or_path", None) or None,
            image_size=config.image_size,
            num_processes=world,
            batch_size=batch_size,
            seconds=round(time.perf_counter() - start, 3),
        )
        _warn_no_mask(result.info["pixel_metrics_excluded"])
    result = _broadcast_from_main(result, accelerator)
    state.metrics.reset()  # spilled files of this process, now that the main process has computed
    return result


def batch_aligned_shard(num_rows: int, batch_size: int, index: int, count: int) -> range:
    """Rows of process `index` of `count`: a contiguous run of whole batches of the single-process order."""
    num_batches = math.ceil(num_rows / batch_size)
    start_batch = num_batches * index // count
    stop_batch = num_batches * (index + 1) // count
    return range(min(start_batch * batch_size, num_rows), min(stop_batch * batch_size, num_rows))


def score_batch(model, processor, pixel_values: torch.Tensor, accelerator=None) -> tuple[np.ndarray, torch.Tensor]:
    """Image scores (float64) and smoothed maps at input size (float32, CPU) of one batch, as the pipeline
    computes them."""
    parameter = next(model.parameters())
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        outputs = model(pixel_values=pixel_values.to(parameter.device, parameter.dtype))
    processed = processor.post_process_anomaly_detection(
        outputs, gaussian_sigma=model.config.gaussian_sigma, topk_ratio=model.config.topk_ratio
    )
    scores = np.array([p["score"] for p in processed], dtype=np.float64)
    return scores, torch.stack([p["anomaly_map"] for p in processed]).float().cpu()


def _category_runs(categories: Sequence[str]) -> list[slice]:
    """Consecutive runs of equal categories in a batch."""
    starts = [i for i in range(len(categories)) if i == 0 or categories[i] != categories[i - 1]]
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], len(categories)])]


def _score(shard: _Shard, settings: RunSettings, batch: Mapping[str, Any], current: list[str | None]):
    """Score a batch; with a `before_category` hook, one category run at a time, calling the hook on each change
    (`current` holds the category the hook was last called for)."""
    pixel_values = batch["pixel_values"]
    if settings.before_category is None:
        return score_batch(shard.model, shard.processor, pixel_values, shard.accelerator)
    categories = batch.get("category", ["all"] * len(pixel_values))
    parts = []
    for run in _category_runs(categories):
        if categories[run.start] != current[0]:
            settings.before_category(categories[run.start])
            current[0] = categories[run.start]
        parts.append(score_batch(shard.model, shard.processor, pixel_values[run], shard.accelerator))
    return np.concatenate([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _run_shard(shard: _Shard, settings: RunSettings, state: ShardState) -> None:
    from tqdm.auto import tqdm

    offset, current = shard.first_row, [None]
    for item in tqdm(shard.loader, desc="Evaluating", unit="batch", disable=not settings.progress):
        state.failures += [{"image_path": f["image_path"], "error": f["error"]} for f in item["failures"]]
        batch = item["batch"]
        if batch is not None:
            if "labels" not in batch:
                raise EvaluationDataError("The dataset rows have no `label` (0 normal, 1 anomalous); add one.")
            scores, maps = _score(shard, settings, batch, current)
            _add_to_state(state, settings, batch, scores, maps, item, offset)
        offset += item["num_rows"]


def _add_to_state(state: ShardState, settings: RunSettings, batch, scores, maps, item, offset: int) -> None:
    """Feed one scored batch to the metrics, the per-image rows and the figure collector."""
    size = len(scores)
    labels = batch["labels"].numpy()
    rows = [
        {"image_path": path, "category": category, "defect_type": defect, "label": int(label), "score": float(score)}
        for path, category, defect, label, score in zip(
            batch.get("image_path", [""] * size), batch.get("category", ["all"] * size),
            batch.get("defect_type", [""] * size), labels, scores,
        )
    ]  # fmt: skip
    categories = [row["category"] for row in rows]
    masks = batch.get("masks") if settings.pixel_metrics else None
    truth = np.asarray(item["has_ground_truth"], dtype=bool)
    if masks is None or truth.all():
        state.metrics.add_batch(
            scores if settings.image_metrics else None, labels, maps.numpy() if masks is not None else None,
            masks.numpy() if masks is not None else None, categories=categories,
        )  # fmt: skip
    else:  # anomalous rows without a mask count in the image metrics only
        if settings.image_metrics:
            state.metrics.add_batch(scores, labels, categories=categories)
        keep = np.flatnonzero(truth)
        if keep.size:
            state.metrics.add_batch(
                None, labels[keep], maps.numpy()[keep], masks.numpy()[keep], categories=[categories[i] for i in keep]
            )
        state.no_mask += [rows[i]["image_path"] for i in np.flatnonzero(~truth)]
    state.per_image += rows
    if state.figures is not None:
        for i, (position, row) in enumerate(zip(item["positions"], rows)):
            mask = masks[i] if masks is not None and truth[i] else None
            state.figures.add(offset + position, row, row["score"], maps[i], mask)


def _gather_to_main(state: ShardState, accelerator) -> list[ShardState] | None:
    """Every process's state on the main process (in process order); None elsewhere.

    `gather_object` is an all-gather: every process receives all states for a moment. With `storage_dir` the
    pixel data stays on disk and only file names travel."""
    if accelerator is None or accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    gathered = gather_object([state])
    return gathered if accelerator.is_main_process else None


def _broadcast_from_main(result: EvaluationResult | None, accelerator) -> EvaluationResult:
    if accelerator is None or accelerator.num_processes == 1:
        return result
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([result], from_process=0)[0]


def _combine(
    states: list[ShardState],
    dataset,
    categories: list[str],
    metric_workers: int,
    settings: RunSettings,
    figure_value_range: tuple[float, float] | None,
) -> EvaluationResult:
    metrics = states[0].metrics
    for other in states[1:]:
        metrics.merge(other.metrics)
    present = [c for c in categories if c in metrics.categories]
    computed = metrics.compute(present, num_workers=metric_workers, progress=settings.progress)
    per_image = [row for state in states for row in state.per_image]
    failures = [failure for state in states for failure in state.failures]
    no_mask = [path for state in states for path in state.no_mask]
    figures, value_range = {}, None
    if settings.figure_samples > 0:
        collector = states[0].figures
        for other in states[1:]:
            collector.merge(other.figures)
        value_range = figure_value_range or collector.value_range
        images_only = undecoded(dataset.select_columns(["image"]))
        for category in present:
            picked = pick_samples([s for s in collector.samples if s.category == category], settings.figure_samples)
            if picked and value_range is not None:
                images = [decode_image_cell(images_only[s.index]["image"], "image") for s in picked]
                source = "--figure-range" if figure_value_range else "lowest..highest map value of this evaluation"
                figures[category] = render_category_figure(category, images, picked, value_range, source)
    info = {"num_images": len(per_image), "num_failures": len(failures), "pixel_metrics_excluded": no_mask}
    if value_range is not None:
        info["figure_value_range"] = [float(value_range[0]), float(value_range[1])]
    return EvaluationResult(metrics=computed, per_image=per_image, failures=failures, figures=figures, info=info)


def describe_no_mask(paths: Sequence[str]) -> str:
    """The warning for anomalous images without a mask, listing them (the first MAX_LISTED)."""
    listed = ", ".join(paths[:MAX_LISTED]) + (f" (+{len(paths) - MAX_LISTED} more)" if len(paths) > MAX_LISTED else "")
    return (
        f"{len(paths)} anomalous image(s) have no ground-truth mask and were left out of the pixel metrics (they "
        f"count in the image metrics): {listed}. Give them masks (meta.json `mask_path`) to score their pixels."
    )


def _warn_no_mask(paths: Sequence[str]) -> None:
    if paths:
        warnings.warn(describe_no_mask(paths), UserWarning, stacklevel=3)


def evaluate_benchmark(
    model,
    image_processor,
    name: str,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    categories: str | Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    **kwargs,
) -> EvaluationResult:
    """`load_anomaly_dataset(name, data_dir, split, categories)` then `evaluate_model` (kwargs go to it)."""
    from ..data import load_anomaly_dataset

    dataset = load_anomaly_dataset(name, data_dir, split, categories, cache_dir=cache_dir, **(dataset_options or {}))
    return evaluate_model(model, image_processor, dataset, dataset_name=dataset.info.dataset_name, **kwargs)


def load_model_and_processor(model_id: str):
    """A `VisualADModel` (eval mode, CPU, fp32) and its image processor: `visualad_hf.inference`'s one model loader,
    whose mistakes (a missing path, a folder without `config.json`, another model type, a Hub id while offline) are
    `ModelLoadError`s with one line saying what to pass instead."""
    from ..inference import load_model_for_inference

    loaded = load_model_for_inference(model_id, device="cpu")
    return loaded.model, loaded.image_processor


__all__ = [
    "CategoryHook",
    "ModelLoadError",
    "RunSettings",
    "ShardState",
    "batch_aligned_shard",
    "describe_no_mask",
    "evaluate_benchmark",
    "evaluate_model",
    "load_model_and_processor",
    "score_batch",
]
