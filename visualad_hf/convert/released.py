"""The released VisualAD checkpoint (`CLIP.pth`, SPEC §8): loading it safely and mapping its heads onto
`VisualADModel` names.

The checkpoint holds the two tokens, the trained final LayerNorm (`ln_post_weight`, `ln_post_bias`) and one SAF and
one SCA per feature layer. Whether the trained LayerNorm is used is the converter's choice (`--final-layernorm`):
this module maps every tensor the checkpoint holds and checks it against the backbone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig

from ..configuration_visualad import VisualADConfig
from .common import ConversionError, listing
from .openai_clip import FINAL_LAYERNORM, HUB_VIT_L14_336, NO_DINOV2_CHECKPOINT, describe_foreign_state_dict
from .torchscript import is_torchscript_archive
from .weights import torch_load_weights_only

# Released VisualAD head names -> ours (SPEC §8).
_CHECKPOINT_REQUIRED = (
    "anomaly_token",
    "normal_token",
    "ln_post_weight",
    "ln_post_bias",
    "features_list",
    "image_size",
    "layer_transforms",
    "cross_attn",
)
_CHECKPOINT_INFO = ("epoch", "backbone", "transform_type", "cross_attn_config")
_CHECKPOINT_TOP = {
    "anomaly_token": "tokens.anomaly_token",
    "normal_token": "tokens.normal_token",
    "ln_post_weight": f"backbone.{FINAL_LAYERNORM['weight']}",
    "ln_post_bias": f"backbone.{FINAL_LAYERNORM['bias']}",
}
_SAF_MLP = {
    "mlp.0.weight": "fc1.weight",
    "mlp.0.bias": "fc1.bias",
    "mlp.3.weight": "fc2.weight",
    "mlp.3.bias": "fc2.bias",
}
_SCA = {
    "anchor_queries": "anchors",
    "pos_encoding": "position_embeddings",
    "res_scale": "residual_scale",
    "q_proj.weight": "q_proj.weight",
    "k_proj.weight": "k_proj.weight",
    "v_proj.weight": "v_proj.weight",
    "q_norm.weight": "q_norm.weight",
    "q_norm.bias": "q_norm.bias",
    "k_norm.weight": "k_norm.weight",
    "k_norm.bias": "k_norm.bias",
    "gate.0.weight": "gate.weight",
    "gate.0.bias": "gate.bias",
    "out_proj.weight": "out_proj.weight",
    "out_proj.bias": "out_proj.bias",
}
_SCA_PREFIX = "layer_attentions.layer_{}."


def load_visualad_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The released `CLIP.pth` as a dict, loaded with `weights_only=True`, with its top-level keys checked."""
    source = os.fspath(path)
    if not Path(source).is_file():
        raise ConversionError(f"--checkpoint {source}: no such file.")
    if is_torchscript_archive(source):
        raise ConversionError(
            f"{source}: a TorchScript archive, not a VisualAD checkpoint; pass CLIP weights as --backbone and the "
            "authors' CLIP.pth as --checkpoint."
        )
    checkpoint = torch_load_weights_only(source, what="VisualAD checkpoint")
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{source}: holds a {type(checkpoint).__name__}; a VisualAD checkpoint is a dict.")
    keys = set(checkpoint)
    missing = [key for key in _CHECKPOINT_REQUIRED if key not in keys]
    if missing:
        hint = describe_foreign_state_dict(keys)
        if hint is None and any(str(k).startswith("visual.") for k in keys):
            hint = "This looks like CLIP weights; pass them as --backbone and the authors' CLIP.pth as --checkpoint."
        raise ConversionError(
            f"{source}: not a VisualAD checkpoint in the released layout; missing {listing(missing)}. "
            + (hint or f"Its keys: {listing(map(str, keys), 8)}.")
        )
    unexpected = keys - set(_CHECKPOINT_REQUIRED) - set(_CHECKPOINT_INFO)
    if unexpected:
        raise ConversionError(
            f"{source}: unexpected entries {listing(map(str, unexpected))} in the VisualAD checkpoint; the released "
            f"layout has {listing(_CHECKPOINT_REQUIRED + _CHECKPOINT_INFO, 20)}."
        )
    return dict(checkpoint)


def _as_int_list(value: Any, name: str, source: str) -> list[int]:
    try:
        items = [int(item) for item in (value.tolist() if isinstance(value, torch.Tensor) else value)]
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{source}: {name} must be a list of integers, got {value!r}.") from error
    if not items:
        raise ConversionError(f"{source}: {name} is empty.")
    return items


def visualad_head_to_hf(
    checkpoint: Mapping[str, Any], backbone_config: CLIPVisionConfig, *, source: str = "checkpoint"
) -> tuple[VisualADConfig, dict[str, torch.Tensor], dict[str, str]]:
    """The `VisualADConfig` and the head tensors (in `VisualADModel` names) of a released checkpoint, checked
    against the backbone.

    Returns `(config, state_dict, origin)` where `origin` maps each of our names to the checkpoint entry it came from,
    for error messages.
    """
    backbone_name = str(checkpoint.get("backbone", ""))
    if "dino" in backbone_name.lower():
        raise ConversionError(f"{source}: trained on {backbone_name!r}. {NO_DINOV2_CHECKPOINT}")
    transform_type = checkpoint.get("transform_type", "mlp")
    if transform_type != "mlp":
        raise ConversionError(
            f"{source}: transform_type={transform_type!r}; only the released SAF 'mlp' layout (mlp.0/mlp.3) is known."
        )

    width, depth = backbone_config.hidden_size, backbone_config.num_hidden_layers
    token = checkpoint["anomaly_token"]
    if not isinstance(token, torch.Tensor) or token.ndim != 1:
        raise ConversionError(f"{source}: anomaly_token must be a 1-D tensor, got {getattr(token, 'shape', token)!r}.")
    if token.shape[0] != width:
        raise ConversionError(
            f"{source}: the VisualAD heads have width {token.shape[0]} but the backbone has width {width} "
            f"(the checkpoint says it was trained on {backbone_name or 'an unnamed backbone'!r}); pass the backbone "
            f"it was trained with (CLIP ViT-L/14@336px has width 1024: {HUB_VIT_L14_336})."
        )
    features = _as_int_list(checkpoint["features_list"], "features_list", source)
    outside = [layer for layer in features if not 1 <= layer <= depth]
    if outside:
        raise ConversionError(
            f"{source}: features_list {features} names layers {outside}, but the backbone has layers 1..{depth}; "
            "pass the backbone the checkpoint was trained with."
        )
    image_size = checkpoint["image_size"]
    if isinstance(image_size, (list, tuple)) and len(set(image_size)) == 1:
        image_size = image_size[0]
    if not isinstance(image_size, int) or isinstance(image_size, bool):
        raise ConversionError(f"{source}: image_size must be an int, got {image_size!r}.")

    state_dict = {ours: checkpoint[theirs] for theirs, ours in _CHECKPOINT_TOP.items()}
    origin = {ours: theirs for theirs, ours in _CHECKPOINT_TOP.items()}
    _map_layer_transforms(checkpoint["layer_transforms"], features, state_dict, origin, source)
    _map_cross_attention(checkpoint["cross_attn"], features, state_dict, origin, source)

    anchors = {state_dict[f"spatial_cross_attention.{i}.anchors"].shape[0] for i in range(len(features))}
    gates = {state_dict[f"spatial_cross_attention.{i}.gate.weight"].shape[0] for i in range(len(features))}
    sca_config = checkpoint.get("cross_attn_config") or {}
    declared = sca_config.get("num_anchors")
    if len(anchors) != 1 or anchors != gates or (declared is not None and {int(declared)} != anchors):
        raise ConversionError(
            f"{source}: the anchor count does not agree: cross_attn_config.num_anchors={declared}, anchor_queries "
            f"rows {sorted(anchors)}, gate.0.weight rows {sorted(gates)}; the checkpoint is inconsistent."
        )
    positions = {state_dict[f"spatial_cross_attention.{i}.position_embeddings"].shape[0] for i in range(len(features))}
    if len(positions) != 1:
        raise ConversionError(f"{source}: pos_encoding tables differ in size across layers ({sorted(positions)}).")
    saf_hidden = state_dict["self_alignment.0.fc1.weight"].shape[0]

    try:
        config = VisualADConfig(
            vision_config=backbone_config,
            feature_layers=features,
            image_size=image_size,
            num_anchors=anchors.pop(),
            max_patches=positions.pop(),
            sca_dropout=float(sca_config.get("dropout", 0.1)),
            res_scale_init=float(sca_config.get("res_scale_init", 0.01)),
            saf_type="mlp",
            saf_hidden_size=None if saf_hidden == width else saf_hidden,
        )
    except ValueError as error:
        raise ConversionError(f"{source}: {error}") from error
    return config, state_dict, origin


def _map_layer_transforms(
    transforms: Any, features: list[int], state_dict: dict, origin: dict, source: str
) -> None:
    if not isinstance(transforms, Mapping):
        raise ConversionError(f"{source}: layer_transforms must be a dict of per-layer state dicts.")
    expected = {f"layer_{layer}" for layer in features}
    _check_keys(set(transforms), expected, "layer_transforms", source)
    for index, layer in enumerate(features):
        entry = transforms[f"layer_{layer}"]
        if not isinstance(entry, Mapping):
            raise ConversionError(f"{source}: layer_transforms['layer_{layer}'] must be a state dict.")
        _check_keys(set(entry), set(_SAF_MLP), f"layer_transforms['layer_{layer}']", source)
        for theirs, ours in _SAF_MLP.items():
            state_dict[f"self_alignment.{index}.{ours}"] = entry[theirs]
            origin[f"self_alignment.{index}.{ours}"] = f"layer_transforms['layer_{layer}']['{theirs}']"


def _map_cross_attention(
    cross_attention: Any, features: list[int], state_dict: dict, origin: dict, source: str
) -> None:
    if not isinstance(cross_attention, Mapping):
        raise ConversionError(f"{source}: cross_attn must be a state dict.")
    expected = {_SCA_PREFIX.format(layer) + name for layer in features for name in _SCA}
    _check_keys(set(cross_attention), expected, "cross_attn", source)
    for index, layer in enumerate(features):
        for theirs, ours in _SCA.items():
            tensor = cross_attention[_SCA_PREFIX.format(layer) + theirs]
            if theirs == "pos_encoding" and tensor.ndim == 3 and tensor.shape[0] == 1:
                tensor = tensor[0]  # released as [1, M, d]
            state_dict[f"spatial_cross_attention.{index}.{ours}"] = tensor
            origin[f"spatial_cross_attention.{index}.{ours}"] = f"cross_attn['{_SCA_PREFIX.format(layer)}{theirs}']"


def _check_keys(found: set, expected: set, where: str, source: str) -> None:
    missing, unexpected = expected - found, found - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {listing(map(str, unexpected))}")
        raise ConversionError(
            f"{source}: {where} does not match features_list: {'; '.join(parts)}. The released layout has one entry "
            "per feature layer."
        )



def checkpoint_info(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's descriptive entries (epoch, backbone name, SAF type, SCA settings), for the model card."""
    return {key: checkpoint[key] for key in _CHECKPOINT_INFO if key in checkpoint}


__all__ = ["checkpoint_info", "load_visualad_checkpoint", "visualad_head_to_hf"]
