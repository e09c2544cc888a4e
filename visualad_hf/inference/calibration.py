"""Calibrating a model folder's threshold from image files, and saving the calibrated folder (what `visualad
calibrate` runs).

The calibrated folder is the source folder copied as it is (model card, `eval_results/`, `training_args.yaml` and
the weights, byte for byte) with `config.json` and the card's threshold row updated; it is written through
`hub.staged_folder`, so a kill or a full disk leaves the old folder or the new one, never a mix. Calibrating in place
(output = source) hard-links the unchanged files instead of copying them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import VisualADError
from ..hub import staged_folder
from ..thresholds import DEFAULT_PERCENTILE, ThresholdCalibration, apply_calibration, calibrate_scores
from .inputs import find_images, pillow_pixel_limit, score_files
from .loading import WEIGHT_FILES, local_model_folder
from .output_folder import STATE_DIR, OutputFolderError

# Not copied into a new calibrated folder: training checkpoints and logs, and leftovers of interrupted writes.
NOT_COPIED = ("checkpoint-*", "logs", STATE_DIR, ".*.tmp", "*.old")
CHANGED_FILES = ("config.json", "README.md")


@dataclass
class CalibrationRun:
    """A calibration and the files that could not be used (path, reason)."""

    calibration: ThresholdCalibration
    failures: list[tuple[str, str]] = field(default_factory=list)


class CalibrationInputError(VisualADError):
    """No readable images to calibrate on; `failures` lists (path, reason) of the files that failed."""

    def __init__(self, message: str, failures: list[tuple[str, str]]):
        super().__init__(message)
        self.failures = failures


def score_inputs(
    detector, inputs: Sequence[str | os.PathLike], *, batch_size: int = 8, max_pixels: int | None = None
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Scores of every readable image among `inputs` (files and folders), and (path, reason) for the others."""
    files, missing = find_images(inputs)
    failures = [(item.path, item.error) for item in missing]
    scores = []
    with pillow_pixel_limit(max_pixels):
        for item in score_files(detector, files, batch_size=batch_size, max_pixels=max_pixels, return_anomaly_map=False):
            if item.error is None:
                scores.append(item.result["score"])
            else:
                failures.append((str(item.file.path), item.error))
    return np.asarray(scores, dtype=np.float64), failures


def calibrate_from_inputs(
    detector,
    normal: Sequence[str | os.PathLike],
    anomalous: Sequence[str | os.PathLike] | None = None,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    batch_size: int = 8,
    max_pixels: int | None = None,
) -> CalibrationRun:
    """Score the images and calibrate (`thresholds.calibrate_scores`); writes the result into the detector's model
    config. Unreadable files and failing images are left out and listed; none readable raises an error."""
    normal_scores, failures = score_inputs(detector, normal, batch_size=batch_size, max_pixels=max_pixels)
    anomalous_scores = None
    if anomalous:
        anomalous_scores, more = score_inputs(detector, anomalous, batch_size=batch_size, max_pixels=max_pixels)
        failures += more
    if normal_scores.size == 0 or (anomalous and anomalous_scores.size == 0):
        which = "normal" if normal_scores.size == 0 else "anomalous"
        raise CalibrationInputError(
            f"none of the {which} images could be scored ({len(failures)} failed, listed above); calibration needs "
            "readable normal images (and anomalous ones with --anomalous)",
            failures,
        )
    calibration = calibrate_scores(normal_scores, anomalous_scores, percentile=percentile)
    apply_calibration(detector.model, calibration)
    return CalibrationRun(calibration, failures)


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES)


def check_calibration_output(
    source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False
) -> bool:
    """Whether `output` calibrates `source` in place; refuses an `output` that is not ours to replace (it is
    replaced as a whole): a file, a non-empty folder that is not a model, another model without `overwrite`."""
    return _check_output(Path(output), local_model_folder(source), overwrite)


def _check_output(output: Path, source: Path | None, overwrite: bool) -> bool:
    if source is not None and output.exists() and output.resolve() == source.resolve():
        return True
    if output.is_file():
        raise OutputFolderError(f"{output} is a file; --output must be a folder (new, empty, or the model folder)")
    if output.is_dir() and any(output.iterdir()):
        if not _is_model_folder(output):
            raise OutputFolderError(
                f"{output} is not empty and is not a model folder; it would be replaced as a whole: choose a new or "
                "empty folder"
            )
        if not overwrite:
            raise OutputFolderError(
                f"{output} already holds another model; pass --overwrite to replace it, or choose a new folder"
            )
    return False


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not supported
        shutil.copy2(source, target)


def save_calibrated_model(
    detector,
    source: str | os.PathLike,
    output: str | os.PathLike,
    calibration: ThresholdCalibration,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the calibrated model folder `output` from the model `source` (a folder or a cached Hub id).

    The folder is copied (see the module docstring) and only `config.json` (threshold and its provenance) and the
    model card's threshold row change; without a source folder (a Hub id not in the cache) the detector's model and
    processor are saved and a card is generated. Returns `output`.
    """
    from ..configuration_visualad import VisualADConfig
    from ..image_processing_visualad import VisualADImageProcessor
    from ..model_card import create_model_card, update_card_threshold

    output = Path(output)
    folder = local_model_folder(source)
    in_place = _check_output(output, folder, overwrite)
    with staged_folder(output) as staging:
        if folder is not None:
            shutil.copytree(
                folder,
                staging,
                dirs_exist_ok=True,
                symlinks=in_place,
                ignore=shutil.ignore_patterns(".*.tmp") if in_place else shutil.ignore_patterns(*NOT_COPIED),
                copy_function=_link_or_copy if in_place else shutil.copy2,
            )
            config = VisualADConfig.from_pretrained(folder)
        else:
            detector.model.save_pretrained(staging)
            config = VisualADConfig.from_pretrained(staging)
        for name in CHANGED_FILES:  # possibly hard links to the source's files: never write through them
            (staging / name).unlink(missing_ok=True)
        apply_calibration(config, calibration)
        config.save_pretrained(staging)
        if not (staging / "preprocessor_config.json").is_file():
            processor = getattr(detector, "image_processor", None) or VisualADImageProcessor.from_model_config(config)
            processor.save_pretrained(staging)
        card_path = staging / "README.md"
        previous = folder / "README.md" if folder is not None else None
        if previous is not None and previous.is_file():
            text = previous.read_text(encoding="utf-8")
            card_path.write_text(update_card_threshold(text, config.anomaly_threshold, config.threshold_calibration))
        else:
            create_model_card(config, base_model=None).save(str(card_path))
    return output


__all__ = [
    "CalibrationInputError",
    "CalibrationRun",
    "calibrate_from_inputs",
    "check_calibration_output",
    "save_calibrated_model",
    "score_inputs",
]
