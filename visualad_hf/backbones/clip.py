"""CLIP vision towers (`clip_vision_model`, or the vision part of a full `clip` config): the paper's main backbone."""

from __future__ import annotations

import torch
from torch import nn
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .base import TABLE_INTERPOLATIONS, BackboneAdapter, BackboneCard
from .paper import paper_results

CLIP_CARD = BackboneCard(
    name="CLIP ViT-L/14@336px",
    family="CLIP ViT",
    hub_id="openai/clip-vit-large-patch14-336",
    license="mit",
    tag="clip",
    reference_shape=(1024, 24, 14),
    reference_image_size=336,
    released_checkpoints=True,
    paper_results=paper_results(
        {
            "MVTec-AD": (92.2, 93.2, 96.7, 90.8, 43.9, 41.2, 87.5),
            "VisA": (84.7, 82.5, 87.6, 95.8, 34.6, 28.4, 91.0),
            "BTAD": (94.9, 93.9, 97.0, 91.1, 49.8, 43.1, 80.4),
            "KSDD2": (98.0, 93.9, 98.3),
            "DAGM": (99.5, 95.0, 97.8),
            "DTD-Synthetic": (97.5, 96.6, 99.1, 98.1, 64.3, 65.5, 94.8),
        }
    ),
)


class ClipAdapter(BackboneAdapter):
    """`CLIPVisionModel`: CLS + patches with a learned position table, `pre_layrnorm`, `post_layernorm`.

    The released checkpoint resizes the native position grid **bilinearly** (SPEC §1), which HF's own
    `interpolate_pos_encoding` (bicubic) does not reproduce, so bilinear is the default here. The two tokens get the
    CLS position embedding.
    """

    model_types = ("clip_vision_model",)
    container_model_types = ("clip",)
    layer_class_names = ("CLIPEncoderLayer",)
    card = CLIP_CARD
    image_mean = tuple(OPENAI_CLIP_MEAN)
    image_std = tuple(OPENAI_CLIP_STD)
    position_interpolations = TABLE_INTERPOLATIONS
    default_position_interpolation = "bilinear"

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.encoder.layers

    def final_norm(self, backbone: nn.Module) -> nn.Module:
        return backbone.post_layernorm

    def pre_norm(self, backbone: nn.Module) -> nn.Module:
        return backbone.pre_layrnorm

    def token_position(self, backbone: nn.Module) -> torch.Tensor:
        return backbone.embeddings.position_embedding.weight[0]

    def embed(self, backbone: nn.Module, pixel_values: torch.Tensor, interpolation: str) -> torch.Tensor:
        embeddings = backbone.embeddings
        if interpolation == "backbone":
            return embeddings(pixel_values, interpolate_pos_encoding=True)
        table = embeddings.position_embedding.weight
        patch_positions = self.resize_position_grid(table[1:], self.grid(pixel_values), interpolation)
        positions = torch.cat([table[:1], patch_positions])
        weight = embeddings.patch_embedding.weight
        patches = embeddings.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls = embeddings.class_embedding.expand(pixel_values.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + positions


__all__ = ["CLIP_CARD", "ClipAdapter"]
