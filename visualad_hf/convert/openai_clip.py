"""The OpenAI CLIP side of the converter: OpenAI's weight names mapped onto `CLIPVisionModel`'s, and the loading of a
CLIP backbone from an OpenAI file, a Hugging Face folder or a Hub id.

Everything that knows a backbone family lives here: the released VisualAD checkpoints were trained on CLIP
ViT-L/14@336px only, so this is the one family the converter accepts (other families get a message saying why).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel

from ..backbones import BackboneCard, UnsupportedBackboneError, backbone_adapter, family_cards, vision_config_of
from ..hub import quiet_transformers_logging
from ..modeling_visualad import backbone_load_error_message
from .common import ConversionError, file_sha256, listing
from .torchscript import is_torchscript_archive
from .weights import read_state_dict

# The OpenAI release of CLIP ViT-L/14@336px: its URL (the folder name is the file's SHA-256) and its Hub copy.
OPENAI_VIT_L14_336_SHA256 = "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"
OPENAI_VIT_L14_336_URL = (
    f"https://openaipublic.azureedge.net/clip/models/{OPENAI_VIT_L14_336_SHA256}/ViT-L-14-336px.pt"
)
HUB_VIT_L14_336 = "openai/clip-vit-large-patch14-336"
# OpenAI's CLIP derives the head count from the width (`width // 64`); the state dict does not store it.
OPENAI_HEAD_WIDTH = 64



def no_released_checkpoint(card: BackboneCard) -> str:
    """Why a backbone family without released VisualAD weights has nothing to convert, and what to do instead."""
    return (
        f"No released {card.short_name} VisualAD checkpoint exists: the authors released checkpoints for the CLIP "
        "ViT-L/14@336px backbone only (weight/train_on_visa/CLIP.pth and weight/train_on_mvtec/CLIP.pth), so there is "
        f"nothing to convert. To use {card.short_name}, train heads on it: "
        f"VisualADModel.from_backbone('{card.hub_id}') and training/train.py."
    )


NO_DINOV2_CHECKPOINT = no_released_checkpoint(family_cards()["dinov2"])

# OpenAI CLIP visual-tower names (after `visual.`) -> CLIPVisionModel names.
_OPENAI_STEM = {
    "class_embedding": "embeddings.class_embedding",
    "conv1.weight": "embeddings.patch_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_OPENAI_BLOCK = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
}
_OPENAI_PACKED_QKV = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_OPENAI_UNUSED = {"proj"}  # the image projection: VisualAD works on the sequence before it.
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# The backbone's final LayerNorm in `CLIPVisionModel` names: the tensors the released checkpoint's `ln_post_weight` /
# `ln_post_bias` replace (or, as the authors' released evaluation does, leave alone).
FINAL_LAYERNORM = {"weight": "post_layernorm.weight", "bias": "post_layernorm.bias"}


@dataclass
class ClipBackbone:
    """A CLIP vision tower in `CLIPVisionModel` names, with where it came from (for the model card)."""

    config: CLIPVisionConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    layout: str
    base_model: str | None = None
    sha256: str | None = None

    def final_layernorm(self) -> dict[str, torch.Tensor]:
        """The backbone's own final LayerNorm (`ln_post`), by `CLIPVisionModel` name."""
        return {name: self.state_dict[name] for name in FINAL_LAYERNORM.values()}


def describe_foreign_state_dict(keys: set[str]) -> str | None:
    """A diagnosis for state dicts that are clearly something other than a ViT CLIP."""
    if any(k.startswith(("blocks.", "patch_embed.", "cls_token", "register_tokens")) for k in keys) or any(
        k.startswith(("embeddings.mask_token", "encoder.layer.")) for k in keys
    ):
        return NO_DINOV2_CHECKPOINT + " (These look like DINOv2 weights.)"
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in keys):
        return "This is a ResNet CLIP (RN50, RN101, …); VisualAD needs a ViT CLIP (ViT-L/14@336px for the release)."
    if any(k.startswith(("vision_model.", "embeddings.patch_embedding.")) for k in keys):
        return "These are Hugging Face CLIP weights; pass the folder that holds them (with its config.json)."
    if any(k.startswith(("anomaly_token", "layer_transforms", "cross_attn")) for k in keys):
        return "This is a VisualAD checkpoint; pass it as --checkpoint, and the CLIP weights as --backbone."
    return None


def openai_clip_to_hf(
    state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None, source: str = "state dict"
) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """Map OpenAI CLIP weights (`visual.*`, or the visual tower alone) onto a `CLIPVisionConfig` and
    `CLIPVisionModel` names. The query/key/value projections stacked in `in_proj_*` are split.

    Width, depth, patch size, native grid and MLP width are read from the tensors. The head count is not stored:
    OpenAI's rule `width // 64` is used unless `num_heads` is given.
    """
    keys = set(state_dict)
    if any(k.startswith("visual.") for k in keys):
        visual = {k[len("visual.") :]: v for k, v in state_dict.items() if k.startswith("visual.")}
    elif "conv1.weight" in keys:
        visual = dict(state_dict)
    else:
        hint = describe_foreign_state_dict(keys) or (
            f"Expected OpenAI CLIP keys such as visual.conv1.weight, visual.positional_embedding and "
            f"visual.transformer.resblocks.0.attn.in_proj_weight; found {listing(keys, 6) or 'no tensors'}."
        )
        raise ConversionError(f"{source}: not a ViT CLIP checkpoint. {hint}")
    foreign = describe_foreign_state_dict({f"visual.{k}" for k in visual})
    if foreign:
        raise ConversionError(f"{source}: {foreign}")

    missing_stem = [f"visual.{k}" for k in _OPENAI_STEM if k not in visual]
    if missing_stem:
        raise ConversionError(f"{source}: not a complete OpenAI CLIP vision tower; missing {listing(missing_stem)}.")
    patch_weight = visual["conv1.weight"]
    if patch_weight.ndim != 4 or patch_weight.shape[1] != 3 or patch_weight.shape[2] != patch_weight.shape[3]:
        raise ConversionError(
            f"{source}: visual.conv1.weight has shape {list(patch_weight.shape)}; a ViT CLIP has [width, 3, p, p]."
        )
    width, patch_size = patch_weight.shape[0], patch_weight.shape[-1]
    num_positions = visual["positional_embedding"].shape[0]
    grid = math.isqrt(max(num_positions - 1, 0))
    if grid * grid + 1 != num_positions:
        raise ConversionError(
            f"{source}: visual.positional_embedding has {num_positions} rows; a square grid plus CLS needs n*n + 1."
        )

    blocks = sorted({int(match.group(1)) for k in visual if (match := _RESBLOCK.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ConversionError(
            f"{source}: the blocks visual.transformer.resblocks.N are {blocks or 'absent'}; expected 0..depth-1."
        )
    depth = len(blocks)
    if num_heads is None and width % OPENAI_HEAD_WIDTH:
        raise ConversionError(
            f"{source}: width {width} is not a multiple of {OPENAI_HEAD_WIDTH}, so OpenAI's head rule "
            f"(width // {OPENAI_HEAD_WIDTH}) does not apply and the state dict does not store the head count; "
            "pass --num-heads with the backbone's number of attention heads."
        )
    heads = num_heads if num_heads is not None else width // OPENAI_HEAD_WIDTH
    if heads < 1 or width % heads:
        raise ConversionError(f"{source}: --num-heads {heads} does not divide the width {width}.")

    mapped: dict[str, torch.Tensor] = {target: visual[name] for name, target in _OPENAI_STEM.items()}
    used = set(_OPENAI_STEM)
    missing: list[str] = []
    for index in blocks:
        block, layer = f"transformer.resblocks.{index}.", f"encoder.layers.{index}."
        for name, target in _OPENAI_BLOCK.items():
            if block + name in visual:
                mapped[layer + target] = visual[block + name]
                used.add(block + name)
            else:
                missing.append(f"visual.{block}{name}")
        for name, kind in _OPENAI_PACKED_QKV.items():
            if block + name not in visual:
                missing.append(f"visual.{block}{name}")
                continue
            packed = visual[block + name]
            used.add(block + name)
            if packed.shape[0] != 3 * width:
                raise ConversionError(
                    f"{source}: visual.{block}{name} has shape {list(packed.shape)}; stacked q, k, v of width "
                    f"{width} need {3 * width} rows."
                )
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), packed.chunk(3, dim=0)):
                mapped[f"{layer}self_attn.{part}.{kind}"] = chunk
    if missing:
        raise ConversionError(f"{source}: the CLIP vision tower lacks {len(missing)} tensors: {listing(missing)}.")
    unexpected = [f"visual.{k}" for k in visual if k not in used and k not in _OPENAI_UNUSED]
    if unexpected:
        raise ConversionError(
            f"{source}: unexpected tensors for an OpenAI ViT CLIP vision tower: {listing(unexpected)}. "
            "Is this a modified CLIP? Only the OpenAI ViT layout is supported."
        )

    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=mapped["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=heads,
        patch_size=patch_size,
        image_size=patch_size * grid,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        **({"projection_dim": visual["proj"].shape[1]} if "proj" in visual else {}),
    )
    return config, mapped


def _clip_vision_config(config: Any, source: str) -> CLIPVisionConfig:
    model_type = getattr(config, "model_type", None)
    not_clip = ConversionError(
        f"{source}: a {model_type!r} model is not a CLIP backbone; pass the OpenAI ViT-L-14-336px.pt file or "
        f"{HUB_VIT_L14_336} (or a local copy of it)."
    )
    try:
        vision = vision_config_of(config, source)
    except UnsupportedBackboneError:
        raise not_clip from None
    card = backbone_adapter(vision).card
    if not card.released_checkpoints:
        raise ConversionError(f"{source}: {no_released_checkpoint(card)}")
    return vision


def load_backbone(
    backbone: str | os.PathLike,
    *,
    num_heads: int | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> ClipBackbone:
    """Read a CLIP backbone from an OpenAI weights file, a local Hugging Face folder, or a Hub id."""
    source = os.fspath(backbone)
    path = Path(source)
    if path.is_file():
        layout = "OpenAI CLIP TorchScript archive" if is_torchscript_archive(path) else "OpenAI CLIP state dict"
        config, state_dict = openai_clip_to_hf(read_state_dict(path), num_heads=num_heads, source=source)
        sha256 = file_sha256(path)
        # The Hub copy is named as base model only for OpenAI's own file; other files may hold other weights.
        base_model = HUB_VIT_L14_336 if sha256 == OPENAI_VIT_L14_336_SHA256 else None
        return ClipBackbone(config, state_dict, source, layout, base_model=base_model, sha256=sha256)

    unreleased = [c for c in family_cards().values() if not c.released_checkpoints and c.tag in source.lower()]
    if not path.exists() and unreleased:
        raise ConversionError(f"--backbone {source}: {no_released_checkpoint(unreleased[0])}")
    if not path.exists() and (path.suffix in _WEIGHT_SUFFIXES or source.startswith(("ViT-", "RN"))):
        raise ConversionError(
            f"--backbone {source}: no such file. Download OpenAI's CLIP ViT-L/14@336px from {OPENAI_VIT_L14_336_URL}, "
            f"or pass --backbone {HUB_VIT_L14_336} to use the Hub copy of the same weights."
        )
    if path.is_dir() and not (path / "config.json").is_file():
        weights = sorted(p.name for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        hint = f" It holds {listing(weights, 4)}: pass that file instead." if weights else ""
        raise ConversionError(f"{source}: a folder without config.json is not a Hugging Face model folder.{hint}")
    hub_kwargs = {"revision": revision, "token": token, "cache_dir": cache_dir}
    try:
        config = _clip_vision_config(AutoConfig.from_pretrained(source, **hub_kwargs), source)
    except OSError as error:
        raise ConversionError(backbone_load_error_message(source, error)) from error
    if num_heads is not None and num_heads != config.num_attention_heads:
        raise ConversionError(
            f"--num-heads {num_heads} contradicts {source}, whose config has {config.num_attention_heads} heads; "
            "drop --num-heads for Hugging Face backbones."
        )
    try:
        with quiet_transformers_logging():  # a CLIPModel folder's text tower is reported as unexpected: expected here.
            model, info = CLIPVisionModel.from_pretrained(
                source, config=config, dtype=torch.float32, output_loading_info=True, **hub_kwargs
            )
    except OSError as error:
        raise ConversionError(backbone_load_error_message(source, error)) from error
    if info["missing_keys"] or info["mismatched_keys"]:
        problems = sorted(info["missing_keys"]) + [str(item[0]) for item in info["mismatched_keys"]]
        raise ConversionError(f"{source}: the CLIP vision weights are incomplete or mis-shaped: {listing(problems)}.")
    base_model = None if path.exists() else source  # a Hub id names itself; a local folder may hold anything
    return ClipBackbone(config, model.state_dict(), source, "Hugging Face CLIP", base_model=base_model)
