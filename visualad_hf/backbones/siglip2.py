"""SigLIP2 NaFlex vision towers (`siglip2_vision_model`, or the vision part of a full `siglip2` config).

NaFlex takes images as flat patch sequences of varying length with their `(rows, cols)`; VisualAD feeds one square
grid per batch, so every sequence is full and no padding mask is needed. (Fixed-resolution SigLIP2 checkpoints are
`siglip` models: see `siglip.py`.)
"""

from __future__ import annotations

import torch
from torch import nn

from .base import BILINEAR, BackboneCard
from .siglip import SiglipAdapter

SIGLIP2_NAFLEX_CARD = BackboneCard(
    name="SigLIP2 NaFlex ViT-B/16",
    family="SigLIP2 NaFlex ViT",
    hub_id="google/siglip2-base-patch16-naflex",
    license="apache-2.0",
    tag="siglip2",
    reference_shape=(768, 12, 16),
)


class Siglip2NaflexAdapter(SiglipAdapter):
    """`Siglip2VisionModel`: patches only, a learned position table resized per image by the backbone (bilinear,
    antialiased), final `post_layernorm`. The two tokens get the mean of the patch position embeddings (see
    `SiglipAdapter`, whose layers, final norm and token position it shares)."""

    model_types = ("siglip2_vision_model",)
    container_model_types = ("siglip2",)
    layer_class_names = ("Siglip2EncoderLayer",)
    card = SIGLIP2_NAFLEX_CARD
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    resample = BILINEAR  # Siglip2ImageProcessor
    position_interpolations = ("backbone",)
    default_position_interpolation = "backbone"


    def patchify(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(batch, rows*cols, patch*patch*channels)` patches in `Siglip2ImageProcessor`'s order, and the grid."""
        batch, channels = pixel_values.shape[:2]
        rows, cols = self.grid(pixel_values)
        patch = self.patch_size
        patches = pixel_values.reshape(batch, channels, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)
        spatial_shapes = torch.tensor([[rows, cols]], device=pixel_values.device).expand(batch, 2)
        return patches.reshape(batch, rows * cols, -1), spatial_shapes

    def embed(self, backbone: nn.Module, pixel_values: torch.Tensor, interpolation: str) -> torch.Tensor:
        patches, spatial_shapes = self.patchify(pixel_values)
        return backbone.embeddings(patches, spatial_shapes)


__all__ = ["SIGLIP2_NAFLEX_CARD", "Siglip2NaflexAdapter"]
