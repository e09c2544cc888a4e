"""SigLIP and SigLIP2 fixed-resolution vision towers (`siglip_vision_model`, or the vision part of a full `siglip`
config). The fixed-resolution SigLIP2 checkpoints (e.g. `google/siglip2-large-patch16-512`) are `siglip` models."""

from __future__ import annotations

import torch
from torch import nn
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

from .base import TABLE_INTERPOLATIONS, BackboneAdapter, BackboneCard

SIGLIP_CARD = BackboneCard(
    name="SigLIP2 ViT-L/16@512px",
    family="SigLIP ViT",
    hub_id="google/siglip2-large-patch16-512",
    license="apache-2.0",
    tag="siglip",
    reference_shape=(1024, 24, 16),
    reference_image_size=512,
)


class SiglipAdapter(BackboneAdapter):
    """`SiglipVisionModel`: patches only (no CLS), a learned position table, no pre-norm, final `post_layernorm`.

    SigLIP pools with an attention head (`head`, frozen and unused here), so there is no CLS token and no CLS position
    to copy. The two tokens get the **mean of the patch position embeddings** (of the stored table): the position of
    "the whole image", on the scale of the other positions, and independent of the input size. Positions are resized
    by the backbone's own code by default (bicubic, `interpolate_pos_encoding`); at the native size nothing is resized.
    """

    model_types = ("siglip_vision_model",)
    container_model_types = ("siglip",)
    layer_class_names = ("SiglipEncoderLayer",)
    card = SIGLIP_CARD
    image_mean = tuple(IMAGENET_STANDARD_MEAN)
    image_std = tuple(IMAGENET_STANDARD_STD)
    position_interpolations = TABLE_INTERPOLATIONS
    default_position_interpolation = "backbone"

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.encoder.layers

    def final_norm(self, backbone: nn.Module) -> nn.Module:
        return backbone.post_layernorm

    def token_position(self, backbone: nn.Module) -> torch.Tensor:
        return backbone.embeddings.position_embedding.weight.mean(dim=0)

    def embed(self, backbone: nn.Module, pixel_values: torch.Tensor, interpolation: str) -> torch.Tensor:
        embeddings = backbone.embeddings
        if interpolation == "backbone":
            return embeddings(pixel_values, interpolate_pos_encoding=True)
        weight = embeddings.patch_embedding.weight
        patches = embeddings.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        table = embeddings.position_embedding.weight
        return patches + self.resize_position_grid(table, self.grid(pixel_values), interpolation)


__all__ = ["SIGLIP_CARD", "SiglipAdapter"]
