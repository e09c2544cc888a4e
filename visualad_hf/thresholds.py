"""Decision thresholds on image scores, and storing them in the model config so that they travel with the model.

Zero-shot users rarely have a labelled validation set, so two calibrations are offered:

- **From a few normal images** (`calibrate_from_normal_scores`): the threshold is the `percentile`-th percentile
  (default 99, linear interpolation) of their scores. It aims at about `100 - percentile` % false alarms on normal
  images while not letting the single most extreme normal image set the threshold alone; `percentile=100` is the
  maximum normal score (no false alarm on the calibration images). With few images the estimate leans towards the
  maximum: a 99th percentile is only resolved with at least 100 images, and fewer trigger a warning.
- **From a labelled set** (`calibrate_f1_max`): the threshold that maximises F1 (anomalous = positive), the operating
  point of the image F1-max metric, computed by `visualad_hf.metrics.f1_max_threshold`.

An image is anomalous when `score >= threshold` (both rules use this convention). `apply_calibration` writes
`config.anomaly_threshold` and `config.threshold_calibration` (method, parameters, number of images), which
`save_pretrained`/`push_to_hub` keep and the anomaly-detection pipeline reads; a call's `threshold=` overrides it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers.utils import logging

from .metrics import f1_max_threshold
from .metrics.functional import to_numpy

logger = logging.get_logger(__name__)

DEFAULT_PERCENTILE = 99.0


@dataclass(frozen=True)
class ThresholdCalibration:
    """A threshold and how it was obtained; `to_dict()` is what `config.threshold_calibration` stores."""

    threshold: float
    method: str
    num_images: int
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "num_images": self.num_images, **self.parameters}


def _scores_array(scores: Any) -> np.ndarray:
    values = to_numpy(scores).astype(np.float64).ravel()
    if values.size == 0:
        raise ValueError("No scores given: calibration needs at least one scored image.")
    if not np.isfinite(values).all():
        raise ValueError("Some scores are NaN or infinite; check the images and the model before calibrating.")
    return values


def calibrate_from_normal_scores(scores: Any, percentile: float = DEFAULT_PERCENTILE) -> ThresholdCalibration:
    """Threshold = the `percentile`-th percentile of the scores of normal images (rule in the module docstring)."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile} must lie in (0, 100].")
    values = _scores_array(scores)
    needed = math.ceil(100.0 / (100.0 - percentile)) if percentile < 100.0 else 1
    if values.size < needed:
        logger.warning(
            f"{values.size} normal images cannot resolve the {percentile:g}th percentile (that needs at least "
            f"{needed}); the threshold lies close to the highest normal score. Add normal images for a steadier one."
        )
    threshold = float(np.percentile(values, percentile))
    parameters = {
        "percentile": float(percentile),
        "normal_score_mean": float(values.mean()),
        "normal_score_max": float(values.max()),
    }
    return ThresholdCalibration(threshold, "normal_percentile", int(values.size), parameters)


def calibrate_f1_max(scores: Any, labels: Any) -> ThresholdCalibration:
    """Threshold maximising F1 on a labelled set (labels: 0 normal, 1 anomalous; both must occur)."""
    values = _scores_array(scores)
    targets = to_numpy(labels).ravel()
    if targets.size != values.size:
        raise ValueError(f"Got {values.size} scores but {targets.size} labels.")
    f1, threshold = f1_max_threshold(values, targets)
    positives = int((targets == 1).sum())
    parameters = {"f1": float(f1), "num_anomalous": positives, "num_normal": int(targets.size - positives)}
    return ThresholdCalibration(float(threshold), "f1_max", int(values.size), parameters)


def calibrate_scores(
    normal_scores: Any, anomalous_scores: Any | None = None, *, percentile: float = DEFAULT_PERCENTILE
) -> ThresholdCalibration:
    """The rule choice in one place: F1-max when anomalous scores are given too, else the normal percentile."""
    if anomalous_scores is None or len(anomalous_scores) == 0:
        return calibrate_from_normal_scores(normal_scores, percentile)
    normal, anomalous = _scores_array(normal_scores), _scores_array(anomalous_scores)
    labels = np.concatenate([np.zeros(normal.size, dtype=int), np.ones(anomalous.size, dtype=int)])
    return calibrate_f1_max(np.concatenate([normal, anomalous]), labels)


def apply_calibration(model_or_config, calibration: ThresholdCalibration) -> None:
    """Store the threshold in `config.anomaly_threshold` and its provenance in `config.threshold_calibration`."""
    config = getattr(model_or_config, "config", model_or_config)
    config.anomaly_threshold = float(calibration.threshold)
    config.threshold_calibration = calibration.to_dict()


def score_images(detector, images: Sequence[Any], batch_size: int = 8) -> np.ndarray:
    """Image scores from an anomaly-detection pipeline, without building full-size maps."""
    results = detector(list(images), batch_size=batch_size, return_anomaly_map=False)
    return np.asarray([result["score"] for result in results], dtype=np.float64)


def calibrate(
    detector,
    normal_images: Sequence[Any],
    anomalous_images: Sequence[Any] | None = None,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    batch_size: int = 8,
    apply: bool = True,
) -> ThresholdCalibration:
    """Score images with `detector` (a `pipeline("anomaly-detection")`) and calibrate its model's threshold.

    With only `normal_images`: the percentile rule. With `anomalous_images` too: F1-max on the labelled set.
    `apply=True` writes the result into `detector.model.config`; save it with `detector.save_pretrained(dir)`.
    """
    normal_scores = score_images(detector, normal_images, batch_size)
    anomalous_scores = score_images(detector, anomalous_images, batch_size) if anomalous_images else None
    calibration = calibrate_scores(normal_scores, anomalous_scores, percentile=percentile)
    if apply:
        apply_calibration(detector.model, calibration)
    return calibration


__all__ = [
    "DEFAULT_PERCENTILE",
    "ThresholdCalibration",
    "apply_calibration",
    "calibrate",
    "calibrate_f1_max",
    "calibrate_from_normal_scores",
    "calibrate_scores",
    "score_images",
]
