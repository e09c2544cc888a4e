"""Streaming, mergeable accumulation of a benchmark's scores and maps, with per-category results.

`AnomalyMetrics.add_batch` reduces each batch at once to what the exact metrics need: image scores and labels, the
normal-pixel scores, and the anomalous-pixel scores with the size of their ground-truth region. That is 4 bytes per
pixel (float32) instead of a float map plus a mask, and the parts can be spilled to `.npy` files (`storage_dir=`) so
that only one category is in memory at a time while `compute` sorts it. States from several processes `merge`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .functional import (
    DEFAULT_FPR_LIMIT,
    DEFAULT_NUM_THRESHOLDS,
    PIXEL_DTYPE,
    AuproMethod,
    RankedScores,
    _check_fpr_limit,
    _check_labels,
    _check_scores,
    binarize_masks,
    binary_metrics,
    ranked_pixel_metrics,
    split_pixel_scores,
    to_numpy,
)

IMAGE_METRICS: tuple[str, ...] = ("image_auroc", "image_f1_max", "image_ap")
PIXEL_METRICS: tuple[str, ...] = ("pixel_auroc", "pixel_f1_max", "pixel_ap", "pixel_aupro")
METRIC_NAMES: tuple[str, ...] = IMAGE_METRICS + PIXEL_METRICS
METRIC_HEADERS: dict[str, str] = {
    "image_auroc": "I-AUROC",
    "image_f1_max": "I-F1max",
    "image_ap": "I-AP",
    "pixel_auroc": "P-AUROC",
    "pixel_f1_max": "P-F1max",
    "pixel_ap": "P-AP",
    "pixel_aupro": "P-AUPRO",
}
DEFAULT_CATEGORY = "all"


class _Chunks:
    """Arrays appended one by one, held in memory or saved as `.npy` files under `directory`."""

    def __init__(self, dtype: np.dtype, directory: Path | None = None):
        self.dtype = np.dtype(dtype)
        self.directory = directory
        self.items: list[np.ndarray | str] = []
        self.size = 0

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.size == 0:
            return
        self.size += array.size
        if self.directory is None:
            self.items.append(array)
            return
        path = self.directory / f"{uuid.uuid4().hex}.npy"
        np.save(path, array)
        self.items.append(str(path))

    def extend_copy(self, other: _Chunks) -> None:
        """Append copies of `other`'s arrays: in memory, or as files in this object's own folder, so that later
        changes to `other` (or the deletion of its folder) leave this one intact."""
        for item in list(other.items):
            if isinstance(item, str):
                self.append(np.load(item))  # a fresh array (or a file of this object's own)
            else:
                self.append(item if self.directory is not None else item.copy())

    def concatenate(self) -> np.ndarray:
        arrays = [item if isinstance(item, np.ndarray) else np.load(item) for item in self.items]
        if not arrays:
            return np.zeros(0, self.dtype)
        return np.concatenate(arrays) if len(arrays) > 1 else arrays[0].copy()


@dataclass
class _CategoryState:
    image_scores: _Chunks
    image_labels: _Chunks
    negatives: _Chunks
    positives: _Chunks
    region_sizes: _Chunks
    num_regions: int = 0
    num_maps: int = 0

    @classmethod
    def empty(cls, directory: Path | None) -> _CategoryState:
        return cls(
            image_scores=_Chunks(np.float64),
            image_labels=_Chunks(np.int8),
            negatives=_Chunks(PIXEL_DTYPE, directory),
            positives=_Chunks(PIXEL_DTYPE, directory),
            region_sizes=_Chunks(np.int32, directory),
        )

    def merge(self, other: _CategoryState) -> None:
        for name in ("image_scores", "image_labels", "negatives", "positives", "region_sizes"):
            getattr(self, name).extend_copy(getattr(other, name))
        self.num_regions += other.num_regions
        self.num_maps += other.num_maps

    @property
    def num_images(self) -> int:
        return max(self.image_scores.size, self.num_maps)


@dataclass
class AnomalyMetricsResult:
    """Per-category metrics (fractions in [0, 1]; None where undefined) and their mean over categories.

    The mean of a metric skips categories where it is undefined (e.g. image metrics of a category without normal
    images). Tables show the metrics ×100 with one decimal, as in the paper.
    """

    per_category: dict[str, dict[str, float | None]]
    mean: dict[str, float | None]
    num_images: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def metric_names(self) -> list[str]:
        """Metrics defined for at least one category, in the paper's column order."""
        return [name for name in METRIC_NAMES if self.mean.get(name) is not None]

    def rows(self) -> list[tuple[str, dict[str, float | None]]]:
        return [*self.per_category.items(), ("Mean", self.mean)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_category": self.per_category,
            "mean": self.mean,
            "num_images": self.num_images,
            "settings": self.settings,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_csv(self, path: str | Path | None = None) -> str:
        """One row per category plus `Mean`; raw fractions (full precision), empty cells where undefined."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        names = self.metric_names
        writer.writerow(["category", "num_images", *names])
        for category, values in self.rows():
            count = self.num_images.get(category, sum(self.num_images.values()))
            writer.writerow([category, count, *("" if values.get(n) is None else repr(values[n]) for n in names)])
        if path is not None:
            Path(path).write_text(buffer.getvalue())
        return buffer.getvalue()

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        names = self.metric_names
        header = ["Category", *(METRIC_HEADERS[n] for n in names)]
        body = [
            [category, *(format_percent(values.get(n)) for n in names)]
            for category, values in self.rows()
        ]
        return header, body

    def to_markdown(self, path: str | Path | None = None) -> str:
        header, body = self._cells()
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---", *(["---:"] * (len(header) - 1))]) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body[:-1]]
        lines.append("| " + " | ".join(f"**{cell}**" for cell in body[-1]) + " |")
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def format_table(self) -> str:
        """The table as aligned plain text, for a terminal."""
        header, body = self._cells()
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

        def line(row: Sequence[str]) -> str:
            return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *map(line, body[:-1]), rule, line(body[-1])])

    def __str__(self) -> str:
        return self.format_table()


class AnomalyMetrics:
    """Accumulates a benchmark batch by batch and computes SPEC §7's metrics per category and on average.

    Args:
        fpr_limit: FPR up to which the PRO curve is integrated (0.3 in the paper).
        aupro_method: `"exact"` (default; every distinct threshold) or `"classic"` (`num_thresholds` evenly spaced
            thresholds, the AnomalyCLIP-style loop); see `visualad_hf.metrics.aupro`.
        num_thresholds: thresholds of the classic AUPRO.
        storage_dir: if given, pixel data is written there as `.npy` files (in a fresh sub-folder, removed by
            `reset`) instead of held in memory, so memory holds one category at a time during `compute`.

    Example:
        ```python
        metrics = AnomalyMetrics()
        for batch in loader:
            metrics.add_batch(scores, batch["labels"], maps, batch["masks"], categories=batch["category"])
        result = metrics.compute()
        print(result)                        # per-category table with a Mean row, x100
        result.mean["pixel_aupro"]           # a fraction in [0, 1]
        ```
    """

    def __init__(
        self,
        *,
        fpr_limit: float = DEFAULT_FPR_LIMIT,
        aupro_method: AuproMethod = "exact",
        num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
        storage_dir: str | Path | None = None,
    ):
        _check_fpr_limit(fpr_limit)
        if aupro_method not in ("exact", "classic"):
            raise ValueError(f"aupro_method must be 'exact' or 'classic', got {aupro_method!r}.")
        self.fpr_limit = fpr_limit
        self.aupro_method = aupro_method
        self.num_thresholds = num_thresholds
        self._storage_root = Path(storage_dir) if storage_dir is not None else None
        self._directory: Path | None = None
        self._states: dict[str, _CategoryState] = {}

    # ------------------------------------------------------------------------------------------------ accumulation
    def _state(self, category: str) -> _CategoryState:
        if category not in self._states:
            if self._storage_root is not None and self._directory is None:
                self._storage_root.mkdir(parents=True, exist_ok=True)
                self._directory = Path(tempfile.mkdtemp(prefix="anomaly-metrics-", dir=self._storage_root))
            self._states[category] = _CategoryState.empty(self._directory)
        return self._states[category]

    @property
    def categories(self) -> list[str]:
        """Categories in the order they were first seen."""
        return list(self._states)

    def __len__(self) -> int:
        return sum(state.num_images for state in self._states.values())

    def add_batch(
        self,
        image_scores: Any = None,
        labels: Any = None,
        anomaly_maps: Any = None,
        masks: Any = None,
        categories: str | Sequence[str] | None = None,
    ) -> None:
        """Add a batch of B images.

        Args:
            image_scores: `[B]` image anomaly scores (higher = more anomalous), or None for pixel metrics only.
            labels: `[B]` 0 (normal) / 1 (anomalous). Defaults to "mask is not empty" when masks are given.
            anomaly_maps: `[B, H, W]` anomaly maps at the masks' resolution, or None for image metrics only.
            masks: `[B, H, W]` ground truth (bool, {0, 1}, or soft masks binarised at 0.5). Normal images have empty
                masks. Required with `anomaly_maps`.
            categories: one category name for the batch, or one per image. Defaults to `"all"`.
        """
        if anomaly_maps is not None and masks is None:
            raise ValueError(
                "anomaly_maps were given without masks; pass the ground-truth masks (empty for normal images)."
            )
        binary_masks = binarize_masks(masks) if masks is not None else None
        if binary_masks is not None and binary_masks.ndim == 2:
            binary_masks = binary_masks[None]
        if image_scores is not None:
            scores = _check_scores(image_scores, np.dtype(np.float64), "image scores").reshape(-1)
            size = scores.size
        elif binary_masks is not None:
            scores, size = None, binary_masks.shape[0]
        else:
            raise ValueError("add_batch needs image_scores, anomaly_maps with masks, or both.")
        if labels is None:
            if binary_masks is None:
                raise ValueError("labels are required when no masks are given.")
            labels = binary_masks.reshape(size, -1).any(axis=1)
        labels = _check_labels(labels, size)
        names = self._category_names(categories, size)

        # Everything is checked and reduced before anything is stored: a bad batch leaves the state unchanged.
        groups = _group_indices(names)
        pixel_parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}
        if anomaly_maps is not None:
            maps = to_numpy(anomaly_maps)
            if maps.ndim == 2:
                maps = maps[None]
            if maps.shape[0] != size:
                raise ValueError(f"{maps.shape[0]} anomaly maps for {size} images.")
            if binary_masks.shape[0] != size:
                raise ValueError(f"{binary_masks.shape[0]} masks for {size} images.")
            pixel_parts = {category: split_pixel_scores(maps[index], binary_masks[index]) for category, index in groups}
        for category, index in groups:
            state = self._state(category)
            if scores is not None:
                state.image_scores.append(scores[index])
                state.image_labels.append(labels[index])
            if category in pixel_parts:
                negatives, positives, region_sizes, num_regions = pixel_parts[category]
                state.negatives.append(negatives)
                state.positives.append(positives)
                state.region_sizes.append(region_sizes)
                state.num_regions += num_regions
                state.num_maps += len(index)

    @staticmethod
    def _category_names(categories: str | Sequence[str] | None, size: int) -> list[str]:
        if categories is None or isinstance(categories, str):
            return [categories or DEFAULT_CATEGORY] * size
        names = [str(c) for c in categories]
        if len(names) != size:
            raise ValueError(f"{len(names)} categories for {size} images; give one per image or one for the batch.")
        return names

    def merge(self, other: AnomalyMetrics) -> AnomalyMetrics:
        """Add a copy of another accumulator's data (e.g. another process's shard) to this one; returns self.

        The merged data is this object's own: in memory, or, when this accumulator spills (`storage_dir`), copied
        into its own folder. Later `add_batch`/`reset` calls on `other` (or deleting its files) do not change this
        one. `other`'s spilled files must be readable here while `merge` runs (the same machine or a shared
        filesystem): a state pickled on another machine refers to files on that machine.
        """
        if (other.fpr_limit, other.aupro_method, other.num_thresholds) != (
            self.fpr_limit,
            self.aupro_method,
            self.num_thresholds,
        ):
            raise ValueError("Cannot merge AnomalyMetrics with different fpr_limit/aupro_method/num_thresholds.")
        for category, state in list(other._states.items()):
            target = self._state(category)
            target.merge(state)
        return self

    def reset(self) -> None:
        """Forget all data (and delete spilled files)."""
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
        self._states = {}

    # ----------------------------------------------------------------------------------------------------- compute
    def compute_category(self, category: str) -> dict[str, float | None]:
        """Metrics of one category (fractions in [0, 1]; None where undefined)."""
        state = self._states[category]
        values: dict[str, float | None] = dict.fromkeys(METRIC_NAMES)
        if state.image_scores.size:
            labels = state.image_labels.concatenate().astype(bool)
            scores = state.image_scores.concatenate()
            image = binary_metrics(RankedScores.from_parts(scores[~labels], scores[labels], overwrite=True))
            values.update({f"image_{k}": v for k, v in image.items()})
        if state.num_maps:
            ranked = RankedScores.from_parts(
                state.negatives.concatenate(),
                state.positives.concatenate(),
                state.region_sizes.concatenate(),
                state.num_regions,
                overwrite=True,
            )
            pixel = ranked_pixel_metrics(
                ranked, fpr_limit=self.fpr_limit, aupro_method=self.aupro_method, num_thresholds=self.num_thresholds
            )
            values.update({f"pixel_{k}": v for k, v in pixel.items()})
        return values

    def compute(
        self, categories: Iterable[str] | None = None, *, num_workers: int = 1, progress: bool = False
    ) -> AnomalyMetricsResult:
        """Metrics per category (in `categories` order, default first-seen order) and their mean.

        `num_workers` > 1 computes categories in parallel threads (the sorts release the GIL); memory then holds
        that many categories' sorted pixels at once. `progress` shows a progress bar over categories.
        """
        from tqdm.auto import tqdm

        names = list(self._states) if categories is None else [str(c) for c in categories]
        missing = [name for name in names if name not in self._states]
        if missing:
            raise KeyError(f"No data was added for categories {missing}; known: {list(self._states)}.")
        bar = {"total": len(names), "desc": "Computing metrics", "unit": "category", "disable": not progress}
        if num_workers > 1 and len(names) > 1:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                results = list(tqdm(pool.map(self.compute_category, names), **bar))
        else:
            results = [self.compute_category(name) for name in tqdm(names, **bar)]
        per_category = dict(zip(names, results))
        return AnomalyMetricsResult(
            per_category=per_category,
            mean=mean_over_categories(per_category),
            num_images={name: self._states[name].num_images for name in names},
            settings={
                "fpr_limit": self.fpr_limit,
                "aupro_method": self.aupro_method,
                **({"num_thresholds": self.num_thresholds} if self.aupro_method == "classic" else {}),
                "pixel_dtype": np.dtype(PIXEL_DTYPE).name,
                "region_connectivity": 8,
            },
        )


def format_percent(value: float | None) -> str:
    """A fraction as the paper prints it: ×100, one decimal; "–" where undefined. Never "-0.0"."""
    if value is None:
        return "–"
    text = f"{100 * value:.1f}"
    return "0.0" if text == "-0.0" else text


def mean_over_categories(per_category: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the categories where it is defined (None if it is defined nowhere)."""
    mean: dict[str, float | None] = {}
    for name in METRIC_NAMES:
        values = [m[name] for m in per_category.values() if m.get(name) is not None and not math.isnan(m[name])]
        mean[name] = float(np.mean(values)) if values else None
    return mean


def _group_indices(names: list[str]) -> list[tuple[str, np.ndarray]]:
    """(category, indices) in first-seen order."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(name, []).append(index)
    return [(name, np.asarray(index)) for name, index in groups.items()]
