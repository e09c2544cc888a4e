"""VisualAD model configuration."""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.pipelines import PIPELINE_REGISTRY

from .backbones import TABLE_INTERPOLATIONS, BackboneAdapter, backbone_adapter
from .errors import VisualADError
from .remote_code import PIPELINE_TASK, with_auto_map, write_remote_code

SafType = Literal["mlp", "linear", "mlp_residual", "adapter", "leakyrelu"]
SAF_TYPES: tuple[str, ...] = get_args(SafType)
POSITION_INTERPOLATION_MODES = TABLE_INTERPOLATIONS
REFERENCE_FUSIONS = ("add", "replace")  # see visualad_hf/few_shot.py

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


def _task_registered_by_this_code() -> bool:
    """Whether the "anomaly-detection" task is registered, by the package this module belongs to."""
    impl = PIPELINE_REGISTRY.supported_tasks.get(PIPELINE_TASK, {}).get("impl")
    return impl is not None and impl.__module__.rpartition(".")[0] == __name__.rpartition(".")[0]


class VisualADConfigError(VisualADError, ValueError):
    """A `VisualADConfig` setting that cannot work; the message names the setting and a value that does."""


@strict
class VisualADConfig(PreTrainedConfig):
    r"""
    Configuration of a [`VisualADModel`]: a frozen ViT backbone plus the VisualAD heads (two learnable tokens,
    one Spatial-Aware Cross-Attention and one Self-Alignment Function per feature layer).

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the frozen backbone (or its dict with a `model_type`), of a family listed in
            `visualad_hf.backbones.ADAPTERS`: CLIP, DINOv2 (with or without registers), DINOv3, SigLIP/SigLIP2,
            SigLIP2 NaFlex, RADIO. Defaults to CLIP ViT-L/14@336px.
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
        image_size (`int`, *optional*):
            Square input size in pixels; must be a multiple of the backbone's patch size. Defaults to 518 for patch 14
            (SPEC §1) and, for other patch sizes, the largest multiple of the patch not above 518 (512 for patch 16).
        position_interpolation (`str`, *optional*):
            How the backbone's patch position table is resized to the input grid: `"bilinear"` (the released CLIP
            checkpoint), `"bicubic"`, or `"backbone"` (the backbone's own code). Defaults to `"bilinear"` for CLIP and
            `"backbone"` otherwise; families without a resizable table (RoPE, RADIO's CPE) accept only `"backbone"`.
        image_mean, image_std (`list[float]`, *optional*):
            Input normalisation, read from the backbone's preprocessor_config.json by `from_backbone`; `None` means
            the family's published constants. The image processor built by `from_model_config` uses them.
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
        final_layernorm_source (`str`, *optional*):
            Set by `visualad convert`: which final LayerNorm the converted weights hold. `"backbone"`: the
            backbone's own (CLIP `ln_post`), as the authors' released evaluation `test.py` used it for the paper's
            table; `"checkpoint"`: the one trained with the heads (`ln_post_weight`/`ln_post_bias` of the released
            checkpoint), as their `train.py` used it. `None` for models not converted from the release.
        reference_fusion (`str`, *optional*, defaults to `"add"`):
            How a few-shot reference bank (`model.set_reference`) enters each layer map: `"add"` (map + weight x
            normalised nearest-neighbour distance) or `"replace"` (the distance alone). See `visualad_hf.few_shot`.
        reference_weight (`float`, *optional*, defaults to 2.0):
            Weight of the normalised nearest-neighbour distance in the `"add"` fusion.
        reference_num_images (`int`, *optional*):
            Images in the model's reference bank (`reference_bank.safetensors` beside the weights); None: zero-shot.
    """

    model_type = "visualad"
    sub_configs_defaults = {  # noqa: RUF012  (transformers reads this class attribute; never mutated)
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
    saf_type: SafType = "mlp"
    saf_hidden_size: int | None = None
    saf_dropout: float = 0.1
    topk_ratio: float = 0.01
    gaussian_sigma: float = 4.0
    image_size: int | None = None
    position_interpolation: str | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    train_token_position_embeddings: bool = False
    token_init_std: float | None = None
    initializer_range: float = 0.02
    anomaly_threshold: float | None = None
    threshold_calibration: dict | None = None
    final_layernorm_source: Literal["backbone", "checkpoint"] | None = None
    reference_fusion: str = "add"
    reference_weight: float = 2.0
    reference_num_images: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.feature_layers = [int(layer) for layer in self.feature_layers]
        adapter = self.backbone_adapter  # fails here, with the supported families, for any other backbone
        if self.image_size is None:
            self.image_size = adapter.default_image_size()
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [float(v) for v in value])
        if _task_registered_by_this_code():
            # `import visualad_hf` registered the task with this very code: the installed pipeline serves it, not the
            # folder's copy (transformers would otherwise insist on trust_remote_code for a folder that names its own
            # pipeline). Code loaded from a folder keeps the entry, so `pipeline(model=folder, trust_remote_code=True)`
            # still finds its task there. `to_dict` writes the entry back.
            custom = dict(getattr(self, "custom_pipelines", None) or {})
            if custom.pop(PIPELINE_TASK, None) is not None:
                self.custom_pipelines = custom
        # The `validate_*` methods also run right after this (and whenever the config is saved); running them here
        # first raises their one-line VisualADConfigError rather than huggingface_hub's two-line wrapper of it.
        for validator in type(self).__class_validators__:
            validator(self)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> tuple[dict, dict]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise VisualADConfigError(
                f"{pretrained_model_name_or_path}: its config.json describes a {model_type!r} model, which has no "
                f"VisualAD heads; put fresh heads on that backbone with "
                f"VisualADModel.from_backbone({str(pretrained_model_name_or_path)!r}), or load a folder written by "
                "VisualADModel.save_pretrained."
            )
        return config_dict, kwargs

    def to_dict(self) -> dict[str, Any]:
        """The config as saved: with the `auto_map` and `custom_pipelines` that make its folder self-contained."""
        return with_auto_map(super().to_dict(), pipelines=True)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Save `config.json` and the model-side code it names in `auto_map` (see `visualad_hf.remote_code`).

        The `validate_*` checks run first, so an invalid config is never written.
        """
        try:
            self.validate()
        except StrictDataclassClassValidationError as error:
            raise (error.__cause__ if isinstance(error.__cause__, VisualADConfigError) else error) from None
        write_remote_code(save_directory)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def backbone_adapter(self) -> BackboneAdapter:
        """How VisualAD reaches into this backbone family (`visualad_hf.backbones`)."""
        return backbone_adapter(self.vision_config)

    @property
    def hidden_size(self) -> int:
        return self.backbone_adapter.hidden_size

    @property
    def patch_size(self) -> int:
        return self.backbone_adapter.patch_size

    @property
    def grid_size(self) -> int:
        """Patches per side of the (square) input."""
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Backbone tokens before the patches (CLS, registers; none for SigLIP)."""
        return self.backbone_adapter.num_prefix_tokens

    @property
    def resolved_position_interpolation(self) -> str:
        if self.position_interpolation is not None:
            return self.position_interpolation
        return self.backbone_adapter.default_position_interpolation

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        """Input mean/std: the stored ones, else the family's published constants."""
        mean, std = self.backbone_adapter.normalization()
        return (self.image_mean or mean), (self.image_std or std)

    # Invariants, as public `validate_*` methods: huggingface_hub's @strict runs them after __init__ and
    # transformers runs them again in `save_pretrained`, so an invalid config is never written.

    def validate_backbone(self) -> None:
        self.backbone_adapter  # noqa: B018 - raises UnsupportedBackboneError, listing the supported families

    def validate_feature_layers(self) -> None:
        depth = self.backbone_adapter.num_layers
        if not self.feature_layers:
            raise VisualADConfigError(
                "feature_layers is empty: give at least one 1-indexed backbone layer, e.g. [6, 12, 18, 24]."
            )
        bad = [layer for layer in self.feature_layers if not 1 <= layer <= depth]
        if bad:
            raise VisualADConfigError(
                f"feature_layers {bad} lie outside the backbone, which has layers 1..{depth} (1-indexed); "
                f"choose feature_layers within that range."
            )
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise VisualADConfigError(f"feature_layers {self.feature_layers} repeats a layer; list each layer once.")

    def validate_heads(self) -> None:
        if self.saf_type not in SAF_TYPES:  # the Literal type is checked on assignment; this covers dict edits
            raise VisualADConfigError(f"saf_type={self.saf_type!r} is unknown; choose one of {SAF_TYPES}.")
        if self.num_anchors < 1 or self.max_patches < 1:
            raise VisualADConfigError(
                f"num_anchors={self.num_anchors} and max_patches={self.max_patches} must be at least 1."
            )

    def validate_position_interpolation(self) -> None:
        mode = self.position_interpolation
        if mode is not None and mode not in POSITION_INTERPOLATION_MODES:
            raise VisualADConfigError(
                f"position_interpolation={mode!r} is unknown; choose one of {POSITION_INTERPOLATION_MODES} or None."
            )
        adapter = self.backbone_adapter
        if mode is not None and mode not in adapter.position_interpolations:
            raise VisualADConfigError(
                f"position_interpolation={mode!r} does not apply to {adapter.card.family} backbones, whose positions "
                f"only their own code computes; use one of {adapter.position_interpolations} or None."
            )

    def validate_normalization(self) -> None:
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            positive = name == "image_std"
            if value is not None and (len(value) != 3 or (positive and min(value) <= 0)):
                raise VisualADConfigError(
                    f"{name}={value} must hold 3 values (R, G, B){', all > 0' if positive else ''}."
                )

    def validate_input_size(self) -> None:
        patch = self.patch_size
        if self.image_size <= 0 or self.image_size % patch:
            raise VisualADConfigError(
                f"image_size={self.image_size} is not a positive multiple of the backbone's patch size {patch}; "
                f"use e.g. {max(1, round(self.image_size / patch)) * patch}."
            )
        num_patches = self.grid_size**2
        if num_patches > self.max_patches:
            raise VisualADConfigError(
                f"image_size={self.image_size} gives a {self.grid_size}x{self.grid_size} grid of {num_patches} patches, "
                f"more than max_patches={self.max_patches}; lower image_size to at most "
                f"{int(self.max_patches**0.5) * patch} or raise max_patches."
            )

    def validate_scoring(self) -> None:
        if not 0 < self.topk_ratio <= 1:
            raise VisualADConfigError(f"topk_ratio={self.topk_ratio} must lie in (0, 1], e.g. 0.01 (the top 1 %).")
        if self.gaussian_sigma < 0:
            raise VisualADConfigError(f"gaussian_sigma={self.gaussian_sigma} must be >= 0 (0 disables smoothing).")

    def validate_reference(self) -> None:
        """The few-shot reference fusion (see `visualad_hf.few_shot`)."""
        if self.reference_fusion not in REFERENCE_FUSIONS:
            raise VisualADConfigError(
                f"reference_fusion={self.reference_fusion!r} is unknown; choose one of {REFERENCE_FUSIONS}."
            )
        if self.reference_weight < 0:
            raise VisualADConfigError(f"reference_weight={self.reference_weight} must be >= 0 (e.g. the default 2.0).")


__all__ = ["VisualADConfig", "VisualADConfigError"]
