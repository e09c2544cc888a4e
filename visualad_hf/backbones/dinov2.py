"""DINOv2 (`dinov2`) and DINOv2 with registers (`dinov2_with_registers`): the paper's second backbone."""

from __future__ import annotations

import torch
from torch import nn
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .base import TABLE_INTERPOLATIONS, BackboneAdapter, BackboneCard
from .paper import paper_results

DINOV2_CARD = BackboneCard(
    name="DINOv2 ViT-L/14",
    family="DINOv2 ViT",
    hub_id="facebook/dinov2-large",
    license="apache-2.0",
    tag="dinov2",
    reference_shape=(1024, 24, 14),
    paper_results=paper_results(
        {
            "MVTec-AD": (90.1, 92.4, 94.8, 91.3, 47.4, 45.4, 88.6),
            "VisA": (83.1, 81.4, 86.8, 95.3, 35.2, 29.9, 88.2),
            "BTAD": (88.2, 84.7, 89.7, 93.4, 42.6, 38.7, 76.7),
            "KSDD2": (97.7, 93.1, 98.1),
            "DAGM": (93.2, 83.9, 86.1),
            "DTD-Synthetic": (91.0, 94.4, 97.4, 96.7, 65.8, 67.7, 92.4),
        }
    ),
)


class Dinov2Adapter(BackboneAdapter):
    """`Dinov2Model` / `Dinov2WithRegistersModel`: `[CLS, registers…, patches]`, no pre-norm, final `layernorm`.

    Positions: the backbone's own interpolation by default (SPEC §1); registers carry no position, as in DINOv2.
    The two tokens get the CLS position embedding, like CLIP's.
    """

    model_types = ("dinov2", "dinov2_with_registers")
    layer_class_names = ("Dinov2Layer", "Dinov2WithRegistersLayer")
    card = DINOV2_CARD
    image_mean = tuple(IMAGENET_DEFAULT_MEAN)
    image_std = tuple(IMAGENET_DEFAULT_STD)
    position_interpolations = TABLE_INTERPOLATIONS
    default_position_interpolation = "backbone"

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + int(getattr(self.config, "num_register_tokens", 0) or 0)

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.encoder.layer

    def final_norm(self, backbone: nn.Module) -> nn.Module:
        return backbone.layernorm

    def token_position(self, backbone: nn.Module) -> torch.Tensor:
        return backbone.embeddings.position_embeddings[0, 0]

    def embed(self, backbone: nn.Module, pixel_values: torch.Tensor, interpolation: str) -> torch.Tensor:
        embeddings = backbone.embeddings
        if interpolation == "backbone":
            return embeddings(pixel_values)
        table = embeddings.position_embeddings[0]
        patch_positions = self.resize_position_grid(table[1:], self.grid(pixel_values), interpolation)
        positions = torch.cat([table[:1], patch_positions])
        patches = embeddings.patch_embeddings(pixel_values)
        cls = embeddings.cls_token.expand(pixel_values.shape[0], -1, -1)
        sequence = torch.cat([cls, patches], dim=1) + positions
        if hasattr(embeddings, "register_tokens"):
            registers = embeddings.register_tokens.expand(pixel_values.shape[0], -1, -1)
            sequence = torch.cat([sequence[:, :1], registers, sequence[:, 1:]], dim=1)
        return embeddings.dropout(sequence)


__all__ = ["DINOV2_CARD", "Dinov2Adapter"]
