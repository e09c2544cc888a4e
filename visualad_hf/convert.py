"""Convert the authors' released VisualAD checkpoint into a `visualad_hf` model folder (SPEC §8).

Two inputs:

- the backbone: OpenAI CLIP weights (`ViT-L-14-336px.pt`, a TorchScript archive, or a plain state dict saved as
  `.pt`/`.pth`/`.bin`/`.safetensors`), or the same weights in Hugging Face layout (a local `CLIPModel` /
  `CLIPVisionModel` folder, or a Hub id such as `openai/clip-vit-large-patch14-336`);
- the VisualAD checkpoint (`CLIP.pth`): tokens, the trained final LayerNorm, and one SAF and one SCA per feature layer.

Nothing in either file is executed. Pickles load with `torch.load(weights_only=True)` and never fall back to unsafe
loading. TorchScript archives, which `torch.load(weights_only=True)` refuses and `torch.jit.load` would compile and
run, are read by `load_torchscript_tensors`: a restricted unpickler that rebuilds tensors and keeps the module tree as
plain attribute records.

    python -m visualad_hf.convert --backbone ViT-L-14-336px.pt --checkpoint CLIP.pth --output visualad-clip
    visualad convert --backbone openai/clip-vit-large-patch14-336 --checkpoint CLIP.pth --output visualad-clip
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import math
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel
from transformers.utils import logging as hf_logging

from .backbones import BackboneCard, UnsupportedBackboneError, backbone_adapter, family_cards, vision_config_of
from .configuration_visualad import VisualADConfig
from .errors import VisualADError
from .modeling_visualad import VisualADModel, backbone_load_error_message

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
    "ln_post_weight": "backbone.post_layernorm.weight",
    "ln_post_bias": "backbone.post_layernorm.bias",
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

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConversionError(VisualADError, ValueError):
    """An input that cannot be converted; the message names the file and what to do."""


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … and {len(names) - limit} more" if len(names) > limit else "")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Reading files without executing them


class _ScriptObject:
    """Stand-in for an object of a TorchScript class (`__torch__.*`): keeps its pickled attributes, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _identity(value: Any, *_: Any) -> Any:
    return value


# `torch.jit._pickle` helpers that wrap typed lists and type tags; their values are plain data.
_JIT_PICKLE_HELPERS = {
    "build_intlist",
    "build_doublelist",
    "build_boollist",
    "build_tensorlist",
    "build_complexlist",
    "restore_type_tag",
}


class _TorchScriptUnpickler(pickle.Unpickler):
    """Rebuilds tensors from a TorchScript archive's `data.pkl`; every other global is refused.

    Allowed: `torch._utils._rebuild_tensor_v2` (replaced by our own rebuild), the `torch.*Storage` type tags,
    `collections.OrderedDict`, the list/type-tag helpers of `torch.jit._pickle` (replaced by the identity), and
    `__torch__.*` classes, which become inert `_ScriptObject` records.
    """

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _JIT_PICKLE_HELPERS:
            return _identity
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}, which the safe reader does not allow (it only rebuilds tensors); where "
            "you trust the file, re-save the weights as a plain state dict: torch.save(model.state_dict(), 'clip.pt')"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _, numel = pid
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() < numel:
                raise pickle.UnpicklingError(f"storage {key} is truncated")
            self._storages[key] = flat
        return self._storages[key]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return storage.as_strided(size, stride, offset).clone()


def _archive_prefix(archive: zipfile.ZipFile) -> str | None:
    """The folder holding `data.pkl` in a torch zip archive (`archive/`, `ts/`, `ViT-L-14-336px/`…)."""
    for name in archive.namelist():
        if name.endswith("data.pkl") and name.count("/") <= 1:
            return name[: -len("data.pkl")]
    return None


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether `path` is a TorchScript zip (it has compiled code and constants next to the pickled data)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive)
        names = set(archive.namelist())
        return prefix is not None and (
            f"{prefix}constants.pkl" in names or any(name.startswith(f"{prefix}code/") for name in names)
        )


def load_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript module archive, by dotted name (`visual.conv1.weight`, …).

    The names are those of `torch.jit.load(path).state_dict()` (plus any plain tensor attributes), but nothing in the
    archive is compiled or run.
    """
    source = os.fspath(path)
    with zipfile.ZipFile(source) as archive:
        prefix = _archive_prefix(archive)
        if prefix is None:
            raise ConversionError(f"{source}: a zip file without data.pkl is not a PyTorch/TorchScript archive.")
        names = set(archive.namelist())
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() not in (b"", b"little"):
            raise ConversionError(f"{source}: big-endian archives are not supported.")
        try:
            root = _TorchScriptUnpickler(archive.read(f"{prefix}data.pkl"), archive, prefix).load()
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, RuntimeError) as error:
            raise ConversionError(f"{source}: cannot read the TorchScript archive safely: {error}") from error
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(root, "", tensors, seen=set())
    return tensors


def _collect_tensors(node: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if isinstance(node, torch.Tensor):
        out[prefix.rstrip(".")] = node
    elif isinstance(node, _ScriptObject) and id(node) not in seen:
        seen.add(id(node))
        for name, value in vars(node).items():
            _collect_tensors(value, f"{prefix}{name}.", out, seen)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: TorchScript archive, `torch.save` pickle (weights only) or safetensors.

    A `{"state_dict": {...}}` wrapper is unwrapped. Non-tensor entries are dropped.
    """
    source = os.fspath(path)
    if source.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(source)
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"{source}: not a readable safetensors file ({error}).") from error
    if is_torchscript_archive(source):
        return load_torchscript_tensors(source)
    loaded = _torch_load_weights_only(source, what="weights file")
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{source}: holds a {type(loaded).__name__}, not a state dict of tensors.")
    return {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def _torch_load_weights_only(source: str, what: str) -> Any:
    with open(source, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise ConversionError(
            f"{source}: a Git LFS pointer, not the file itself; fetch it with `git lfs pull` in the clone (or download "
            "the file from the repository's web page)."
        )
    if not zipfile.is_zipfile(source) and not head.startswith(b"\x80"):  # torch.save: a zip, or a legacy pickle
        raise ConversionError(f"{source}: not a PyTorch {what} (neither a torch.save zip archive nor a pickle).")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        reason = detail.group(1).strip() if detail else str(error).strip().splitlines()[0]
        raise ConversionError(
            f"{source}: this {what} cannot be loaded with torch.load(weights_only=True) ({reason}). It holds objects "
            "other than tensors and plain containers, and loading those could execute code from the file, so this "
            "converter refuses it (it never falls back to unsafe loading). Where you trust the file, re-save its "
            "tensors: torch.save({k: v for k, v in obj.items() if ...}, 'clean.pth')."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConversionError(
            f"{source}: not a readable PyTorch {what} ({type(error).__name__}: {str(error)[:200]}); "
            "is it truncated, or a different kind of file?"
        ) from error


# ---------------------------------------------------------------------------------------------------------------------
# The backbone


@dataclass
class ClipBackbone:
    """A CLIP vision tower in `CLIPVisionModel` names, with where it came from (for the model card)."""

    config: CLIPVisionConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    layout: str
    base_model: str | None = None
    sha256: str | None = None


def _describe_foreign_state_dict(keys: set[str]) -> str | None:
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
        hint = _describe_foreign_state_dict(keys) or (
            f"Expected OpenAI CLIP keys such as visual.conv1.weight, visual.positional_embedding and "
            f"visual.transformer.resblocks.0.attn.in_proj_weight; found {_listing(keys, 6) or 'no tensors'}."
        )
        raise ConversionError(f"{source}: not a ViT CLIP checkpoint. {hint}")
    foreign = _describe_foreign_state_dict({f"visual.{k}" for k in visual})
    if foreign:
        raise ConversionError(f"{source}: {foreign}")

    missing_stem = [f"visual.{k}" for k in _OPENAI_STEM if k not in visual]
    if missing_stem:
        raise ConversionError(f"{source}: not a complete OpenAI CLIP vision tower; missing {_listing(missing_stem)}.")
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
        raise ConversionError(f"{source}: the CLIP vision tower lacks {len(missing)} tensors: {_listing(missing)}.")
    unexpected = [f"visual.{k}" for k in visual if k not in used and k not in _OPENAI_UNUSED]
    if unexpected:
        raise ConversionError(
            f"{source}: unexpected tensors for an OpenAI ViT CLIP vision tower: {_listing(unexpected)}. "
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
        hint = f" It holds {_listing(weights, 4)}: pass that file instead." if weights else ""
        raise ConversionError(f"{source}: a folder without config.json is not a Hugging Face model folder.{hint}")
    hub_kwargs = dict(revision=revision, token=token, cache_dir=cache_dir)
    try:
        config = _clip_vision_config(AutoConfig.from_pretrained(source, **hub_kwargs), source)
    except OSError as error:
        raise ConversionError(backbone_load_error_message(source, error)) from error
    if num_heads is not None and num_heads != config.num_attention_heads:
        raise ConversionError(
            f"--num-heads {num_heads} contradicts {source}, whose config has {config.num_attention_heads} heads; "
            "drop --num-heads for Hugging Face backbones."
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a CLIPModel folder's text tower is reported as unexpected: expected here.
    try:
        model, info = CLIPVisionModel.from_pretrained(
            source, config=config, dtype=torch.float32, output_loading_info=True, **hub_kwargs
        )
    except OSError as error:
        raise ConversionError(backbone_load_error_message(source, error)) from error
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        problems = sorted(info["missing_keys"]) + [str(item[0]) for item in info["mismatched_keys"]]
        raise ConversionError(f"{source}: the CLIP vision weights are incomplete or mis-shaped: {_listing(problems)}.")
    base_model = None if path.exists() else source  # a Hub id names itself; a local folder may hold anything
    return ClipBackbone(config, model.state_dict(), source, "Hugging Face CLIP", base_model=base_model)


# ---------------------------------------------------------------------------------------------------------------------
# The VisualAD checkpoint


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
    checkpoint = _torch_load_weights_only(source, what="VisualAD checkpoint")
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{source}: holds a {type(checkpoint).__name__}; a VisualAD checkpoint is a dict.")
    keys = set(checkpoint)
    missing = [key for key in _CHECKPOINT_REQUIRED if key not in keys]
    if missing:
        hint = _describe_foreign_state_dict(keys)
        if hint is None and any(str(k).startswith("visual.") for k in keys):
            hint = "This looks like CLIP weights; pass them as --backbone and the authors' CLIP.pth as --checkpoint."
        raise ConversionError(
            f"{source}: not a VisualAD checkpoint in the released layout; missing {_listing(missing)}. "
            + (hint or f"Its keys: {_listing(map(str, keys), 8)}.")
        )
    unexpected = keys - set(_CHECKPOINT_REQUIRED) - set(_CHECKPOINT_INFO)
    if unexpected:
        raise ConversionError(
            f"{source}: unexpected entries {_listing(map(str, unexpected))} in the VisualAD checkpoint; the released "
            f"layout has {_listing(_CHECKPOINT_REQUIRED + _CHECKPOINT_INFO, 20)}."
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
            parts.append(f"missing {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listing(map(str, unexpected))}")
        raise ConversionError(
            f"{source}: {where} does not match features_list: {'; '.join(parts)}. The released layout has one entry "
            "per feature layer."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Assembly


@dataclass
class ConvertedCheckpoint:
    """A converted model and where its weights came from."""

    model: VisualADModel
    backbone: ClipBackbone = field(repr=False)
    checkpoint_path: str
    checkpoint_sha256: str
    checkpoint_info: dict[str, Any]

    def provenance(self) -> dict[str, Any]:
        """What the model card records about the conversion."""
        official = self.backbone.sha256 == OPENAI_VIT_L14_336_SHA256
        source = Path(self.backbone.source)
        return {
            "backbone_source": source.name if source.exists() else self.backbone.source,
            "backbone_layout": self.backbone.layout,
            "backbone_sha256": self.backbone.sha256,
            "backbone_is_official_openai_vit_l14_336": official,
            "checkpoint_source": Path(self.checkpoint_path).name,
            "checkpoint_sha256": self.checkpoint_sha256,
            **{f"checkpoint_{key}": value for key, value in self.checkpoint_info.items()},
        }


def convert_checkpoint(
    backbone: str | os.PathLike | ClipBackbone,
    checkpoint: str | os.PathLike,
    *,
    num_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> ConvertedCheckpoint:
    """Build a `VisualADModel` from CLIP backbone weights and a released VisualAD checkpoint (SPEC §8).

    Args:
        backbone: OpenAI CLIP weights file, Hugging Face folder or Hub id (or an already loaded `ClipBackbone`).
        checkpoint: the authors' `CLIP.pth`.
        num_heads: attention heads of an OpenAI-layout backbone, when OpenAI's `width // 64` rule does not hold.
        dtype: parameter dtype of the converted model (the released runs are fp32).
    """
    checkpoint_path = os.fspath(checkpoint)
    released = load_visualad_checkpoint(checkpoint_path)  # first: small, and its errors are the common ones
    if not isinstance(backbone, ClipBackbone):
        backbone = load_backbone(backbone, num_heads=num_heads, revision=revision, token=token, cache_dir=cache_dir)
    config, head, origin = visualad_head_to_hf(released, backbone.config, source=checkpoint_path)

    state_dict = {f"backbone.{name}": tensor for name, tensor in backbone.state_dict.items()}
    state_dict.update(head)  # the trained final LayerNorm replaces CLIP's ln_post
    origin = {**{f"backbone.{name}": f"{backbone.source}: {name}" for name in backbone.state_dict}, **origin}
    _check_against_model(config, state_dict, origin, checkpoint_path)
    state_dict = {name: tensor.to(dtype).contiguous() for name, tensor in state_dict.items()}

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = VisualADModel.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]) + info["error_msgs"]
    if problems:  # `_check_against_model` makes this unreachable unless the model itself changed.
        raise RuntimeError(f"Converted weights did not load cleanly: {_listing(problems)}")
    info_fields = {key: released[key] for key in _CHECKPOINT_INFO if key in released}
    return ConvertedCheckpoint(model.eval(), backbone, checkpoint_path, file_sha256(checkpoint_path), info_fields)


def _check_against_model(
    config: VisualADConfig, state_dict: Mapping[str, torch.Tensor], origin: Mapping[str, str], source: str
) -> None:
    """Every parameter present, none extra, every shape right; errors name the released entries."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in VisualADModel(config).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(origin.get(name, name) for name in set(state_dict) - set(expected))
    wrong = [
        f"{origin.get(name, name)} has shape {list(state_dict[name].shape)}, expected {list(shape)}"
        for name, shape in expected.items()
        if name in state_dict and tuple(state_dict[name].shape) != shape
    ]
    if missing or unexpected or wrong:
        parts = [f"missing {_listing(missing)}"] if missing else []
        parts += [f"unexpected {_listing(unexpected)}"] if unexpected else []
        if wrong:
            more = f" (… {len(wrong) - 8} more)" if len(wrong) > 8 else ""
            parts.append(f"shape mismatch: {'; '.join(wrong[:8])}{more}")
        raise ConversionError(
            f"{source}: the checkpoint does not fit the backbone (width {config.hidden_size}, "
            f"{config.vision_config.num_hidden_layers} layers): {' | '.join(parts)}."
        )


def save_converted(
    converted: ConvertedCheckpoint,
    output_dir: str | os.PathLike,
    *,
    training_data: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the model (safetensors + config.json), `preprocessor_config.json` and a model card into `output_dir`."""
    from .image_processing_visualad import VisualADImageProcessor
    from .model_card import create_model_card

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    converted.model.save_pretrained(output)
    VisualADImageProcessor.from_model_config(converted.model.config).save_pretrained(output)
    card = create_model_card(
        converted.model.config,
        base_model=converted.backbone.base_model,
        training_data=training_data,
        source="converted",
        conversion=converted.provenance(),
        model_name=model_name,
        repo_id=repo_id,
    )
    card.save(output / "README.md")
    return output


def infer_training_data(checkpoint_path: str | os.PathLike) -> str | None:
    """`visa` / `mvtec` from the released folder names (`weight/train_on_visa/CLIP.pth`), else None."""
    match = re.search(r"train_on_(visa|mvtec)", os.fspath(checkpoint_path).lower())
    return match.group(1) if match else None


def push_folder_to_hub(
    folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload a finished folder; failures say the local folder is complete and how to retry."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=os.fspath(folder), commit_message="Add VisualAD converted from the release"
        )
    except Exception as error:  # offline, network, authentication, permissions: all leave a complete local folder
        raise ConversionError(
            f"The converted model in {folder} is complete, but pushing it to {repo_id} failed "
            f"({type(error).__name__}: {str(error)[:200]}). Retry where the Hub is reachable and you are logged in: "
            f"hf upload {repo_id} {folder}"
        ) from error
    return str(getattr(commit, "commit_url", commit))


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone",
        required=True,
        help=f"CLIP backbone: the OpenAI ViT-L-14-336px.pt file ({OPENAI_VIT_L14_336_URL}), a plain state dict, a "
        f"Hugging Face folder, or a Hub id such as {HUB_VIT_L14_336}.",
    )
    parser.add_argument("--checkpoint", required=True, help="The authors' VisualAD checkpoint (CLIP.pth).")
    parser.add_argument("--output", required=True, help="Folder to write the converted model into.")
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="Attention heads of an OpenAI-layout backbone; default width // 64 (OpenAI's rule; 16 for ViT-L/14).",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Saved parameter dtype.")
    parser.add_argument(
        "--training-data",
        default=None,
        help="What the checkpoint was trained on, for the model card: 'visa', 'mvtec' or free text. "
        "Read from the released folder name (train_on_visa / train_on_mvtec) when omitted.",
    )
    parser.add_argument("--model-name", default=None, help="Title of the model card.")
    parser.add_argument(
        "--push-to-hub", metavar="REPO_ID", default=None, help="Also upload the finished folder to this Hub repo."
    )
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument("--revision", default=None, help="Revision of a Hub backbone.")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one).")


def run(args: argparse.Namespace) -> int:
    try:
        converted = convert_checkpoint(
            args.backbone, args.checkpoint, num_heads=args.num_heads, dtype=DTYPES[args.dtype],
            revision=args.revision, token=args.token,
        )
        training_data = args.training_data or infer_training_data(args.checkpoint)
        output = save_converted(
            converted, args.output, training_data=training_data, model_name=args.model_name, repo_id=args.push_to_hub
        )
        config = converted.model.config
        print(
            f"Converted {args.checkpoint} on {converted.backbone.layout} ({args.backbone}) -> {output}\n"
            f"  width {config.hidden_size}, {config.vision_config.num_hidden_layers} layers, "
            f"{config.vision_config.num_attention_heads} heads, feature layers {config.feature_layers}, "
            f"input {config.image_size}px, {config.num_anchors} anchors, dtype {args.dtype}"
        )
        if args.push_to_hub:
            print(f"Pushed to {push_folder_to_hub(output, args.push_to_hub, private=args.private, token=args.token)}")
    except ConversionError as error:
        print(f"visualad convert: error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import run_command

    return run_command("convert", argv, prog="python -m visualad_hf.convert")


__all__ = [
    "ClipBackbone",
    "ConversionError",
    "ConvertedCheckpoint",
    "convert_checkpoint",
    "infer_training_data",
    "is_torchscript_archive",
    "load_backbone",
    "load_torchscript_tensors",
    "load_visualad_checkpoint",
    "openai_clip_to_hf",
    "push_folder_to_hub",
    "read_state_dict",
    "save_converted",
    "visualad_head_to_hf",
]


if __name__ == "__main__":
    sys.exit(main())
