"""DINOv3 ViT (`dinov3_vit`): CLS + registers + patches, rotary position embeddings (RoPE) on the patches only."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .base import BILINEAR, BackboneAdapter, BackboneCard

DINOV3_CARD = BackboneCard(
    name="DINOv3 ViT-L/16",
    family="DINOv3 ViT",
    hub_id="facebook/dinov3-vitl16-pretrain-lvd1689m",
    # Not an open-source licence: Meta's DINOv3 License (gated on the Hub; read its terms before use).
    license="other",
    license_name="dinov3-license",
    license_title="DINOv3 License",
    license_link="https://ai.meta.com/resources/models-and-libraries/dinov3-license/",
    tag="dinov3",
    reference_shape=(1024, 24, 16),
)


class Dinov3Adapter(BackboneAdapter):
    """`DINOv3ViTModel`: layers at `model.layer`, final `norm`, no pre-norm, no absolute positions.

    RoPE is applied by every layer to the **last** `num_patches` tokens (`apply_rotary_pos_emb` splits off whatever
    comes first as prefix), so VisualAD's tokens, put in front, are treated like CLS and registers: no rotation. The
    RoPE tables come from the backbone's own `rope_embeddings` for the input grid and are passed to each layer.
    In `train()` that module randomly shifts, jitters and rescales the patch coordinates (a pre-training augmentation);
    a frozen backbone must see the positions it sees at inference, so it is kept in eval mode.
    The two tokens get no position embedding, as CLS has none in DINOv3 (`train_token_position_embeddings` learns one
    from zero).
    """

    model_types = ("dinov3_vit",)
    layer_class_names = ("DINOv3ViTLayer",)
    card = DINOV3_CARD
    image_mean = tuple(IMAGENET_DEFAULT_MEAN)
    image_std = tuple(IMAGENET_DEFAULT_STD)
    resample = BILINEAR  # DINOv3ViTImageProcessor
    position_interpolations = ("backbone",)
    default_position_interpolation = "backbone"

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + int(self.config.num_register_tokens or 0)

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.model.layer

    def final_norm(self, backbone: nn.Module) -> nn.Module:
        return backbone.norm

    def eval_only_modules(self, backbone: nn.Module) -> list[nn.Module]:
        return [backbone.rope_embeddings]

    def token_position(self, backbone: nn.Module) -> torch.Tensor:
        return backbone.norm.weight.new_zeros(self.hidden_size)

    def embed(self, backbone: nn.Module, pixel_values: torch.Tensor, interpolation: str) -> torch.Tensor:
        return backbone.embeddings(pixel_values.to(backbone.embeddings.patch_embeddings.weight.dtype))

    def layer_kwargs(self, backbone: nn.Module, pixel_values: torch.Tensor) -> dict[str, Any]:
        pixel_values = pixel_values.to(backbone.embeddings.patch_embeddings.weight.dtype)
        return {"position_embeddings": backbone.rope_embeddings(pixel_values)}


__all__ = ["DINOV3_CARD", "Dinov3Adapter"]
