"""Batch collation: dataset rows -> model inputs, through the image processor (for training and evaluation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

DEFAULT_METADATA_COLUMNS = ("category", "defect_type", "image_path")


class VisualADCollator:
    """Turns rows of an anomaly dataset (`image`, `mask`, `label`, `category`, ...) into a batch for `VisualADModel`.

    ```python
    collate = VisualADCollator(VisualADImageProcessor.from_model_config(model.config))
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate)
    batch = next(iter(loader))
    out = model(batch["pixel_values"], labels=batch["labels"], masks=batch["masks"])
    ```

    The batch holds `pixel_values` `[B, 3, H, W]`; `masks` `[B, H, W]` float {0, 1} when the rows have a `mask`
    column and `return_masks` (a `None` mask is the all-zero mask of a normal image), with `has_mask` `[B]` bool:
    False for an *anomalous* row without a mask, whose mask is unknown rather than all-normal (the model leaves it out
    of the segmentation loss); `labels` `[B]` long when the rows have a `label`; and each present `metadata_columns`
    entry as a list (the model ignores them). Rows may hold PIL
    images (the `datasets` default) or tensors (`with_format("torch")`).

    Args:
        image_processor: a `VisualADImageProcessor`; its settings (size, normalisation, mask rule) apply.
        return_masks: set False to skip mask processing (image-level use only).
        metadata_columns: row fields passed through as lists.
    """

    def __init__(
        self,
        image_processor,
        *,
        return_masks: bool = True,
        metadata_columns: Sequence[str] = DEFAULT_METADATA_COLUMNS,
    ):
        self.image_processor = image_processor
        self.return_masks = return_masks
        self.metadata_columns = tuple(metadata_columns)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise ValueError("Cannot collate an empty batch.")
        masks = [row.get("mask") for row in rows] if self.return_masks and "mask" in rows[0] else None
        try:
            processed = self.image_processor([row["image"] for row in rows], masks=masks, return_tensors="pt")
        except ValueError as error:
            paths = [row.get("image_path", f"row {index}") for index, row in enumerate(rows)]
            raise ValueError(f"{error} Batch images, in order: {paths}") from error
        batch: dict[str, Any] = {"pixel_values": processed["pixel_values"]}
        if masks is not None:
            batch["masks"] = processed["masks"]
            batch["has_mask"] = torch.as_tensor(
                [mask is not None or int(row.get("label", 0)) == 0 for mask, row in zip(masks, rows)], dtype=torch.bool
            )
        if "label" in rows[0]:
            batch["labels"] = torch.as_tensor([int(row["label"]) for row in rows], dtype=torch.long)
        for column in self.metadata_columns:
            if column in rows[0]:
                batch[column] = [row[column] for row in rows]
        return batch


__all__ = ["DEFAULT_METADATA_COLUMNS", "VisualADCollator"]
