"""Reading images and masks: files, URLs, arrays and tensors become PIL images the processor can resize.

Image modes. The authors' transform resizes the image *in its own mode* (PIL bicubic) and only then converts it to RGB;
for `RGBA`/`LA` Pillow resizes with premultiplied alpha, so the order changes the numbers. `VisualADImageProcessor` keeps that
order for every mode the released checkpoints could have seen (`RGB`, `L`, `RGBA`, `LA`, `CMYK`, `RGBX`, `YCbCr`),
which reproduces the authors' `pixel_values` exactly. Where the authors' path is wrong, the image is first brought to an
8-bit mode (see `to_pil_image`):

- `P`/`PA` (palette) -> `RGB`/`RGBA`, and `1` -> `L`: Pillow resizes palette and bilevel images with nearest
  neighbour whatever filter is asked for, which would make the resize blocky.
- `HSV`, `LAB` -> `RGB`: interpolating hue or Lab channels and converting afterwards mixes colours wrongly.
- 16-bit (`I;16*`), 32-bit integer (`I`) and float (`F`) images -> `L` by `bit_depth_scaling`: Pillow's own conversion
  clips every value above 255 to white, which turns a typical 12- or 16-bit medical image into a blank frame.
  `"range"` (default) stretches the image's own minimum..maximum linearly onto 0..255, as a viewer's auto-window does;
  `"full"` maps 0..65535 onto 0..255 (`v / 257`), which keeps intensities comparable across images of a 16-bit series.
  Float images whose values lie in [0, 1] are taken as fractions of full scale (`v * 255`).

EXIF orientation is applied when an image is loaded, so maps line up with the image as viewers show it.

Masks (`binarize_mask`): what an "anomalous pixel" is, in one place, for datasets and the processor alike.

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

import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from huggingface_hub.utils import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import VisualADError

BitDepthScaling = Literal["range", "full"]
BIT_DEPTH_SCALINGS = ("range", "full")

# Modes resized as they are, then converted to RGB: the authors' order (SPEC §1).
_RESIZE_IN_OWN_MODE = {"RGB", "L", "RGBA", "LA", "CMYK", "RGBX", "YCbCr"}
# Modes converted to an 8-bit mode before resizing, and to which one.
_CONVERT_BEFORE_RESIZE = {"1": "L", "PA": "RGBA", "HSV": "RGB", "LAB": "RGB", "La": "LA", "RGBa": "RGBA"}
_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_EXIF_ORIENTATION_TAG = 0x0112
_FULL_SCALE_16_BIT = 65535.0
# URL inputs: a silent server times out, an endless one is cut off (both overridable per call).
DEFAULT_URL_TIMEOUT = 30.0
DEFAULT_URL_MAX_BYTES = 256 * 1024 * 1024

LOSSLESS_THRESHOLD = 1
LOSSY_THRESHOLD = 128
LOSSY_FORMATS = frozenset({"JPEG", "MPO", "JPEG2000", "WEBP"})

ImageInput = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray | torch.Tensor


class ImageLoadError(VisualADError, ValueError):
    """An image that cannot be read; `source` names it and `reason` says why, for reports of batch jobs."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------------
# Loading and conversion


def load_image(
    image: str | os.PathLike | Image.Image,
    *,
    timeout: float | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> Image.Image:
    """Open a path or URL (or take a PIL image), decode it fully and apply its EXIF orientation; keep its mode.

    Unlike `transformers.image_utils.load_image`, the image is *not* converted to RGB here: the authors resize before
    converting (SPEC §1). Every failure is an `ImageLoadError` naming the source and the reason (missing, empty, not an
    image, truncated or corrupt, or more than `max_pixels` pixels).

    Args:
        image: a local path, an `http(s)://` URL, or a PIL image.
        timeout: seconds a URL download may take (default `DEFAULT_URL_TIMEOUT`), see `download`.
        max_bytes: largest accepted download (default `DEFAULT_URL_MAX_BYTES`).
        max_pixels: largest accepted `width * height`, checked from the header before decoding, so that a
            decompression bomb is refused cheaply. Defaults to Pillow's `Image.MAX_IMAGE_PIXELS` (89,478,485 pixels,
            about 9459x9459, unless changed); `None` there means no limit.
    """
    if isinstance(image, Image.Image):
        _decode(image, getattr(image, "filename", "") or "<PIL image>")
        return apply_exif_orientation(image)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"load_image takes a path, URL or PIL image, got {type(image).__name__}")
    source = os.fspath(image)
    if source.startswith(("http://", "https://")):
        stream: Path | io.BytesIO = io.BytesIO(download(source, timeout=timeout, max_bytes=max_bytes))
    else:
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(source, "no such file")
        if not path.is_file():
            raise ImageLoadError(source, "not a file")
        if path.stat().st_size == 0:
            raise ImageLoadError(source, "empty file (0 bytes)")
        stream = path

    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        opened = Image.open(stream)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            source, f"decompression bomb refused by Pillow ({error}); raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine"
        ) from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(source, "not an image Pillow can read (unknown or unsupported format)") from error
    except OSError as error:
        raise ImageLoadError(source, f"cannot open ({error})") from error
    width, height = opened.size
    if limit is not None and width * height > limit:
        opened.close()
        raise ImageLoadError(
            source,
            f"{width}x{height} = {width * height:,} pixels exceeds the limit of {limit:,} "
            "(possible decompression bomb); raise max_pixels if the image is genuine",
        )
    _decode(opened, source)
    return apply_exif_orientation(opened)


def download(url: str, *, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
    """The body of `url`, refused when the server is silent or slow (no byte for `timeout` seconds, or the whole
    download longer than `timeout`) or sends more than `max_bytes` (declared or actually sent): a silent or endless
    server must not hang a pipeline forever. Every failure is an `ImageLoadError` naming the URL."""
    timeout = DEFAULT_URL_TIMEOUT if timeout is None else float(timeout)
    max_bytes = DEFAULT_URL_MAX_BYTES if max_bytes is None else int(max_bytes)
    deadline = time.monotonic() + timeout
    chunks, received = [], 0
    try:  # the HTTP client of the HF stack, as `transformers.image_utils.load_image` uses
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            response.raise_for_status()
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ImageLoadError(url, f"the server announces {int(declared):,} bytes, over the limit of {max_bytes:,}")
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > max_bytes:
                    raise ImageLoadError(url, f"more than {max_bytes:,} bytes sent, over the limit; not an image to read")
                if time.monotonic() > deadline:
                    raise ImageLoadError(url, f"download took longer than {timeout:g} s (timeout=); the server is too slow")
                chunks.append(chunk)
    except httpx.TimeoutException as error:
        raise ImageLoadError(url, f"download timed out after {timeout:g} s (no answer from the server)") from error
    except httpx.HTTPError as error:
        raise ImageLoadError(url, f"download failed ({error})") from error
    content = b"".join(chunks)
    if not content:
        raise ImageLoadError(url, "empty response (0 bytes)")
    return content


def _decode(image: Image.Image, source: str) -> None:
    """Decode a lazily opened image now, so that a truncated or corrupt file fails here with its name."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        image.close()
        raise ImageLoadError(source, f"cannot decode ({error}); the file is truncated or corrupt") from error


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip `image` as its EXIF orientation tag says (no copy when there is nothing to do)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001  (an unreadable EXIF block must not make a readable image fail)
        return image
    return image if orientation == 1 else ImageOps.exif_transpose(image)


def to_pil_image(
    image: ImageInput,
    *,
    bit_depth_scaling: BitDepthScaling = "range",
    timeout: float | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Any supported input as an 8-bit PIL image ready for the authors' resize-then-RGB transform.

    Accepts paths, URLs, PIL images, numpy arrays (`HW`, `HWC`, or `CHW`) and torch tensors (`CHW`, `HWC`, `HW`).
    The returned mode is one of `L`, `LA`, `RGB`, `RGBA`, `CMYK`, `RGBX`, `YCbCr`; an image already in one of them is
    returned as is. Conversions and their reasons are listed in the module docstring.
    """
    if isinstance(image, (str, os.PathLike, Image.Image)):
        source = os.fspath(image) if not isinstance(image, Image.Image) else getattr(image, "filename", "") or "<PIL image>"
        image = load_image(image, timeout=timeout, max_pixels=max_pixels)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        return _array_to_pil(image, bit_depth_scaling)
    else:
        raise TypeError(
            f"Unsupported image type {type(image).__name__}; pass a path, URL, PIL image, numpy array or torch tensor."
        )
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(source, f"zero-size image ({image.width}x{image.height}); there is nothing to score")
    mode = image.mode
    if mode in _RESIZE_IN_OWN_MODE:
        return image
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in _CONVERT_BEFORE_RESIZE:
        return image.convert(_CONVERT_BEFORE_RESIZE[mode])
    if mode in _HIGH_BIT_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image), bit_depth_scaling, source), mode="L")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert a PIL image of mode {mode!r} to RGB ({error}).") from error


def _array_to_pil(array: np.ndarray | torch.Tensor, bit_depth_scaling: BitDepthScaling) -> Image.Image:
    """numpy (channels last preferred) or torch (channels first preferred) image -> 8-bit PIL image."""
    source = f"<{'torch tensor' if isinstance(array, torch.Tensor) else 'numpy array'} of shape {tuple(array.shape)}>"
    if array.ndim >= 2 and 0 in tuple(array.shape):
        raise ImageLoadError(source, "zero-size image; there is nothing to score (was it cropped to nothing?)")
    array = to_hw_or_hwc(array)
    mode = "L" if array.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array, bit_depth_scaling, source)), mode=mode)


def to_hw_or_hwc(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """An image array as `[H, W]` or `[H, W, C]` (C in 2..4). Tensors are read as `CHW` and arrays as `HWC` when the
    shape allows both; a single channel is dropped."""
    channels_first = isinstance(array, torch.Tensor)
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16: compute in float32
            array = array.to(torch.float32)
        array = array.numpy()
    if array.ndim == 3:
        first, last = array.shape[0] in (1, 2, 3, 4), array.shape[-1] in (1, 2, 3, 4)
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise ValueError(f"Cannot tell the channel axis of an image array of shape {array.shape}; use HWC or CHW.")
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"An image array must have shape [H, W], [H, W, C] or [C, H, W], got {array.shape}.")
    return array


def _to_uint8(array: np.ndarray, bit_depth_scaling: BitDepthScaling, source: str = "<array>") -> np.ndarray:
    """Bring any numeric image array to uint8 (rules in the module docstring); `source` names it in errors."""
    if bit_depth_scaling not in BIT_DEPTH_SCALINGS:
        raise ValueError(f"bit_depth_scaling={bit_depth_scaling!r} is unknown; choose one of {BIT_DEPTH_SCALINGS}.")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - finite.sum())
        raise ImageLoadError(
            source, f"{bad:,} of {values.size:,} pixel values are NaN or infinite; the image has no valid intensities"
            if bad == values.size else f"{bad:,} of {values.size:,} pixel values are NaN or infinite; fix or mask them"
        )
    if np.issubdtype(array.dtype, np.floating) and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values * 255.0
    elif bit_depth_scaling == "full":
        scaled = values * (255.0 / _FULL_SCALE_16_BIT)
    else:
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image, a list/tuple of images, or a 4-D batch array/tensor -> list of single images."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


# ---------------------------------------------------------------------------------------------------------------------
# Masks


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


__all__ = [
    "BIT_DEPTH_SCALINGS",
    "DEFAULT_URL_MAX_BYTES",
    "DEFAULT_URL_TIMEOUT",
    "ImageLoadError",
    "apply_exif_orientation",
    "as_image_list",
    "binarize_mask",
    "download",
    "load_image",
    "mask_threshold",
    "to_hw_or_hwc",
    "to_pil_image",
]
