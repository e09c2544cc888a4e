"""Few-shot reference mode: a per-layer memory bank of normal patch features, fused into VisualAD's layer maps.

A zero-shot VisualAD model scores each patch against two learned tokens. Given K good images of one product, the
bank keeps, for every feature layer, the patch features the maps already use (the backbone's output at that layer
after the final LayerNorm, unit-normalised). At inference each patch's distance to its nearest bank patch,

    D_ℓ(p) = 1 − max_b cos(P_ℓ(p), B_ℓ(b)),

is divided by the bank's own typical distance `s_ℓ` (the mean nearest-neighbour distance of each reference image's
patches to the *other* reference images; with one image, to the other patches of that image), so that `D_ℓ / s_ℓ`
is about 1 on normal surfaces whatever the backbone or layer, and fused with the layer map `M_ℓ`:

    "add":     M_ℓ + w · D_ℓ / s_ℓ        (config.reference_fusion, config.reference_weight)
    "replace": D_ℓ / s_ℓ                  (the nearest-neighbour map alone, for comparison)

The bank is module state (non-persistent buffers), so `.to()`, dtype casts and a traced/exported graph carry it; it
is saved beside the weights as `reference_bank.safetensors` (exactly, with the facts it was built under as metadata)
and loaded by `from_pretrained`. A bank built for another backbone, feature layers or input size is refused.

This module is model-side: it imports only torch, safetensors and the configuration, so it can be copied into a Hub
folder with the modeling file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_visualad import REFERENCE_FUSIONS, VisualADConfig
from .errors import VisualADError

REFERENCE_BANK_FILE = "reference_bank.safetensors"
FORMAT_VERSION = 1
COSINE_EPS = 1e-8
# Relative tolerance when comparing backbone signatures: wide enough for a bf16/fp16 cast of the same weights
# (which moves a tensor's mean |w| by ~1e-4), far below what another backbone or a re-trained LayerNorm changes.
SIGNATURE_RTOL = 1e-3
# Elements of one similarity block (batch·patches × bank rows) computed at a time: bounds the memory of a lookup.
SIMILARITY_BLOCK_ELEMENTS = 1 << 24


class ReferenceBankError(VisualADError):
    """A reference bank cannot be built, read or used; the message says why and what to do."""


class ReferenceBankMismatchError(ReferenceBankError):
    """A reference bank was built for another backbone, feature layers or input size than the model's."""


def backbone_signature(backbone: nn.Module) -> list[float]:
    """Mean |w| of each backbone tensor (final LayerNorm included), in name order: a cheap, dtype-tolerant
    fingerprint of the weights that produce the bank's features."""
    with torch.no_grad():
        return [float(t.detach().float().abs().mean()) for _, t in sorted(backbone.state_dict().items())
                if t.is_floating_point() and t.numel()]  # fmt: skip


def backbone_description(config: VisualADConfig) -> dict:
    vision = config.vision_config
    return {
        "model_type": vision.model_type,
        "hidden_size": int(vision.hidden_size),
        "num_hidden_layers": int(vision.num_hidden_layers),
        "patch_size": int(vision.patch_size),
        "name_or_path": getattr(vision, "_name_or_path", "") or getattr(config, "_name_or_path", "") or "",
    }


class VisualADReferenceBank(nn.Module):
    """Normal patch features per feature layer (buffers `features_{i}`, `[num_bank_patches, hidden]`, unit norm) and
    their typical nearest-neighbour distances (`scales`, `[num_layers]`). Empty until `build` or `load`."""

    def __init__(self, config: VisualADConfig):
        super().__init__()
        self.num_layers = len(config.feature_layers)
        for index in range(self.num_layers):
            self.register_buffer(f"features_{index}", None, persistent=False)
        self.register_buffer("scales", None, persistent=False)
        self.metadata: dict | None = None

    @property
    def is_set(self) -> bool:
        return self.metadata is not None

    @property
    def num_images(self) -> int:
        return int(self.metadata["num_images"]) if self.metadata else 0

    @property
    def grid(self) -> tuple[int, int] | None:
        return tuple(self.metadata["grid"]) if self.metadata else None

    def layer_features(self, index: int) -> torch.Tensor:
        return getattr(self, f"features_{index}")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The bank's tensors by name (what is saved)."""
        if not self.is_set:
            return {}
        named = {f"features_{i}": self.layer_features(i) for i in range(self.num_layers)}
        return {**named, "scales": self.scales}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # -------------------------------------------------------------------------------------------- building

    def build(self, layer_patches: Sequence[torch.Tensor], metadata: dict) -> None:
        """Fill the bank from `layer_patches`: one `[K, num_patches, hidden]` tensor per feature layer."""
        if len(layer_patches) != self.num_layers:
            raise ReferenceBankError(f"expected patches of {self.num_layers} feature layers, got {len(layer_patches)}")
        scales = []
        for index, patches in enumerate(layer_patches):
            normalised = F.normalize(patches.float(), dim=-1, eps=COSINE_EPS)
            scales.append(_self_distance(normalised))
            self._set_buffer(f"features_{index}", normalised.flatten(0, 1).to(patches.dtype).contiguous())
        self._set_buffer("scales", torch.stack(scales).to(layer_patches[0].dtype))
        self.metadata = dict(metadata)

    def clear(self) -> None:
        for name in list(self._buffers):
            self._buffers[name] = None
        self.metadata = None

    def _set_buffer(self, name: str, tensor: torch.Tensor) -> None:
        self._buffers[name] = tensor

    # ------------------------------------------------------------------------------------------- inference

    def distances(self, index: int, patches: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour cosine distance `[batch, num_patches]` of `patches` `[batch, num_patches, hidden]` to
        layer `index`'s bank, divided by the bank's typical distance."""
        bank = self.layer_features(index).to(patches.dtype)
        queries = F.normalize(patches, dim=-1, eps=COSINE_EPS).flatten(0, 1)
        block = max(1, SIMILARITY_BLOCK_ELEMENTS // max(1, queries.shape[0]))
        best = None
        for start in range(0, bank.shape[0], block):
            similarity = torch.matmul(queries, bank[start : start + block].T).amax(dim=1)
            best = similarity if best is None else torch.maximum(best, similarity)
        distance = (1.0 - best).clamp_min(0.0) / self.scales[index].to(patches.dtype).clamp_min(COSINE_EPS)
        return distance.reshape(patches.shape[:2])

    def fuse(
        self, layer_maps: torch.Tensor, layer_patches: Sequence[torch.Tensor], fusion: str, weight: float
    ) -> torch.Tensor:
        """Fuse `layer_maps` `[batch, num_layers, gh, gw]` with the nearest-neighbour distance of each layer's
        patches (see the module docstring for the rules)."""
        grid = tuple(layer_maps.shape[-2:])
        if grid != self.grid:
            raise ReferenceBankMismatchError(
                f"the reference bank was built from images with a {self.grid[0]}x{self.grid[1]} patch grid "
                f"({self.metadata['image_size'][0]}x{self.metadata['image_size'][1]} px), but this input gives "
                f"{grid[0]}x{grid[1]}; resize inputs to the bank's size or rebuild it with model.set_reference(...)"
            )
        distance = torch.stack([self.distances(i, p) for i, p in enumerate(layer_patches)], dim=1)
        distance = distance.reshape(layer_maps.shape).to(layer_maps.dtype)
        if fusion == "replace":
            return distance
        return layer_maps + weight * distance

    # -------------------------------------------------------------------------------------------- file I/O

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank to `path` (safetensors; metadata as JSON in the header)."""
        from safetensors.torch import save_file

        if not self.is_set:
            raise ReferenceBankError("the model has no reference bank to save; call model.set_reference(images) first")
        path = Path(path)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors().items()}
        header = {"format": "visualad-reference-bank", "format_version": str(FORMAT_VERSION),
                  "visualad_reference": json.dumps(self.metadata, sort_keys=True)}  # fmt: skip
        save_file(tensors, str(path), metadata=header)
        return path

    def load(self, path: str | os.PathLike, expected: dict, *, device=None, dtype=None) -> None:
        """Read a bank written by `save` and check that it fits the model described by `expected` (the metadata
        `build` would record for this model, minus the image-specific fields)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, ValueError, RuntimeError) as error:  # safetensors raises SafetensorError (a ValueError)
            raise ReferenceBankError(
                f"{path}: not a readable reference bank ({type(error).__name__}: {str(error)[:200]}); rebuild it with "
                "`visualad reference --model M --normal good/ --output M2`"
            ) from error
        if header.get("format") != "visualad-reference-bank" or "visualad_reference" not in header:
            raise ReferenceBankError(
                f"{path}: this safetensors file is not a VisualAD reference bank (no visualad_reference metadata); "
                "rebuild it with `visualad reference`"
            )
        metadata = json.loads(header["visualad_reference"])
        check_compatible(metadata, expected, str(path))
        names = [f"features_{i}" for i in range(self.num_layers)] + ["scales"]
        missing = [name for name in names if name not in tensors]
        if missing:
            raise ReferenceBankError(f"{path}: the reference bank lacks tensors {missing}; rebuild it")
        for name in names:
            tensor = tensors[name]
            self._set_buffer(name, tensor.to(device=device, dtype=dtype if dtype is not None else tensor.dtype))
        self.metadata = metadata


class ReferenceMixin:
    """The few-shot API of `VisualADModel`: `set_reference`, `clear_reference`, `save_reference`, `load_reference`,
    and the forward hook `apply_reference`. Expects `self.reference_bank`, `self.config`, `self.backbone`,
    `self.final_layernorm` and a forward that calls `apply_reference(kept, layer_maps)`."""

    _reference_collector: list | None = None

    def reference_patch_features(self, kept: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Per feature layer, the patch features the maps use: the layer's patches after the final LayerNorm."""
        start = 2 + self.config.num_prefix_tokens
        return [self.final_layernorm(kept[layer][:, start:]) for layer in self.config.feature_layers]

    def apply_reference(self, kept: dict[int, torch.Tensor], layer_maps: torch.Tensor) -> torch.Tensor:
        """Forward hook: collect reference features while `set_reference` runs, else fuse the bank (if any)."""
        if self._reference_collector is not None:
            self._reference_collector.append([p.detach() for p in self.reference_patch_features(kept)])
            return layer_maps
        if not self.reference_bank.is_set:
            return layer_maps
        patches = self.reference_patch_features(kept)
        return self.reference_bank.fuse(layer_maps, patches, self.config.reference_fusion, self.config.reference_weight)

    def reference_expectations(self) -> dict:
        """What a bank must have been built under to fit this model (see `check_compatible`)."""
        size = self.config.image_size
        return {
            "backbone": backbone_description(self.config),
            "backbone_signature": backbone_signature(self.backbone),
            "feature_layers": list(self.config.feature_layers),
            "image_size": [size, size],
        }

    @torch.no_grad()
    def set_reference(self, images, *, batch_size: int = 8, image_processor=None, names: Sequence[str] | None = None):
        """Build the few-shot reference bank from K normal images of one product; later forwards fuse it.

        Args:
            images: `pixel_values` `[K, 3, S, S]` at `config.image_size`, or a list of images (paths, PIL images,
                arrays) prepared with `image_processor` (default: the one matching the model config).
            batch_size: images per backbone pass while building.
            names: optional labels of the images (e.g. file names), recorded in the bank's metadata.

        Returns:
            The bank (`model.reference_bank`).
        """
        pixel_values = self._reference_pixel_values(images, image_processor)
        count = pixel_values.shape[0]
        if count < 1:
            raise ReferenceBankError("set_reference needs at least one normal image")
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            height, width = pixel_values.shape[-2:]
            raise ReferenceBankMismatchError(
                f"reference images are {height}x{width} px but the model takes {size}x{size} (config.image_size); "
                "prepare them with the model's image processor"
            )
        was_training = self.training
        self.eval()
        self._reference_collector = collected = []
        try:
            parameter = next(self.parameters())
            for start in range(0, count, batch_size):
                chunk = pixel_values[start : start + batch_size].to(parameter.device, parameter.dtype)
                outputs = self(pixel_values=chunk, return_dict=True)
            grid = tuple(outputs.layer_anomaly_maps.shape[-2:])
        finally:
            self._reference_collector = None
            self.train(was_training)
        layer_patches = [torch.cat([batch[i] for batch in collected]) for i in range(len(self.config.feature_layers))]
        metadata = {**self.reference_expectations(), "num_images": count, "grid": list(grid),
                    "format_version": FORMAT_VERSION, "images": list(names) if names is not None else []}  # fmt: skip
        self.reference_bank.build(layer_patches, metadata)
        self.config.reference_num_images = count
        return self.reference_bank

    def _reference_pixel_values(self, images, image_processor) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return images
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            images = [images]
        if image_processor is None:
            from .image_processing_visualad import VisualADImageProcessor

            image_processor = VisualADImageProcessor.from_model_config(self.config)
        return image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def clear_reference(self) -> None:
        """Back to zero-shot: drop the reference bank."""
        self.reference_bank.clear()
        self.config.reference_num_images = None

    def save_reference(self, path: str | os.PathLike) -> Path:
        """Write the bank alone to `path` (a `.safetensors` file)."""
        return self.reference_bank.save(path)

    def load_reference(self, path: str | os.PathLike) -> None:
        """Read a bank written by `save_reference`/`save_pretrained`; refused when built for another backbone,
        other feature layers or another input size."""
        path = Path(path)
        if not path.is_file():
            raise ReferenceBankError(f"{path}: no such reference bank file; build one with `visualad reference`")
        parameter = next(self.parameters())
        self.reference_bank.load(path, self.reference_expectations(), device=parameter.device, dtype=parameter.dtype)
        self.config.reference_num_images = self.reference_bank.num_images

    def _save_reference_to_folder(self, save_directory: str | os.PathLike) -> None:
        """`save_pretrained`'s hook: write the bank beside the weights, or remove a stale one."""
        path = Path(save_directory) / REFERENCE_BANK_FILE
        if self.reference_bank.is_set:
            self.reference_bank.save(path)
        else:
            path.unlink(missing_ok=True)

    def _load_reference_from(self, source: str | os.PathLike, hub_kwargs: dict) -> None:
        """`from_pretrained`'s hook: load the folder's (or Hub repo's) bank when there is one."""
        folder = Path(source)
        expected = self.config.reference_num_images
        if folder.is_dir():
            path = folder / hub_kwargs.get("subfolder", "") / REFERENCE_BANK_FILE
            path = path if path.is_file() else None
        elif expected:  # a Hub repo: ask for the file only when its config.json announces a bank
            from transformers.utils import cached_file

            keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            resolved = cached_file(str(source), REFERENCE_BANK_FILE, _raise_exceptions_for_missing_entries=False,
                                   _raise_exceptions_for_connection_errors=False,
                                   **{k: hub_kwargs[k] for k in keys if hub_kwargs.get(k) is not None})  # fmt: skip
            path = Path(resolved) if resolved else None
        else:
            path = None
        if path is None:
            if expected:
                raise ReferenceBankError(
                    f"{source}: config.json says the model has a reference bank of {expected} images, but "
                    f"{REFERENCE_BANK_FILE} is missing; copy it into the folder, or set reference_num_images to "
                    "null in config.json for the zero-shot model"
                )
            return
        self.load_reference(path)


def check_compatible(metadata: dict, expected: dict, source: str) -> None:
    """Raise `ReferenceBankMismatchError` when a bank's metadata does not fit the model's (`expected`)."""
    built, model = metadata.get("backbone", {}), expected["backbone"]
    fix = "rebuild the bank for this model: `visualad reference --model M --normal good/ --output M2`"
    keys = ("model_type", "hidden_size", "num_hidden_layers", "patch_size")
    if any(built.get(k) != model[k] for k in keys):
        def show(d: dict) -> str:
            layers, patch = d.get("num_hidden_layers"), d.get("patch_size")
            return f"{d.get('model_type')}, width {d.get('hidden_size')}, {layers} layers, patch {patch}"

        raise ReferenceBankMismatchError(
            f"{source}: the reference bank was built with another backbone ({show(built)}) than this model's "
            f"({show(model)}); {fix}"
        )
    if list(metadata.get("feature_layers", [])) != list(expected["feature_layers"]):
        raise ReferenceBankMismatchError(
            f"{source}: the reference bank holds feature layers {metadata.get('feature_layers')}, the model uses "
            f"{expected['feature_layers']}; {fix}"
        )
    size, own_size = list(metadata.get("image_size", [])), list(expected["image_size"])
    if size != own_size:
        raise ReferenceBankMismatchError(
            f"{source}: the reference bank was built from {size[0]}x{size[1]} px inputs, but the model takes "
            f"{own_size[0]}x{own_size[1]} px (config.image_size); {fix}"
        )
    signature, own = metadata.get("backbone_signature", []), expected["backbone_signature"]
    if len(signature) != len(own) or not all(math.isclose(a, b, rel_tol=SIGNATURE_RTOL, abs_tol=1e-12)
                                             for a, b in zip(signature, own)):  # fmt: skip
        raise ReferenceBankMismatchError(
            f"{source}: the reference bank was built with other backbone weights (or another final LayerNorm, e.g. "
            f"before fine-tuning) than this model's, same architecture; {fix}"
        )


def _self_distance(normalised: torch.Tensor) -> torch.Tensor:
    """Mean nearest-neighbour distance of each image's patches to the other images' patches (one image: to its own
    other patches): the distance a normal patch typically has, used to put `D_ℓ` on a common scale."""
    count, num_patches, _ = normalised.shape
    flat = normalised.flatten(0, 1)
    owner = torch.arange(count, device=flat.device).repeat_interleave(num_patches)
    totals = []
    for image in range(count):
        queries = normalised[image]
        similarity = torch.matmul(queries, flat.T)
        if count > 1:
            similarity[:, owner == image] = -2.0
        else:
            similarity.fill_diagonal_(-2.0)
        totals.append((1.0 - similarity.amax(dim=1)).clamp_min(0.0).mean())
    return torch.stack(totals).mean()


__all__ = [
    "REFERENCE_BANK_FILE",
    "REFERENCE_FUSIONS",
    "ReferenceBankError",
    "ReferenceBankMismatchError",
    "ReferenceMixin",
    "VisualADReferenceBank",
    "backbone_description",
    "backbone_signature",
    "check_compatible",
]
