"""NVIDIA RADIO / C-RADIO (`radio`): CLS and register tokens, a cropped position embedding (CPE), no final norm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .base import BILINEAR, BackboneAdapter, BackboneCard

RADIO_CARD = BackboneCard(
    name="C-RADIOv4-H",
    family="RADIO ViT",
    hub_id="nvidia/C-RADIOv4-H",
    # C-RADIO checkpoints are under the NVIDIA Open Model License Agreement (not an OSI licence).
    license="other",
    license_name="nvidia-open-model-license",
    license_title="NVIDIA Open Model License Agreement",
    license_link="https://developer.download.nvidia.com/licenses/nvidia-open-model-license-agreement-june-2024.pdf",
    tag="radio",
    reference_shape=(1280, 32, 16),
)


class RadioAdapter(BackboneAdapter):
    """`RadioModel`: `[CLS tokens, registers, patches]`, layers at `encoder.layer`, no pre-norm and **no final norm**.

    - Normalisation: `RadioModel.forward` normalises `[0, 1]` pixels itself (`input_conditioner`, with the config's
      `norm_mean`/`norm_std`). VisualAD's processor normalises for every family, so it uses those constants and the
      adapter embeds the normalised pixels without the conditioner (what RADIO's `make_preprocessor_external` does).
      A RADIO folder's preprocessor_config.json does not normalise, so it is not read for mean/std.
    - Positions: the CPE table is cropped/interpolated to the grid by the backbone's own code; prefix tokens carry no
      position, so neither do VisualAD's two tokens.
    - Final norm: RADIO has none (its features feed adaptor heads directly), but VisualAD applies a trainable final
      LayerNorm to every feature layer (SPEC §1). The model adds a fresh one (weight 1, bias 0, the backbone's
      `layer_norm_eps`), trained with the heads; the trainable count is unchanged.
    """

    model_types = ("radio",)
    layer_class_names = ("RadioLayer",)
    card = RADIO_CARD
    image_mean = tuple(OPENAI_CLIP_MEAN)
    image_std = tuple(OPENAI_CLIP_STD)
    resample = BILINEAR  # the RADIO authors' examples resize with bilinear interpolation
    position_interpolations = ("backbone",)
    default_position_interpolation = "backbone"

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.config.num_cls_tokens) + int(self.config.num_registers)

    def normalization(self) -> tuple[list[float], list[float]]:
        return [float(v) for v in self.config.norm_mean], [float(v) for v in self.config.norm_std]

    def normalization_from_preprocessor(self, processor: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
        return None

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.encoder.layer

    def final_norm(self, backbone: nn.Module) -> None:
        return None

    def token_position(self, backbone: nn.Module) -> torch.Tensor:
        return backbone.embeddings.cls_register_token.new_zeros(self.hidden_size)

    def embed(self, backbone: nn.Module, pixel_values: torch.Tensor, interpolation: str) -> torch.Tensor:
        return backbone.embeddings.embed_image(pixel_values.to(backbone.embeddings.patch_projection.weight.dtype))


__all__ = ["RADIO_CARD", "RadioAdapter"]
