"""The VisualAD paper's reported results (CVPR 2026; mirrored in the authors' README), for the model card.

Rows are image AUROC, F1-max, AP and, where the dataset has masks, pixel AUROC, F1-max, AP, AUPRO, in percent.
"""

from __future__ import annotations

from collections.abc import Mapping

METRIC_ORDER = ("image_auroc", "image_f1_max", "image_ap", "pixel_auroc", "pixel_f1_max", "pixel_ap", "pixel_aupro")


def paper_results(rows: Mapping[str, tuple[float, ...]]) -> dict[str, dict[str, float]]:
    """`{dataset: (values in METRIC_ORDER)}` as `{dataset: {metric: value}}` (3 image values, optionally 4 pixel)."""
    for dataset, values in rows.items():
        if len(values) not in (3, 7):
            raise ValueError(f"{dataset}: a paper row has 3 image or 7 image+pixel values, got {len(values)}.")
    return {dataset: dict(zip(METRIC_ORDER, values)) for dataset, values in rows.items()}


__all__ = ["METRIC_ORDER", "paper_results"]
