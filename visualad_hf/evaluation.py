"""Benchmark evaluation (SPEC §7) and the `visualad evaluate` command.

```python
from visualad_hf.evaluation import evaluate_model
from visualad_hf.data import load_anomaly_dataset

dataset = load_anomaly_dataset("mvtec", "/data/mvtec_anomaly_detection")
result = evaluate_model(model, None, dataset, batch_size=8)     # image processor from the model config
print(result)                     # per-category table + Mean, x100, one decimal (the paper's layout)
result.mean["pixel_aupro"]        # fractions in [0, 1]
result.save("eval/mvtec")         # metrics.json/.csv/.md, scores.csv, figures/<category>.png
```

```bash
visualad evaluate --model M --dataset mvtec --data-dir /data/mvtec_anomaly_detection --out eval/mvtec
accelerate launch training/evaluate.py --model M --dataset visa --data-dir /data/visa --out eval/visa   # N processes
```

Protocol: each image goes through the image processor (resize to the model's input size), the model, and
`post_process_anomaly_detection` (Gaussian smoothing, top-k mean score) with the model config's settings, as the
pipeline does. Pixel metrics compare the smoothed maps at input size with the masks resized by the processor
(bilinear, > 0.5). Anomaly-only datasets report pixel metrics only; datasets without masks report image metrics only.

Several processes: the dataset is cut into contiguous runs of whole batches, one per process, so every batch is the
one a single process would build; the metric states are gathered on the main process (which computes the metrics
and shares the result), so the numbers equal a single-process run's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .metrics import AnomalyMetrics, AnomalyMetricsResult
from .metrics.functional import DEFAULT_FPR_LIMIT, DEFAULT_NUM_THRESHOLDS

FIGURE_TILE_SIZE = 192
DEFAULT_FIGURE_SAMPLES = 6


# ------------------------------------------------------------------------------------------------------- result
@dataclass
class EvaluationResult:
    """What `evaluate_model` measured: metrics per category and their mean, per-image scores, failures, figures.

    Metric values are fractions in [0, 1] (None where undefined); tables show them ×100 with one decimal.
    `failures` lists images that could not be read (`image_path`, `error`); they are left out of the metrics.
    """

    metrics: AnomalyMetricsResult
    per_image: list[dict[str, Any]]
    failures: list[dict[str, str]] = field(default_factory=list)
    figures: dict[str, Image.Image] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def per_category(self) -> dict[str, dict[str, float | None]]:
        return self.metrics.per_category

    @property
    def mean(self) -> dict[str, float | None]:
        return self.metrics.mean

    def flat_metrics(self, prefix: str = "") -> dict[str, float]:
        """`{prefix}{metric}` for the means and `{prefix}{category}/{metric}` per category, defined values only
        (for loggers such as TensorBoard)."""
        flat = {f"{prefix}{name}": value for name, value in self.mean.items() if value is not None}
        for category, values in self.per_category.items():
            flat.update({f"{prefix}{category}/{n}": v for n, v in values.items() if v is not None})
        return flat

    def to_dict(self) -> dict[str, Any]:
        metrics = self.metrics.to_dict()
        return {
            **self.info,
            "per_category": metrics["per_category"],
            "mean": metrics["mean"],
            "num_images_per_category": metrics["num_images"],
            "settings": metrics["settings"],
            "failures": self.failures,
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        return self.metrics.to_csv(path)

    def to_markdown(self, path: str | os.PathLike | None = None) -> str:
        return self.metrics.to_markdown(path)

    def format_table(self) -> str:
        return self.metrics.format_table()

    def __str__(self) -> str:
        return self.format_table()

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write `metrics.json`, `metrics.csv`, `metrics.md`, `scores.csv` and `figures/<category>.png`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "metrics.json", "csv": out / "metrics.csv", "markdown": out / "metrics.md"}
        self.to_json(paths["json"])
        self.to_csv(paths["csv"])
        self.to_markdown(paths["markdown"])
        paths["scores"] = out / "scores.csv"
        _write_scores(paths["scores"], self.per_image)
        if self.figures:
            (out / "figures").mkdir(exist_ok=True)
            for category, figure in self.figures.items():
                paths[f"figure:{category}"] = out / "figures" / f"{_safe_name(category)}.png"
                figure.save(paths[f"figure:{category}"])
        return paths


def _write_scores(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image_path", "category", "defect_type", "label", "score"])
        writer.writeheader()
        writer.writerows(rows)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "category"


# ------------------------------------------------------------------------------------------------ data handling
class EvaluationCollator:
    """Decodes dataset rows and collates them with `VisualADCollator`, setting aside rows that cannot be read.

    Image columns are read undecoded (`datasets.Image(decode=False)`) so that a corrupt file becomes a reported
    failure instead of an exception inside the data loader. Returns `batch` (or None), the `positions` of the rows
    kept, `num_rows` and `failures`.
    """

    def __init__(self, image_processor, *, return_masks: bool):
        from .data.collator import VisualADCollator

        self.collator = VisualADCollator(image_processor, return_masks=return_masks)
        self.return_masks = return_masks

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        decoded, failures = [], []
        for position, row in enumerate(rows):
            try:
                decoded.append((position, self._decode_row(row)))
            except (OSError, ValueError, SyntaxError) as error:
                failures.append(_failure(row, position, error))
        try:
            batch = self.collator([row for _, row in decoded]) if decoded else None
        except (OSError, ValueError) as error:  # find the culprit(s), keep the rest
            kept = []
            for position, row in decoded:
                try:
                    self.collator([row])
                    kept.append((position, row))
                except (OSError, ValueError) as row_error:
                    failures.append(_failure(row, position, row_error))
            if len(kept) == len(decoded):  # the batch as a whole is the problem (e.g. sizes): re-raise
                raise error
            decoded = kept
            batch = self.collator([row for _, row in decoded]) if decoded else None
        return {
            "batch": batch,
            "positions": [position for position, _ in decoded],
            "num_rows": len(rows),
            "failures": failures,
        }

    def _decode_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        name = str(row.get("image_path", "image"))
        out = dict(row)
        out["image"] = decode_image_cell(row["image"], name)
        if "mask" in row:
            out["mask"] = decode_image_cell(row["mask"], f"mask of {name}") if self.return_masks else None
        return out


def decode_image_cell(cell: Any, name: str) -> Any:
    """A `datasets` image cell (decoded or `{"bytes", "path"}`) as a PIL image; None stays None."""
    from .image_processing_visualad import ImageLoadError, load_image

    if cell is None or isinstance(cell, (Image.Image, np.ndarray, torch.Tensor)):
        return cell
    if isinstance(cell, (str, os.PathLike)):
        return load_image(cell)
    if isinstance(cell, Mapping):
        if cell.get("bytes"):
            try:
                image = Image.open(io.BytesIO(cell["bytes"]))
                image.load()
            except (OSError, SyntaxError, ValueError) as error:
                raise ImageLoadError(cell.get("path") or name, f"cannot decode embedded bytes ({error})") from error
            return load_image(image)
        if cell.get("path"):
            return load_image(cell["path"])
        return None
    raise TypeError(f"{name}: unsupported image cell of type {type(cell).__name__}.")


def _failure(row: Mapping[str, Any], position: int, error: Exception) -> dict[str, Any]:
    return {"image_path": str(row.get("image_path", f"row {position}")), "error": str(error), "position": position}


def _undecoded(dataset):
    """The dataset with its image columns left as file references (decoded by `EvaluationCollator`)."""
    import datasets

    for column in ("image", "mask"):
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def dataset_flags(dataset, dataset_name: str | None = None) -> dict[str, Any]:
    """Which metric families apply: `image_metrics` (False for datasets the registry flags anomaly-only) and
    `pixel_metrics` (False when the registry says the dataset has no masks, or no row has one). `dataset_name`
    defaults to `dataset.info.dataset_name`, which `load_anomaly_dataset` sets."""
    from .data import DATASETS

    name = dataset_name or getattr(dataset.info, "dataset_name", None)
    if "label" not in dataset.column_names:
        raise ValueError(f"The dataset has no `label` column (columns: {dataset.column_names}); 0 normal, 1 anomalous.")
    spec = DATASETS.get(name)
    has_masks = (spec is None or spec.has_masks) and "mask" in dataset.column_names and any(
        cell is not None for cell in _undecoded(dataset.select_columns(["mask"]))["mask"]
    )
    return {"dataset": name, "image_metrics": spec is None or not spec.anomaly_only, "pixel_metrics": has_masks}


def _batch_aligned_shard(num_rows: int, batch_size: int, index: int, count: int) -> range:
    """Rows of process `index` of `count`: a contiguous run of whole batches of the single-process order."""
    num_batches = math.ceil(num_rows / batch_size)
    start_batch = num_batches * index // count
    stop_batch = num_batches * (index + 1) // count
    return range(min(start_batch * batch_size, num_rows), min(stop_batch * batch_size, num_rows))


# ---------------------------------------------------------------------------------------------------- figures
@dataclass
class _FigureSample:
    index: int
    category: str
    defect_type: str
    label: int
    score: float
    anomaly_map: np.ndarray  # [t, t] float32
    mask: np.ndarray | None  # [t, t] bool


class _FigureCollector:
    """Keeps the first `per_type` samples of each (category, defect type), as small tiles."""

    def __init__(self, per_type: int, tile: int = FIGURE_TILE_SIZE):
        self.per_type = per_type
        self.tile = tile
        self.samples: list[_FigureSample] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.ranges: dict[str, tuple[float, float]] = {}

    def add(self, index, category, defect_type, label, score, anomaly_map: torch.Tensor, mask: torch.Tensor | None):
        low, high = float(anomaly_map.min()), float(anomaly_map.max())
        old = self.ranges.get(category, (low, high))
        self.ranges[category] = (min(old[0], low), max(old[1], high))
        key = (category, defect_type)
        if self.counts.get(key, 0) >= self.per_type:
            return
        self.counts[key] = self.counts.get(key, 0) + 1
        size = (self.tile, self.tile)
        resize = torch.nn.functional.interpolate
        small_map = resize(anomaly_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
        small_mask = None
        if mask is not None:
            small_mask = (resize(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5).numpy()
        self.samples.append(_FigureSample(index, category, defect_type, label, score, small_map.numpy(), small_mask))

    def merge(self, other: _FigureCollector) -> None:
        self.samples += other.samples
        for category, (low, high) in other.ranges.items():
            old = self.ranges.get(category, (low, high))
            self.ranges[category] = (min(old[0], low), max(old[1], high))


def _pick_samples(samples: list[_FigureSample], count: int) -> list[_FigureSample]:
    """Up to `count` samples: anomalous ones first, one defect type after another, then normal ones."""
    by_type: dict[str, list[_FigureSample]] = {}
    for sample in sorted(samples, key=lambda s: s.index):
        if sample.label == 1:
            by_type.setdefault(sample.defect_type, []).append(sample)
    picked: list[_FigureSample] = []
    while len(picked) < count and any(by_type.values()):
        for queue in by_type.values():
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    normal = [s for s in sorted(samples, key=lambda s: s.index) if s.label != 1]
    picked += normal[: count - len(picked)]
    return sorted(picked, key=lambda s: s.index)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def render_category_figure(
    category: str,
    images: Sequence[Image.Image],
    samples: Sequence[_FigureSample],
    value_range: tuple[float, float],
) -> Image.Image:
    """A grid like the paper's appendix figures: a column per sample, rows image / ground truth / anomaly map."""
    from .visualization import overlay_heatmap

    tile, gap, label_width = FIGURE_TILE_SIZE, 6, 120
    title_height, caption_height = 30, 20
    columns = len(samples)
    width = label_width + columns * (tile + gap) + gap
    height = title_height + caption_height + 3 * (tile + gap) + gap
    figure = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    draw.text((gap, 6), category, fill=(0, 0, 0), font=_font(18))
    small = _font(12)
    for row, label in enumerate(("image", "ground truth", "anomaly map")):
        top = title_height + caption_height + row * (tile + gap)
        draw.text((gap, top + tile // 2 - 6), label, fill=(40, 40, 40), font=small)
    for column, (image, sample) in enumerate(zip(images, samples)):
        left = label_width + column * (tile + gap)
        caption = f"{sample.defect_type}  {sample.score:.3f}"
        draw.text((left, title_height), caption[:30], fill=(40, 40, 40), font=small)
        rgb = image.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)
        top = title_height + caption_height
        figure.paste(rgb, (left, top))
        mask = sample.mask if sample.mask is not None else np.zeros((tile, tile), bool)
        figure.paste(Image.fromarray(mask.astype(np.uint8) * 255, mode="L").convert("RGB"), (left, top + tile + gap))
        overlay = overlay_heatmap(rgb, sample.anomaly_map, alpha=0.5, value_range=value_range)
        figure.paste(overlay, (left, top + 2 * (tile + gap)))
    return figure


# --------------------------------------------------------------------------------------------------- the runner
@dataclass
class _ShardState:
    metrics: AnomalyMetrics
    per_image: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    figures: _FigureCollector | None


def _gather_to_main(state: _ShardState, accelerator) -> list[_ShardState] | None:
    """Every process's state on the main process (in process order); None elsewhere."""
    if accelerator is None or accelerator.num_processes == 1:
        return [state]
    import torch.distributed as dist

    gathered = [None] * accelerator.num_processes if accelerator.is_main_process else None
    dist.gather_object(state, gathered, dst=0)
    return gathered


def _broadcast_from_main(result: EvaluationResult | None, accelerator) -> EvaluationResult:
    if accelerator is None or accelerator.num_processes == 1:
        return result
    import torch.distributed as dist

    holder = [result]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


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
    num_workers: int = 0,
    metric_workers: int = 1,
    storage_dir: str | os.PathLike | None = None,
    progress: bool = True,
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
        num_workers: data-loader worker processes.
        metric_workers: threads computing categories' metrics in parallel on the main process.
        storage_dir: spill pixel data to `.npy` files there instead of memory (a few GB for a full benchmark).
        progress: show progress bars (on the main process).
    """
    from .image_processing_visualad import VisualADImageProcessor

    if dataset is None:
        raise TypeError("evaluate_model needs a dataset (see visualad_hf.data.load_anomaly_dataset).")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    config = unwrapped.config
    if image_processor is None:
        image_processor = VisualADImageProcessor.from_model_config(config)
    flags = dataset_flags(dataset, dataset_name)
    use_image = flags["image_metrics"] if image_metrics is None else image_metrics
    use_pixel = flags["pixel_metrics"] if pixel_metrics is None else pixel_metrics
    if not (use_image or use_pixel):
        raise ValueError("Both image and pixel metrics are switched off; nothing to evaluate.")
    categories = list(dict.fromkeys(dataset["category"])) if "category" in dataset.column_names else ["all"]

    start = time.perf_counter()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    rows = _batch_aligned_shard(len(dataset), batch_size, rank, world)
    shard = _undecoded(dataset).select(rows)
    loader = torch.utils.data.DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=EvaluationCollator(image_processor, return_masks=use_pixel),
    )
    parameter = next(unwrapped.parameters())
    device, dtype = parameter.device, parameter.dtype
    state = _ShardState(
        metrics=AnomalyMetrics(
            fpr_limit=fpr_limit, aupro_method=aupro_method, num_thresholds=num_thresholds, storage_dir=storage_dir
        ),
        per_image=[],
        failures=[],
        figures=_FigureCollector(per_type=num_figure_samples) if num_figure_samples > 0 else None,
    )
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    was_training = unwrapped.training
    unwrapped.eval()
    try:
        _run_shard(
            unwrapped, image_processor, loader, rows.start, state, (device, dtype), accelerator, use_image, use_pixel,
            show,
        )
    finally:
        unwrapped.train(was_training)

    gathered = _gather_to_main(state, accelerator)
    result = None
    if gathered is not None:
        result = _combine(gathered, dataset, categories, metric_workers, num_figure_samples, show)
        result.info.update(
            dataset=flags["dataset"],
            model=getattr(config, "name_or_path", None) or None,
            image_size=config.image_size,
            num_processes=world,
            batch_size=batch_size,
            seconds=round(time.perf_counter() - start, 3),
        )
    result = _broadcast_from_main(result, accelerator)
    state.metrics.reset()  # spilled files of this process, now that the main process has computed
    return result


def _run_shard(model, processor, loader, offset, state, placement, accelerator, use_image, use_pixel, show) -> None:
    from tqdm.auto import tqdm

    config = model.config
    for item in tqdm(loader, desc="Evaluating", unit="batch", disable=not show):
        for failure in item["failures"]:
            state.failures.append({"image_path": failure["image_path"], "error": failure["error"]})
        batch = item["batch"]
        if batch is not None:
            autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
            with torch.inference_mode(), autocast:
                outputs = model(pixel_values=batch["pixel_values"].to(*placement))
            processed = processor.post_process_anomaly_detection(
                outputs, gaussian_sigma=config.gaussian_sigma, topk_ratio=config.topk_ratio
            )
            scores = np.array([p["score"] for p in processed], dtype=np.float64)
            maps = torch.stack([p["anomaly_map"] for p in processed]).float().cpu()
            if "labels" not in batch:
                raise ValueError("The dataset rows have no `label` (0 normal, 1 anomalous); evaluation needs one.")
            labels = batch["labels"].numpy()
            categories = batch.get("category", ["all"] * len(scores))
            masks = batch.get("masks")
            state.metrics.add_batch(
                scores if use_image else None,
                labels,
                maps.numpy() if use_pixel else None,
                masks.numpy() if use_pixel else None,
                categories=list(categories),
            )
            defect_types = batch.get("defect_type", [""] * len(scores))
            paths = batch.get("image_path", [""] * len(scores))
            for i, position in enumerate(item["positions"]):
                row = {
                    "image_path": paths[i],
                    "category": categories[i],
                    "defect_type": defect_types[i],
                    "label": int(labels[i]),
                    "score": float(scores[i]),
                }
                state.per_image.append(row)
                if state.figures is not None:
                    state.figures.add(
                        offset + position, categories[i], defect_types[i], int(labels[i]), float(scores[i]),
                        maps[i], masks[i] if masks is not None else None,
                    )
        offset += item["num_rows"]


def _combine(states, dataset, categories, metric_workers, num_figure_samples, show) -> EvaluationResult:
    metrics = states[0].metrics
    for other in states[1:]:
        metrics.merge(other.metrics)
    present = [c for c in categories if c in metrics.categories]
    computed = metrics.compute(present, num_workers=metric_workers, progress=show)
    per_image = [row for state in states for row in state.per_image]
    failures = [failure for state in states for failure in state.failures]
    figures: dict[str, Image.Image] = {}
    if num_figure_samples > 0:
        collector = states[0].figures
        for other in states[1:]:
            collector.merge(other.figures)
        images_only = _undecoded(dataset.select_columns(["image"]))
        for category in present:
            picked = _pick_samples([s for s in collector.samples if s.category == category], num_figure_samples)
            if picked:
                images = [decode_image_cell(images_only[s.index]["image"], "image") for s in picked]
                figures[category] = render_category_figure(category, images, picked, collector.ranges[category])
    return EvaluationResult(
        metrics=computed,
        per_image=per_image,
        failures=failures,
        figures=figures,
        info={"num_images": len(per_image), "num_failures": len(failures)},
    )


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
    from .data import load_anomaly_dataset

    dataset = load_anomaly_dataset(name, data_dir, split, categories, cache_dir=cache_dir, **(dataset_options or {}))
    return evaluate_model(model, image_processor, dataset, dataset_name=dataset.info.dataset_name, **kwargs)


# ------------------------------------------------------------------------------------------------------- the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="VisualAD model folder or Hub id")
    parser.add_argument("--dataset", required=True, help="benchmark name (mvtec, visa, ..., folder); see the README")
    parser.add_argument("--data-dir", required=True, help="the benchmark's root folder")
    parser.add_argument("--categories", nargs="+", default=None, help="evaluate only these categories")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, default=None, help="write metrics.{json,csv,md}, scores.csv, figures/ here")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--aupro", choices=("exact", "classic"), default="exact",
        help="exact: every distinct threshold (default); classic: --num-thresholds evenly spaced (AnomalyCLIP-style)",
    )
    parser.add_argument("--num-thresholds", type=int, default=DEFAULT_NUM_THRESHOLDS)
    parser.add_argument("--fpr-limit", type=float, default=DEFAULT_FPR_LIMIT)
    parser.add_argument(
        "--figures", type=int, default=DEFAULT_FIGURE_SAMPLES, help="samples per category figure (0: none)"
    )
    parser.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--metric-workers", type=int, default=2, help="threads computing the metrics")
    parser.add_argument("--storage-dir", type=Path, default=None, help="spill pixel data here instead of memory")
    parser.add_argument("--cache-dir", type=Path, default=None, help="datasets cache folder")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None)
    parser.add_argument(
        "--dataset-option", action="append", default=[], metavar="KEY=VALUE",
        help="loader option, e.g. protocol=official for ksdd2 (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from .few_shot_evaluation import add_few_shot_arguments

    add_few_shot_arguments(parser)  # --few-shot K --seed S...


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--dataset-option {pair!r} is not KEY=VALUE.")
        options[key.strip()] = yaml.safe_load(value)
    return options


def load_model_and_processor(model_id: str):
    """A `VisualADModel` and its image processor (the saved one, else one built from the model config)."""
    from .image_processing_visualad import VisualADImageProcessor
    from .modeling_visualad import VisualADModel

    model = VisualADModel.from_pretrained(model_id)
    try:
        processor = VisualADImageProcessor.from_pretrained(model_id)
    except OSError:
        processor = VisualADImageProcessor.from_model_config(model.config)
    return model, processor


def run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    say = accelerator.print
    try:
        options = _parse_options(args.dataset_option)
    except ValueError as error:
        say(f"error: {error}", file=sys.stderr)
        return 2
    model, processor = load_model_and_processor(args.model)
    model.to(accelerator.device)
    from .data import DatasetLayoutError, load_anomaly_dataset

    try:
        with accelerator.main_process_first():  # one process builds the datasets cache, the others read it
            dataset = load_anomaly_dataset(
                args.dataset, args.data_dir, args.split, args.categories, cache_dir=args.cache_dir, **options
            )
    except (DatasetLayoutError, FileNotFoundError, ValueError, TypeError) as error:
        say(f"error: {error}", file=sys.stderr)
        return 2
    if args.few_shot:  # per-category reference banks from the train split (visualad_hf/few_shot_evaluation.py)
        from .few_shot_evaluation import run_few_shot_evaluation

        def load_split(split):
            return load_anomaly_dataset(args.dataset, args.data_dir, split, args.categories, cache_dir=args.cache_dir,
                                        **options)  # fmt: skip

        return run_few_shot_evaluation(
            args, model, processor, dataset, load_split, say, batch_size=args.batch_size, accelerator=accelerator,
            dataset_name=dataset.info.dataset_name, aupro_method=args.aupro, num_thresholds=args.num_thresholds,
            fpr_limit=args.fpr_limit, num_figure_samples=args.figures, num_workers=args.num_workers,
            metric_workers=args.metric_workers, storage_dir=args.storage_dir, progress=not args.quiet,
        )
    result = evaluate_model(
        model,
        processor,
        dataset,
        batch_size=args.batch_size,
        accelerator=accelerator,
        dataset_name=dataset.info.dataset_name,
        aupro_method=args.aupro,
        num_thresholds=args.num_thresholds,
        fpr_limit=args.fpr_limit,
        num_figure_samples=args.figures,
        num_workers=args.num_workers,
        metric_workers=args.metric_workers,
        storage_dir=args.storage_dir,
        progress=not args.quiet,
    )
    result.info["model"] = args.model
    if accelerator.is_main_process:
        print(f"\n{result.info['dataset']} — {result.info['num_images']} images, {result.info['seconds']:.1f} s")
        print(result.format_table())
        if args.out is not None:
            result.save(args.out)
            print(f"Results in {args.out}/ (metrics.json, metrics.csv, metrics.md, scores.csv, figures/)")
        for failure in result.failures:
            print(f"error: {failure['image_path']}: {failure['error']}", file=sys.stderr)
        if result.failures:
            print(f"{len(result.failures)} image(s) could not be read and were left out.", file=sys.stderr)
    accelerator.wait_for_everyone()
    return 1 if result.failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_command

    return run_command("evaluate", argv, prog="training/evaluate.py")


__all__ = [
    "EvaluationCollator",
    "EvaluationResult",
    "add_arguments",
    "dataset_flags",
    "evaluate_benchmark",
    "evaluate_model",
    "load_model_and_processor",
    "main",
    "render_category_figure",
    "run",
]
