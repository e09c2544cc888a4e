"""Exact, fast anomaly-detection metrics (SPEC §7): image AUROC/F1-max/AP and pixel AUROC/F1-max/AP/AUPRO.

Plain functions for arrays in memory, and `AnomalyMetrics`, a streaming, mergeable accumulator with per-category
results. An `evaluate` adapter lives in `visualad_hf/metrics/visualad_anomaly` (`evaluate.load(METRIC_DIR)`).
"""

from pathlib import Path

from .functional import (
    AUPRO_METHODS,
    DEFAULT_FPR_LIMIT,
    DEFAULT_NUM_THRESHOLDS,
    PIXEL_DTYPE,
    REGION_STRUCTURE,
    RankedScores,
    aupro,
    auroc,
    average_precision,
    binarize_masks,
    f1_max,
    f1_max_threshold,
    image_metrics,
    pixel_metrics,
)
from .streaming import (
    IMAGE_METRICS,
    METRIC_HEADERS,
    METRIC_NAMES,
    PIXEL_METRICS,
    AnomalyMetrics,
    AnomalyMetricsResult,
    mean_over_categories,
)

METRIC_DIR = Path(__file__).resolve().parent / "visualad_anomaly"
"""Folder of the `evaluate` metric: `evaluate.load(str(METRIC_DIR))`."""

__all__ = [
    "AUPRO_METHODS",
    "DEFAULT_FPR_LIMIT",
    "DEFAULT_NUM_THRESHOLDS",
    "IMAGE_METRICS",
    "METRIC_DIR",
    "METRIC_HEADERS",
    "METRIC_NAMES",
    "PIXEL_DTYPE",
    "PIXEL_METRICS",
    "REGION_STRUCTURE",
    "AnomalyMetrics",
    "AnomalyMetricsResult",
    "RankedScores",
    "aupro",
    "auroc",
    "average_precision",
    "binarize_masks",
    "f1_max",
    "f1_max_threshold",
    "image_metrics",
    "mean_over_categories",
    "pixel_metrics",
]
