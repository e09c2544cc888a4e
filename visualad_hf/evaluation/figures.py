"""The per-category figures of an evaluation run: which samples to show, kept as small tiles while the run goes.

Drawing lives in `visualad_hf.visualization` (`render_grid`, `colour_bar`, one font). All heatmaps of a run share
one colour range, written on each figure's colour bar (and in `metrics.json` as `figure_value_range`), so a colour
means the same score in every column and every category.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

FIGURE_TILE_SIZE = 192
DEFAULT_FIGURE_SAMPLES = 6
ROW_LABELS = ("image", "ground truth", "anomaly map")
MISSING_MASK_GREY = (128, 128, 128)


@dataclass
class FigureSample:
    index: int
    category: str
    defect_type: str
    label: int
    score: float
    anomaly_map: np.ndarray  # [t, t] float32
    mask: np.ndarray | None  # [t, t] bool


@dataclass
class FigureCollector:
    """Keeps the first `per_type` samples of each (category, defect type) as small tiles, and the score range."""

    per_type: int
    tile: int = FIGURE_TILE_SIZE
    samples: list[FigureSample] = field(default_factory=list)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, index: int, row: dict, score: float, anomaly_map: torch.Tensor, mask: torch.Tensor | None) -> None:
        """`row` holds the image's `category`, `defect_type` and `label`."""
        self.low = min(self.low, float(anomaly_map.min()))
        self.high = max(self.high, float(anomaly_map.max()))
        key = (row["category"], row["defect_type"])
        if self.counts.get(key, 0) >= self.per_type:
            return
        self.counts[key] = self.counts.get(key, 0) + 1
        size = (self.tile, self.tile)
        resize = torch.nn.functional.interpolate
        small_map = resize(anomaly_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
        small_mask = None
        if mask is not None:
            small_mask = (resize(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5).numpy()
        sample = FigureSample(
            index, row["category"], row["defect_type"], int(row["label"]), score, small_map.numpy(), small_mask
        )
        self.samples.append(sample)

    def merge(self, other: FigureCollector) -> None:
        self.samples += other.samples
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)

    @property
    def value_range(self) -> tuple[float, float] | None:
        return (self.low, self.high) if self.low <= self.high else None


def pick_samples(samples: list[FigureSample], count: int) -> list[FigureSample]:
    """Up to `count` samples: anomalous ones first, one defect type after another, then normal ones."""
    by_type: dict[str, list[FigureSample]] = {}
    for sample in sorted(samples, key=lambda s: s.index):
        if sample.label == 1:
            by_type.setdefault(sample.defect_type, []).append(sample)
    picked: list[FigureSample] = []
    while len(picked) < count and any(by_type.values()):
        for queue in by_type.values():
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    normal = [s for s in sorted(samples, key=lambda s: s.index) if s.label != 1]
    picked += normal[: count - len(picked)]
    return sorted(picked, key=lambda s: s.index)


def render_category_figure(
    category: str,
    images: Sequence[Image.Image],
    samples: Sequence[FigureSample],
    value_range: tuple[float, float],
    source: str = "every map of this evaluation",
) -> Image.Image:
    """A grid like the paper's appendix figures: a column per sample, rows image / ground truth / anomaly map (the
    heatmap over the image, half and half), and a colour bar for `value_range` beside the anomaly maps; `source`
    says where the range comes from."""
    from ..visualization import ColourScale, overlay_heatmap, render_grid

    tile = FIGURE_TILE_SIZE
    columns, captions = [], []
    for image, sample in zip(images, samples):
        rgb = image.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)
        if sample.mask is None and sample.label == 1:  # anomalous without a mask: grey, not "all normal" black
            truth = Image.new("RGB", (tile, tile), MISSING_MASK_GREY)
        else:
            mask = sample.mask if sample.mask is not None else np.zeros((tile, tile), bool)
            truth = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").convert("RGB")
        columns.append([rgb, truth, overlay_heatmap(rgb, sample.anomaly_map, alpha=0.5, value_range=value_range)])
        captions.append(f"{sample.defect_type}  {sample.score:.3f}")
    scale = ColourScale(float(value_range[0]), float(value_range[1]), source)
    return render_grid(columns, row_labels=ROW_LABELS, captions=captions, title=category, scale=scale, bar_rows=(2,),
                       tile=tile)  # fmt: skip


__all__ = ["DEFAULT_FIGURE_SAMPLES", "FIGURE_TILE_SIZE", "FigureCollector", "pick_samples", "render_category_figure"]
