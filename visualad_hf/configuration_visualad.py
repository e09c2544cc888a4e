"""VisualAD model configuration."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

SAF_TYPES = ("mlp", "linear", "mlp_residual", "adapter", "leakyrelu")
POSITION_INTERPOLATION_MODES = ("bilinear", "bicubic", "backbone")
REFERENCE_FUSIONS = ("add", "replace")  # see visualad_hf/few_shot.py
SUPPORTED_BACKBONES = ("clip_vision_model", "dinov2", "dinov2_with_registers")

# CLIP ViT-L/14@336px, the backbone of the released checkpoint (SPEC §1).
CLIP_VIT_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}


@strict
class VisualADConfig(PreTrainedConfig):
    r"""
    Configuration of a [`VisualADModel`]: a frozen ViT backbone plus the VisualAD heads (two learnable tokens,
    one Spatial-Aware Cross-Attention and one Self-Alignment Function per feature layer).

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the frozen backbone: a `CLIPVisionConfig`, `Dinov2Config` or
            `Dinov2WithRegistersConfig` (or its dict with a `model_type`). Defaults to CLIP ViT-L/14@336px.
        feature_layers (`list[int]`, *optional*, defaults to `(6, 12, 18, 24)`):
            1-indexed backbone layers whose outputs produce an anomaly map each.
        num_anchors (`int`, *optional*, defaults to 4):
            Number of learnable anchor queries per Spatial-Aware Cross-Attention module.
        max_patches (`int`, *optional*, defaults to 1536):
            Rows of each SCA's learnable position table; the patch grid may not hold more patches than this.
        sca_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the SCA attention weights and on its output projection.
        res_scale_init (`float`, *optional*, defaults to 0.01):
            Initial value of the learnable residual scale of each SCA.
        saf_type (`str`, *optional*, defaults to `"mlp"`):
            Self-Alignment Function variant: `"mlp"` (released), `"linear"`, `"mlp_residual"`, `"adapter"`,
            `"leakyrelu"` (SPEC §3).
        saf_hidden_size (`int`, *optional*):
            Hidden width of the SAF; defaults to the backbone width.
        saf_dropout (`float`, *optional*, defaults to 0.1):
            Dropout inside the SAF.
        topk_ratio (`float`, *optional*, defaults to 0.01):
            Fraction of the map's pixels whose mean is the image score (SPEC §4).
        gaussian_sigma (`float`, *optional*, defaults to 4.0):
            Standard deviation, in pixels at model resolution, of the smoothing applied at inference.
        image_size (`int`, *optional*, defaults to 518):
            Square input size in pixels; must be a multiple of the backbone's patch size.
        position_interpolation (`str`, *optional*):
            How the backbone's patch position table is resized to the input grid: `"bilinear"` (the released CLIP
            checkpoint), `"bicubic"`, or `"backbone"` (the backbone's own `interpolate_pos_encoding`). Defaults to
            `"bilinear"` for CLIP and `"backbone"` for DINOv2.
        train_token_position_embeddings (`bool`, *optional*, defaults to `False`):
            Learn separate position embeddings for the two tokens. Off in the released code, where they stay equal
            to the CLS position embedding (SPEC §1).
        token_init_std (`float`, *optional*):
            Standard deviation of the token initialisation; defaults to `0.1 / sqrt(hidden_size)`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the anchors and SCA position tables.
        anomaly_threshold (`float`, *optional*):
            Decision threshold on the image score, set by calibration; travels with `save_pretrained`.
        threshold_calibration (`dict`, *optional*):
            How `anomaly_threshold` was obtained (method, parameters, number of images).
        reference_fusion (`str`, *optional*, defaults to `"add"`):
            How a few-shot reference bank (`model.set_reference`) enters each layer map: `"add"` (map + weight x
            normalised nearest-neighbour distance) or `"replace"` (the distance alone). See `visualad_hf.few_shot`.
        reference_weight (`float`, *optional*, defaults to 2.0):
            Weight of the normalised nearest-neighbour distance in the `"add"` fusion.
        reference_num_images (`int`, *optional*):
            Images in the model's reference bank (`reference_bank.safetensors` beside the weights); None: zero-shot.
    """

    model_type = "visualad"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_VIT_L14_336
        ),
    }

    vision_config: dict | PreTrainedConfig | None = None
    feature_layers: list[int] | tuple[int, ...] = (6, 12, 18, 24)
    num_anchors: int = 4
    max_patches: int = 1536
    sca_dropout: float = 0.1
    res_scale_init: float = 0.01
    saf_type: Literal["mlp", "linear", "mlp_residual", "adapter", "leakyrelu"] | str = "mlp"
    saf_hidden_size: int | None = None
    saf_dropout: float = 0.1
    topk_ratio: float = 0.01
    gaussian_sigma: float = 4.0
    image_size: int = 518
    position_interpolation: str | None = None
    train_token_position_embeddings: bool = False
    token_init_std: float | None = None
    initializer_range: float = 0.02
    anomaly_threshold: float | None = None
    threshold_calibration: dict | None = None
    reference_fusion: str = "add"
    reference_weight: float = 2.0
    reference_num_images: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.feature_layers = [int(layer) for layer in self.feature_layers]
        self._validate_visualad()

    @property
    def hidden_size(self) -> int:
        return self.vision_config.hidden_size

    @property
    def patch_size(self) -> int:
        return self.vision_config.patch_size

    @property
    def grid_size(self) -> int:
        """Patches per side of the (square) input."""
        return self.image_size // self.vision_config.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Backbone tokens before the patches: CLS plus any registers."""
        return 1 + int(getattr(self.vision_config, "num_register_tokens", 0) or 0)

    @property
    def resolved_position_interpolation(self) -> str:
        if self.position_interpolation is not None:
            return self.position_interpolation
        return "bilinear" if self.vision_config.model_type == "clip_vision_model" else "backbone"

    def _validate_visualad(self) -> None:
        backbone = self.vision_config.model_type
        if backbone not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"vision_config.model_type={backbone!r} is not supported; use one of {SUPPORTED_BACKBONES} "
                "(CLIPVisionConfig, Dinov2Config or Dinov2WithRegistersConfig)."
            )
        depth = self.vision_config.num_hidden_layers
        if not self.feature_layers:
            raise ValueError("feature_layers is empty: give at least one 1-indexed backbone layer, e.g. [6, 12, 18, 24].")
        bad = [layer for layer in self.feature_layers if not 1 <= layer <= depth]
        if bad:
            raise ValueError(
                f"feature_layers {bad} lie outside the backbone, which has layers 1..{depth} (1-indexed); "
                f"choose feature_layers within that range."
            )
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise ValueError(f"feature_layers {self.feature_layers} repeats a layer; list each layer once.")
        if self.saf_type not in SAF_TYPES:
            raise ValueError(f"saf_type={self.saf_type!r} is unknown; choose one of {SAF_TYPES}.")
        mode = self.position_interpolation
        if mode is not None and mode not in POSITION_INTERPOLATION_MODES:
            raise ValueError(
                f"position_interpolation={mode!r} is unknown; choose one of {POSITION_INTERPOLATION_MODES} or None."
            )
        patch = self.vision_config.patch_size
        if self.image_size <= 0 or self.image_size % patch:
            raise ValueError(
                f"image_size={self.image_size} is not a positive multiple of the backbone's patch size {patch}; "
                f"use e.g. {max(1, round(self.image_size / patch)) * patch}."
            )
        num_patches = self.grid_size**2
        if num_patches > self.max_patches:
            raise ValueError(
                f"image_size={self.image_size} gives a {self.grid_size}x{self.grid_size} grid of {num_patches} patches, "
                f"more than max_patches={self.max_patches}; lower image_size to at most "
                f"{int(self.max_patches**0.5) * patch} or raise max_patches."
            )
        if not 0 < self.topk_ratio <= 1:
            raise ValueError(f"topk_ratio={self.topk_ratio} must lie in (0, 1].")
        if self.gaussian_sigma < 0:
            raise ValueError(f"gaussian_sigma={self.gaussian_sigma} must be >= 0 (0 disables smoothing).")
        if self.num_anchors < 1 or self.max_patches < 1:
            raise ValueError("num_anchors and max_patches must be at least 1.")
        if self.reference_fusion not in REFERENCE_FUSIONS:
            raise ValueError(f"reference_fusion={self.reference_fusion!r} is unknown; choose one of {REFERENCE_FUSIONS}.")
        if self.reference_weight < 0:
            raise ValueError(f"reference_weight={self.reference_weight} must be >= 0.")


__all__ = ["VisualADConfig"]
