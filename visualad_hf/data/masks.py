"""What an "anomalous pixel" is for a dataset row.

The rule itself (`binarize_mask`, `mask_threshold`) lives in `visualad_hf.image_io`, since the image processor
needs it too; see its docstring. Here: loading the mask of one dataset row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from ..image_io import LOSSLESS_THRESHOLD, LOSSY_FORMATS, LOSSY_THRESHOLD, binarize_mask, mask_threshold

__all__ = ["LOSSLESS_THRESHOLD", "LOSSY_FORMATS", "LOSSY_THRESHOLD", "binarize_mask", "load_mask", "mask_threshold"]


def load_mask(example: Mapping[str, Any], threshold: int | None = None) -> np.ndarray:
    """The boolean [H, W] mask of one dataset row (`image`, `mask` decoded by `datasets`); all False without a mask.

    A mask whose size differs from its image's is an error naming both files: it means the pair is wrong.
    """
    image = example["image"]
    width, height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    mask = example.get("mask")
    if mask is None:
        return np.zeros((height, width), dtype=bool)
    binary = binarize_mask(mask, threshold)
    if binary.shape != (height, width):
        name = example.get("image_path", getattr(image, "filename", "the image"))
        raise ValueError(
            f"mask {getattr(mask, 'filename', '')!r} is {binary.shape[1]}x{binary.shape[0]} but image {name!r} is "
            f"{width}x{height}; the mask does not belong to this image"
        )
    return binary
