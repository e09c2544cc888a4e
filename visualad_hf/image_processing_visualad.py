"""Image processor for VisualAD: preprocessing (SPEC §1), masks (SPEC §5), and scores and maps (SPEC §4).

Works without torchvision: images are resized with PIL and normalised with torch.

Image modes, bit depth, EXIF orientation and mask rules: see `image_io`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .errors import VisualADError
from .image_io import (
    BIT_DEPTH_SCALINGS,
    ImageLoadError,
    apply_exif_orientation,
    as_image_list,
    binarize_mask,
    load_image,
    to_hw_or_hwc,
    to_pil_image,
)
from .remote_code import with_auto_map, write_remote_code
from .scoring import gaussian_kernel1d, gaussian_smooth, topk_mean

logger = logging.get_logger(__name__)


class ImageProcessorSettingError(VisualADError, ValueError):
    """An image-processor setting VisualAD cannot use (at construction or per call); the message says which."""


def _check_convert_rgb(do_convert_rgb: bool | None) -> None:
    if do_convert_rgb is False:
        raise ImageProcessorSettingError(
            "VisualAD models take RGB input; do_convert_rgb cannot be False (leave it unset: every image, including "
            "grayscale, RGBA or 4-channel arrays, is converted to RGB after resizing)."
        )


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

    Preprocessing (SPEC §1): resize to `size` with PIL bicubic (`resample`) in the image's own mode, convert to RGB,
    divide by 255, normalise with `image_mean`/`image_std` (CLIP's by default; a processor made by
    [`~VisualADImageProcessor.from_model_config`] takes the backbone family's normalisation and resampling). Inputs: paths, URLs, PIL images, numpy arrays, torch tensors, or a
    list of them; see the module docstring for image modes, bit depth and EXIF orientation.

    Masks (SPEC §5): binarised by `visualad_hf.image_io.binarize_mask` (the authors' `> 0` for lossless files,
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
        resample (*optional*, defaults to bicubic): PIL filter of the resize.
        gaussian_sigma (`float`, *optional*, defaults to 4.0), topk_ratio (`float`, *optional*, defaults to 0.01):
            post-processing settings.
        bit_depth_scaling (`str`, *optional*, defaults to `"range"`): `"range"` or `"full"`.
        mask_threshold (`int`, *optional*): mask values `>=` it are anomalous; default: the per-format rule.
    """

    valid_kwargs = VisualADImageProcessorKwargs
    model_input_names = ["pixel_values"]  # noqa: RUF012  (transformers' class-attribute convention)

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 518, "width": 518}  # noqa: RUF012  (copied per instance by the backend)
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
            raise ImageProcessorSettingError(
                f"bit_depth_scaling={self.bit_depth_scaling!r} is unknown; choose one of {BIT_DEPTH_SCALINGS}."
            )
        if self.gaussian_sigma < 0 or not 0 < self.topk_ratio <= 1:
            raise ImageProcessorSettingError(
                f"gaussian_sigma={self.gaussian_sigma} must be >= 0 and topk_ratio={self.topk_ratio} in (0, 1]."
            )
        _check_convert_rgb(bool(self.do_convert_rgb))

    def to_dict(self) -> dict[str, Any]:
        """The processor as saved, with the `auto_map` entry that lets AutoImageProcessor load its folder's code."""
        return with_auto_map(super().to_dict(), classes=("AutoImageProcessor",))

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Save `preprocessor_config.json` and the model-side code (see `visualad_hf.remote_code`)."""
        write_remote_code(save_directory)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> VisualADImageProcessor:
        """The processor matching a `VisualADConfig`: its input size, smoothing and top-k ratio, and the backbone's
        normalisation and resampling (`config.normalization`: the stored mean/std, else the family's published
        constants; the family's resampling filter, `visualad_hf.backbones`). `kwargs` override."""
        image_mean, image_std = config.normalization
        defaults = {
            "size": {"height": config.image_size, "width": config.image_size},
            "image_mean": list(image_mean),
            "image_std": list(image_std),
            "resample": int(config.backbone_adapter.resample),
            "gaussian_sigma": float(config.gaussian_sigma),
            "topk_ratio": float(config.topk_ratio),
        }
        return cls(**{**defaults, **kwargs})

    def preprocess(self, images, masks=None, **kwargs) -> BatchFeature:
        """Prepare `images` (and `masks`, one per image or `None`) for the model.

        Returns a `BatchFeature` with `pixel_values` `[B, 3, H, W]` float32 (and `masks` `[B, H, W]` float32 in {0,1}).
        `return_tensors` defaults to `"pt"`; `"np"` gives numpy arrays.
        """
        kwargs.setdefault("return_tensors", "pt")
        return super().preprocess(images, masks, **kwargs)

    def _preprocess_image_like_inputs(self, images, masks=None, **kwargs) -> BatchFeature:
        _check_convert_rgb(kwargs.get("do_convert_rgb"))
        image_list = as_image_list(images)
        if not image_list:
            raise ValueError("No images given.")
        pil_images = [to_pil_image(image, bit_depth_scaling=kwargs["bit_depth_scaling"]) for image in image_list]
        data = {"pixel_values": self._pixel_values(pil_images, **kwargs)}
        if masks is not None:
            mask_list = (
                [masks] if not isinstance(masks, (list, tuple)) and len(image_list) == 1 else as_image_list(masks)
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
                mask = to_hw_or_hwc(mask)
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
        if getattr(outputs, "is_smoothed", False):  # an exported graph's map (visualad_hf.export) is smoothed
            sigma = 0.0
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
