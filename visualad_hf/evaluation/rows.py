"""Dataset rows -> model batches for evaluation: decoding that sets unreadable files aside, and the dataset's flags
(which metric families apply)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import VisualADError


class EvaluationCollator:
    """Decodes dataset rows and collates them with `VisualADCollator`, setting aside rows that cannot be read.

    Image columns are read undecoded (`datasets.Image(decode=False)`) so that a corrupt file becomes a reported
    failure instead of an exception inside the data loader. Returns `batch` (or None), the `positions` of the rows
    kept, `num_rows`, `failures`, and `has_ground_truth` (per kept row: False for an anomalous row without a mask,
    whose pixels must not be scored as normal).
    """

    def __init__(self, image_processor, *, return_masks: bool):
        from ..data.collator import VisualADCollator

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
        except (OSError, ValueError):  # find the culprit(s), keep the rest
            kept = []
            for position, row in decoded:
                try:
                    self.collator([row])
                    kept.append((position, row))
                except (OSError, ValueError) as row_error:
                    failures.append(_failure(row, position, row_error))
            if len(kept) == len(decoded):  # the batch as a whole is the problem (e.g. sizes): re-raise
                raise
            decoded = kept
            batch = self.collator([row for _, row in decoded]) if decoded else None
        return {
            "batch": batch,
            "positions": [position for position, _ in decoded],
            "num_rows": len(rows),
            "failures": failures,
            "has_ground_truth": [has_ground_truth(row) for _, row in decoded],
        }

    def _decode_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        name = str(row.get("image_path", "image"))
        out = dict(row)
        out["image"] = decode_image_cell(row["image"], name)
        if "mask" in row:
            out["mask"] = decode_image_cell(row["mask"], f"mask of {name}") if self.return_masks else None
        return out


def has_ground_truth(row: Mapping[str, Any]) -> bool:
    """Whether the row's pixels have a ground truth: normal rows always (all pixels normal), anomalous rows only with
    a mask. A `meta.json` record can be anomalous with an empty `mask_path`."""
    return int(row.get("label", 0)) != 1 or row.get("mask") is not None


def decode_image_cell(cell: Any, name: str) -> Any:
    """A `datasets` image cell (decoded or `{"bytes", "path"}`) as a PIL image; None stays None."""
    from ..image_io import ImageLoadError, load_image

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


def undecoded(dataset):
    """The dataset with its image columns left as file references (decoded by `EvaluationCollator`)."""
    import datasets

    for column in ("image", "mask"):
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


class EvaluationDataError(VisualADError, ValueError):
    """The dataset handed to the evaluation runner lacks what evaluation needs."""


def dataset_flags(dataset, dataset_name: str | None = None) -> dict[str, Any]:
    """Which metric families apply: `image_metrics` (False for datasets the registry flags anomaly-only) and
    `pixel_metrics` (False when the registry says the dataset has no masks, or no row has one). `dataset_name`
    defaults to `dataset.info.dataset_name`, which `load_anomaly_dataset` sets."""
    from ..data import DATASETS

    name = dataset_name or getattr(dataset.info, "dataset_name", None)
    if "label" not in dataset.column_names:
        raise EvaluationDataError(
            f"The dataset has no `label` column (columns: {dataset.column_names}); add one: 0 normal, 1 anomalous."
        )
    spec = DATASETS.get(name)
    has_masks = (spec is None or spec.has_masks) and "mask" in dataset.column_names and any(
        cell is not None for cell in undecoded(dataset.select_columns(["mask"]))["mask"]
    )
    return {"dataset": name, "image_metrics": spec is None or not spec.anomaly_only, "pixel_metrics": has_masks}


__all__ = ["EvaluationCollator", "EvaluationDataError", "dataset_flags", "decode_image_cell", "has_ground_truth", "undecoded"]
