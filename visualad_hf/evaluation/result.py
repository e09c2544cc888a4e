"""What an evaluation run returns and writes: `EvaluationResult` (metrics, per-image scores, failures, figures)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..metrics import AnomalyMetricsResult

SCORE_COLUMNS = ("image_path", "category", "defect_type", "label", "score")


@dataclass
class EvaluationResult:
    """What `evaluate_model` measured: metrics per category and their mean, per-image scores, failures, figures.

    Metric values are fractions in [0, 1] (None where undefined); tables show them ×100 with one decimal.
    `failures` lists images that could not be read (`image_path`, `error`); they are left out of all metrics.
    `info["pixel_metrics_excluded"]` lists anomalous images without a ground-truth mask: they count in the image
    metrics but are left out of the pixel metrics (treating them as all-normal pixels would be wrong).
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
        write_scores(paths["scores"], self.per_image)
        if self.figures:
            (out / "figures").mkdir(exist_ok=True)
            for category, figure in self.figures.items():
                paths[f"figure:{category}"] = out / "figures" / f"{safe_name(category)}.png"
                figure.save(paths[f"figure:{category}"])
        return paths


def write_scores(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """One row per evaluated image: path, category, defect type, label, score."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(SCORE_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def safe_name(name: str) -> str:
    """A category name as a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "category"


__all__ = ["EvaluationResult", "safe_name", "write_scores"]
