"""Image processor for VisualAD: preprocessing (SPEC §1), masks (SPEC §5), and scores and maps (SPEC §4).

Works without torchvision: images are resized with PIL and normalised with torch.

Image modes. The authors' transform resizes the image *in its own mode* (PIL bicubic) and only then converts it to RGB;
for `RGBA`/`LA` Pillow resizes with premultiplied alpha, so the order changes the numbers. This processor keeps that
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
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from huggingface_hub.utils import httpx
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .modeling_visualad import topk_mean

logger = logging.get_logger(__name__)

BitDepthScaling = Literal["range", "full"]
BIT_DEPTH_SCALINGS = ("range", "full")

# Modes resized as they are, then converted to RGB: the authors' order (SPEC §1).
_RESIZE_IN_OWN_MODE = {"RGB", "L", "RGBA", "LA", "CMYK", "RGBX", "YCbCr"}
# Modes converted to an 8-bit mode before resizing, and to which one.
_CONVERT_BEFORE_RESIZE = {"1": "L", "PA": "RGBA", "HSV": "RGB", "LAB": "RGB", "La": "LA", "RGBa": "RGBA"}
_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_EXIF_ORIENTATION_TAG = 0x0112
_FULL_SCALE_16_BIT = 65535.0
_CPU_CHUNK_ELEMENTS = 2**18  # map values smoothed together on CPU: 1 MiB of float32, about one core's L2 cache

ImageInput = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray | torch.Tensor


class ImageLoadError(ValueError):
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
) -> Image.Image:
    """Open a path or URL (or take a PIL image), decode it fully and apply its EXIF orientation; keep its mode.

    Unlike `transformers.image_utils.load_image`, the image is *not* converted to RGB here: the authors resize before
    converting (SPEC §1). Every failure is an `ImageLoadError` naming the source and the reason (missing, empty, not an
    image, truncated or corrupt, or more than `max_pixels` pixels).

    Args:
        image: a local path, an `http(s)://` URL, or a PIL image.
        timeout: seconds to wait for a URL.
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
        try:  # the HTTP client of the HF stack, as `transformers.image_utils.load_image` uses
            response = httpx.get(source, timeout=timeout, follow_redirects=True)
            response.raise_for_status()
            content = response.content
        except httpx.HTTPError as error:
            raise ImageLoadError(source, f"download failed ({error})") from error
        if not content:
            raise ImageLoadError(source, "empty response (0 bytes)")
        stream: Path | io.BytesIO = io.BytesIO(content)
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
    except Exception:  # an unreadable EXIF block must not make a readable image fail
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
        image = load_image(image, timeout=timeout, max_pixels=max_pixels)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        return _array_to_pil(image, bit_depth_scaling)
    else:
        raise TypeError(
            f"Unsupported image type {type(image).__name__}; pass a path, URL, PIL image, numpy array or torch tensor."
        )
    mode = image.mode
    if mode in _RESIZE_IN_OWN_MODE:
        return image
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in _CONVERT_BEFORE_RESIZE:
        return image.convert(_CONVERT_BEFORE_RESIZE[mode])
    if mode in _HIGH_BIT_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image), bit_depth_scaling), mode="L")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert a PIL image of mode {mode!r} to RGB ({error}).") from error


def _array_to_pil(array: np.ndarray | torch.Tensor, bit_depth_scaling: BitDepthScaling) -> Image.Image:
    """numpy (channels last preferred) or torch (channels first preferred) image -> 8-bit PIL image."""
    array = _to_hw_or_hwc(array)
    mode = "L" if array.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array, bit_depth_scaling)), mode=mode)


def _to_hw_or_hwc(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """An image array as `[H, W]` or `[H, W, C]` (C in 2..4). Tensors are read as `CHW` and arrays as `HWC` when the
    shape allows both; a single channel is dropped."""
    channels_first = isinstance(array, torch.Tensor)
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
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


def _to_uint8(array: np.ndarray, bit_depth_scaling: BitDepthScaling) -> np.ndarray:
    """Bring any numeric image array to uint8 (rules in the module docstring)."""
    if bit_depth_scaling not in BIT_DEPTH_SCALINGS:
        raise ValueError(f"bit_depth_scaling={bit_depth_scaling!r} is unknown; choose one of {BIT_DEPTH_SCALINGS}.")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("The image holds NaN or infinite values.")
    if np.issubdtype(array.dtype, np.floating) and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values * 255.0
    elif bit_depth_scaling == "full":
        scaled = values * (255.0 / _FULL_SCALE_16_BIT)
    else:
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image, a list/tuple of images, or a 4-D batch array/tensor -> list of single images."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


# ---------------------------------------------------------------------------------------------------------------------
# Gaussian smoothing with scipy.ndimage.gaussian_filter's conventions, batched in torch


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> list[float]:
    """The 1-D kernel `scipy.ndimage.gaussian_filter1d` uses: radius `int(truncate * sigma + 0.5)`, normalised."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 / (float(sigma) ** 2) * offsets**2)
    return (weights / weights.sum()).tolist()


def _reflect_indices(length: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source index of each padded position under scipy's "reflect" ('dcba|abcd|dcba'), for any radius.

    torch's `F.pad(mode="reflect")` is scipy's "mirror" ('dcb|abcd|cba') and refuses pads larger than the input, so
    the index is computed directly: the extended signal has period `2 * length`.
    """
    index = torch.arange(-radius, length + radius, device=device).remainder(2 * length)
    return torch.where(index >= length, 2 * length - 1 - index, index)


def _smooth_along(maps: torch.Tensor, weights: list[float], dim: int) -> torch.Tensor:
    length = maps.shape[dim]
    radius = (len(weights) - 1) // 2
    padded = maps.index_select(dim, _reflect_indices(length, radius, maps.device))
    # A shifted multiply-add per tap: measured faster on CPU than conv1d/conv2d for 33 taps on 518-px maps.
    smoothed = padded.narrow(dim, 0, length) * weights[0]
    for offset in range(1, len(weights)):
        smoothed.add_(padded.narrow(dim, offset, length), alpha=weights[offset])
    return smoothed


def gaussian_smooth(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Smooth the last two axes of `maps` (`[..., H, W]`) as `scipy.ndimage.gaussian_filter(m, sigma)` does per map.

    Same kernel, radius and "reflect" boundary (valid for maps smaller than the kernel too), computed in torch on the
    maps' device. Half-precision maps are smoothed in float32; float64 maps stay float64 (scipy accumulates in float64,
    so this is the exact mode). `sigma == 0` returns the maps unchanged.
    """
    if sigma < 0:
        raise ValueError(f"sigma={sigma} must be >= 0.")
    if sigma == 0:
        return maps
    if maps.ndim < 2:
        raise ValueError(f"maps must have at least 2 dimensions [..., H, W], got shape {tuple(maps.shape)}.")
    work = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
    weights = gaussian_kernel1d(sigma, truncate)
    height, width = work.shape[-2:]
    flat = work.reshape(-1, height, width)
    # On CPU the passes are memory-bound: chunks that stay in a core's cache run about twice as fast as the whole
    # batch at once (8 maps of 518x518: 21-30 ms per chunked batch vs 49-77 ms batched, scipy 46-53 ms; 1 thread).
    per_chunk = flat.shape[0] if flat.device.type != "cpu" else max(1, _CPU_CHUNK_ELEMENTS // (height * width))
    # scipy filters axis 0 (rows) first, then axis 1; keep its order so rounding matches.
    smoothed = [
        _smooth_along(_smooth_along(chunk, weights, dim=-2), weights, dim=-1) for chunk in flat.split(per_chunk)
    ]
    return (smoothed[0] if len(smoothed) == 1 else torch.cat(smoothed)).reshape(work.shape)


# ---------------------------------------------------------------------------------------------------------------------
# The image processor


class VisualADImageProcessorKwargs(ImagesKwargs, total=False):
    """VisualAD's settings beyond the standard image-processor ones.

    gaussian_sigma (`float`): smoothing of the anomaly map at model resolution before scoring (0 disables it).
    topk_ratio (`float`): fraction of the smoothed map's pixels whose mean is the image score.
    bit_depth_scaling (`str`): `"range"` or `"full"`, how 16-bit/32-bit/float images become 8-bit.
    mask_threshold (`int`): mask values `>=` this are anomalous; `None` uses `visualad_hf.data.masks`' per-format rule
        (1, i.e. the authors' `> 0`, for lossless files and arrays; 128 for JPEG masks).
    """

    gaussian_sigma: float
    topk_ratio: float
    bit_depth_scaling: str
    mask_threshold: int | None


class VisualADImageProcessor(PilBackend):
    r"""
    Prepares images (and optional ground-truth masks) for [`VisualADModel`], and turns its outputs into image scores
    and anomaly maps.

    Preprocessing (SPEC §1): resize to `size` with PIL bicubic in the image's own mode, convert to RGB, divide by 255,
    normalise with `image_mean`/`image_std` (CLIP's by default; DINOv2 models use ImageNet's, see
    [`~VisualADImageProcessor.from_model_config`]). Inputs: paths, URLs, PIL images, numpy arrays, torch tensors, or a
    list of them; see the module docstring for image modes, bit depth and EXIF orientation.

    Masks (SPEC §5): binarised by `visualad_hf.data.masks.binarize_mask` (the authors' `> 0` for lossless files,
    `>= 128` for JPEG masks, or `>= mask_threshold` when set), resized to `size` with PIL bilinear and thresholded at
    0.5, giving `masks` as float {0, 1} of shape `[B, H, W]`. `None` stands for the all-zero mask of a normal image;
    a mask must have its image's size.

    Post-processing (SPEC §4): see [`~VisualADImageProcessor.post_process_anomaly_detection`]. `gaussian_sigma` and
    `topk_ratio` default to the model config's values when the processor is built with `from_model_config`; the
    anomaly-detection pipeline always passes the model config's values, so the model config is the single source of
    truth whenever a model is present.

    Args:
        size (`dict[str, int]` or `int`, *optional*, defaults to 518): model input size.
        image_mean, image_std (*optional*): normalisation, CLIP's by default.
        gaussian_sigma (`float`, *optional*, defaults to 4.0), topk_ratio (`float`, *optional*, defaults to 0.01):
            post-processing settings.
        bit_depth_scaling (`str`, *optional*, defaults to `"range"`): `"range"` or `"full"`.
        mask_threshold (`int`, *optional*): mask values `>=` it are anomalous; default: the per-format rule.
    """

    valid_kwargs = VisualADImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 518, "width": 518}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    gaussian_sigma = 4.0
    topk_ratio = 0.01
    bit_depth_scaling = "range"
    mask_threshold = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.bit_depth_scaling not in BIT_DEPTH_SCALINGS:
            raise ValueError(
                f"bit_depth_scaling={self.bit_depth_scaling!r} is unknown; choose one of {BIT_DEPTH_SCALINGS}."
            )
        if self.gaussian_sigma < 0 or not 0 < self.topk_ratio <= 1:
            raise ValueError(
                f"gaussian_sigma={self.gaussian_sigma} must be >= 0 and topk_ratio={self.topk_ratio} in (0, 1]."
            )
        if not self.do_convert_rgb:
            raise ValueError("VisualAD models take RGB input; do_convert_rgb cannot be False.")

    @classmethod
    def from_model_config(cls, config, **kwargs) -> VisualADImageProcessor:
        """The processor matching a `VisualADConfig`: its input size, smoothing and top-k ratio, and the backbone's
        normalisation and resampling (`config.normalization`: the stored mean/std, else the family's published
        constants; the family's resampling filter, `visualad_hf.backbones`). `kwargs` override."""
        image_mean, image_std = config.normalization
        defaults = dict(
            size={"height": config.image_size, "width": config.image_size},
            image_mean=list(image_mean),
            image_std=list(image_std),
            resample=int(config.backbone_adapter.resample),
            gaussian_sigma=float(config.gaussian_sigma),
            topk_ratio=float(config.topk_ratio),
        )
        return cls(**{**defaults, **kwargs})

    def preprocess(self, images, masks=None, **kwargs) -> BatchFeature:
        """Prepare `images` (and `masks`, one per image or `None`) for the model.

        Returns a `BatchFeature` with `pixel_values` `[B, 3, H, W]` float32 (and `masks` `[B, H, W]` float32 in {0,1}).
        `return_tensors` defaults to `"pt"`; `"np"` gives numpy arrays.
        """
        kwargs.setdefault("return_tensors", "pt")
        return super().preprocess(images, masks, **kwargs)

    def _preprocess_image_like_inputs(self, images, masks=None, **kwargs) -> BatchFeature:
        image_list = _as_image_list(images)
        if not image_list:
            raise ValueError("No images given.")
        pil_images = [to_pil_image(image, bit_depth_scaling=kwargs["bit_depth_scaling"]) for image in image_list]
        data = {"pixel_values": self._pixel_values(pil_images, **kwargs)}
        if masks is not None:
            mask_list = (
                [masks] if not isinstance(masks, (list, tuple)) and len(image_list) == 1 else _as_image_list(masks)
            )
            if len(mask_list) != len(image_list):
                raise ValueError(
                    f"Got {len(mask_list)} masks for {len(image_list)} images; give one per image (None for normal)."
                )
            data["masks"] = self._masks(mask_list, pil_images, **kwargs)
        return_tensors = kwargs.get("return_tensors")
        if return_tensors in ("np", "numpy"):
            data = {key: value.numpy() for key, value in data.items()}
        elif return_tensors not in ("pt", "torch", None):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or 'np'.")
        return BatchFeature(data=data)

    def _pixel_values(
        self,
        images: list[Image.Image],
        do_resize: bool,
        size,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        **kwargs,
    ) -> torch.Tensor:
        arrays = []
        for image in images:
            if do_resize:
                image = image.resize((size.width, size.height), resample=PILImageResampling(resample))
            arrays.append(np.asarray(image.convert("RGB")))
        shapes = {array.shape for array in arrays}
        if len(shapes) > 1:
            raise ValueError(f"Images of different sizes {sorted(shapes)} cannot be batched with do_resize=False.")
        # Channels-first while still uint8 (a cheap copy), so that the float passes below run on contiguous memory.
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(torch.float32)
        if do_rescale:
            # Dividing by 1/rescale_factor is bit-identical to the authors' ToTensor (x / 255) for the default.
            pixels.div_(1.0 / rescale_factor)
        if do_normalize:
            mean = torch.tensor(image_mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(image_std, dtype=torch.float32).view(-1, 1, 1)
            pixels.sub_(mean).div_(std)
        return pixels

    def _masks(
        self, masks: list, images: list[Image.Image], size, mask_threshold: int | None, **kwargs
    ) -> torch.Tensor:
        from .data.masks import binarize_mask  # the project's one definition of an anomalous mask pixel

        height, width = size.height, size.width
        out = torch.zeros(len(masks), height, width, dtype=torch.float32)
        for index, (mask, image) in enumerate(zip(masks, images, strict=True)):
            if mask is None:
                continue
            if isinstance(mask, (str, os.PathLike)):
                mask = load_image(mask)
            elif isinstance(mask, Image.Image):
                mask = apply_exif_orientation(mask)
            elif isinstance(mask, (np.ndarray, torch.Tensor)):
                mask = _to_hw_or_hwc(mask)
            else:
                raise TypeError(
                    f"Unsupported mask type {type(mask).__name__}; pass a path, PIL image, array or tensor."
                )
            binary = binarize_mask(mask, mask_threshold)
            if binary.shape != (image.height, image.width):
                raise ValueError(
                    f"Mask {index} is {binary.shape[1]}x{binary.shape[0]} but its image is "
                    f"{image.width}x{image.height}; a mask must have its image's size (is it this image's mask?)."
                )
            resized = Image.fromarray(binary.astype(np.uint8) * 255, mode="L").resize(
                (width, height), resample=Image.Resampling.BILINEAR
            )
            out[index] = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0 > 0.5)
        return out

    def post_process_anomaly_detection(
        self,
        outputs,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        gaussian_sigma: float | None = None,
        topk_ratio: float | None = None,
    ) -> list[dict[str, Any]]:
        """Image scores and displayable anomaly maps from the model's output (SPEC §4).

        The unsmoothed `anomaly_map` `[B, H, W]` is smoothed with `gaussian_smooth` (scipy's conventions) at model
        resolution, on its device; `score` is the mean of the top `topk_ratio` fraction of the smoothed map.

        Args:
            outputs: a `VisualADOutput` (or anything with `.anomaly_map`), or the `[B, H, W]` map itself.
            target_sizes: `(height, width)` per image; each smoothed map is resized to it bilinearly
                (`align_corners=False`). `None` keeps the model resolution.
            gaussian_sigma, topk_ratio: override the processor's values (the pipeline passes the model config's).

        Returns:
            One dict per image: `score` (float) and `anomaly_map` (float32 tensor `[h, w]` on the maps' device).
        """
        sigma = self.gaussian_sigma if gaussian_sigma is None else gaussian_sigma
        ratio = self.topk_ratio if topk_ratio is None else topk_ratio
        maps = outputs if isinstance(outputs, torch.Tensor) else outputs.anomaly_map
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.ndim != 3:
            raise ValueError(f"anomaly_map must have shape [B, H, W], got {tuple(maps.shape)}.")
        smoothed = gaussian_smooth(maps.float() if maps.dtype != torch.float64 else maps, sigma)
        scores = topk_mean(smoothed, ratio).tolist()
        if target_sizes is not None and len(target_sizes) != len(scores):
            raise ValueError(f"Got {len(target_sizes)} target sizes for {len(scores)} maps.")
        results = []
        for index, score in enumerate(scores):
            anomaly_map = smoothed[index]
            if target_sizes is not None:
                target = tuple(int(value) for value in target_sizes[index])
                if target != tuple(anomaly_map.shape):
                    anomaly_map = F.interpolate(
                        anomaly_map[None, None], size=target, mode="bilinear", align_corners=False
                    )[0, 0]
            results.append({"score": float(score), "anomaly_map": anomaly_map})
        return results


__all__ = [
    "ImageLoadError",
    "VisualADImageProcessor",
    "gaussian_kernel1d",
    "gaussian_smooth",
    "load_image",
    "to_pil_image",
]
