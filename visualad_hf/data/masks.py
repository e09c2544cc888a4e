"""What an "anomalous pixel" is: the one place where mask files become boolean arrays.

The `mask` column of a loaded dataset holds each benchmark's real mask file (or None for normal images and for
classification-only sets). Those files disagree on encoding: 0/255 PNG (MVTec AD, MPDD, DTD, ISIC), class-index PNG
with values 1..9 (raw VisA), 0/1 or 8-bit GT (KSDD2, BTAD), and lossy JPEG (Kvasir-SEG, TN3K), whose compression
noise makes "> 0" mark halos around every polyp. The rule here:

- a pixel is anomalous when its value is `>= threshold`;
- the threshold is 1 (i.e. `> 0`, the official rule) for lossless files and 128 for lossy ones (JPEG), chosen from
  the PIL image's `format`, so a Kvasir copy re-saved as PNG is read right too;
- colour masks use the largest channel (a pure red stroke counts), alpha is ignored;
- palette (`P`) masks are label maps: index 0 is background, any other index is anomalous (the official loader
  goes through the palette colours instead, which breaks when the background entry is not black).

Arrays carry no format, so pass `threshold` for arrays decoded from JPEG (`dataset_spec(name).mask_threshold`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

LOSSLESS_THRESHOLD = 1
LOSSY_THRESHOLD = 128
LOSSY_FORMATS = frozenset({"JPEG", "MPO", "JPEG2000", "WEBP"})


def mask_threshold(mask: Image.Image | np.ndarray) -> int:
    """The threshold `binarize_mask` uses when none is given: 128 for a JPEG (lossy) file, else 1."""
    return LOSSY_THRESHOLD if isinstance(mask, Image.Image) and mask.format in LOSSY_FORMATS else LOSSLESS_THRESHOLD


def binarize_mask(mask: Image.Image | np.ndarray, threshold: int | None = None) -> np.ndarray:
    """A mask image or array as a boolean [H, W] array (True = anomalous), by the rule in this module's docstring."""
    if threshold is None:
        threshold = mask_threshold(mask)
    if isinstance(mask, Image.Image):
        if mask.mode in ("P", "PA"):
            return np.asarray(mask.getchannel(0) if mask.mode == "PA" else mask) != 0
        if mask.mode == "1":
            return np.asarray(mask, dtype=bool)
        if mask.mode in ("LA", "RGBA", "La", "RGBa"):
            mask = mask.convert("RGB")
        array = np.asarray(mask)
    else:
        array = np.asarray(mask)
    if array.ndim == 3:
        array = array.max(axis=-1)
    if array.ndim != 2:
        raise ValueError(f"a mask must be [H, W] or [H, W, C], got shape {array.shape}")
    if array.dtype == bool:
        return array.copy()
    return array >= threshold


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
