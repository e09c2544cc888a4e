"""The one interface through which VisualAD reaches into a frozen ViT, whatever its family.

VisualAD (SPEC §1) needs six things from a backbone: the input sequence built from pixels (prefix tokens such as CLS
and registers, position information), the pre-LayerNorm if there is one, the transformer layers, whatever those layers
need per call (RoPE tables, masks), the final norm it trains, and the position embedding its two tokens get. Families
keep these parts under different names and some compute them differently; a `BackboneAdapter` subclass per family
answers these questions so that the model, the image processor, the converter, the trainer and the model card never
ask "which backbone is this?".

Adapters are plain objects bound to one backbone config; methods that touch weights take the backbone module as an
argument, so the model's state dict (`backbone.*`) stays the backbone's own.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig

# The paper's input: 518 px, i.e. 37x37 patches of 14 px (SPEC §1). Other patch sizes get the largest multiple of the
# patch not above it (512 px = 32x32 patches of 16 px), so the patch count and the SCA position table stay in range.
REFERENCE_IMAGE_SIZE = 518

# PIL resampling filters by their `PILImageResampling` values (what preprocessor_config.json stores).
BILINEAR = 2
BICUBIC = 3

# Position-table resizes VisualAD can do itself (SPEC §1: the released CLIP checkpoint needs bilinear), and "backbone":
# let the backbone's own embedding code do it.
TABLE_INTERPOLATIONS = ("bilinear", "bicubic", "backbone")


@dataclass(frozen=True)
class BackboneCard:
    """What a model card states about a backbone family.

    `license` is the Hub licence id; `"other"` comes with `license_name` and `license_link`, which the Hub expects in
    the metadata for a licence it does not list, and `license_title`, its name as a reader knows it.
    `paper_results` holds the VisualAD paper's numbers with this backbone (dataset -> metric -> percent) and is empty
    for families the paper did not run.
    """

    name: str
    family: str
    hub_id: str
    license: str
    tag: str
    reference_shape: tuple[int, int, int]
    reference_image_size: int | None = None
    license_name: str | None = None
    license_title: str | None = None
    license_link: str | None = None
    #: Whether the VisualAD authors released checkpoints on this backbone (`visualad convert` converts those).
    released_checkpoints: bool = False
    paper_results: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def short_name(self) -> str:
        """The family without the architecture word ("DINOv2" for "DINOv2 ViT"), for sentences."""
        return self.family.removesuffix(" ViT")


class BackboneAdapter(ABC):
    """How VisualAD builds, runs and trains on one family of ViT backbones (see the module docstring).

    Subclasses set the class attributes and implement `layers`, `final_norm`, `embed` and `token_position`; the
    rest has defaults that fit a plain pre-norm ViT with absolute position embeddings.
    """

    #: `model_type`s of the vision configs this adapter runs.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: `model_type`s of multi-tower configs (e.g. a full CLIP) whose `vision_config` this adapter runs.
    container_model_types: ClassVar[tuple[str, ...]] = ()
    #: Class names of the backbone's transformer layers (kept whole when a model is split across devices).
    layer_class_names: ClassVar[tuple[str, ...]] = ()
    card: ClassVar[BackboneCard]
    #: The family's published normalisation, used when the backbone folder has no preprocessor_config.json.
    image_mean: ClassVar[tuple[float, float, float]]
    image_std: ClassVar[tuple[float, float, float]]
    #: PIL filter the family's own image processor resizes with.
    resample: ClassVar[int] = BICUBIC
    #: Values `VisualADConfig.position_interpolation` may take for this family, and the default.
    position_interpolations: ClassVar[tuple[str, ...]] = ("backbone",)
    default_position_interpolation: ClassVar[str] = "backbone"

    def __init__(self, config: PreTrainedConfig):
        self.config = config

    # --- facts read from the backbone config ------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def patch_size(self) -> int:
        """Square patch side in pixels (a `(h, w)` pair in the config is accepted when both sides are equal)."""
        patch = self.config.patch_size
        if isinstance(patch, Iterable):
            sides = {int(side) for side in patch}
            if len(sides) != 1:
                raise ValueError(
                    f"{self.config.model_type} patch_size={list(patch)} is not square; VisualAD's patch grid and maps "
                    "assume square patches."
                )
            return sides.pop()
        return int(patch)

    @property
    def num_prefix_tokens(self) -> int:
        """Backbone tokens before the patches (CLS, registers); VisualAD's two tokens go in front of them."""
        return 1

    @property
    def layer_norm_eps(self) -> float:
        return float(getattr(self.config, "layer_norm_eps", 1e-5))

    def default_image_size(self) -> int:
        return (REFERENCE_IMAGE_SIZE // self.patch_size) * self.patch_size

    def normalization(self) -> tuple[list[float], list[float]]:
        """The family's published mean/std (overridden where the config itself carries them)."""
        return list(self.image_mean), list(self.image_std)

    def normalization_from_preprocessor(self, processor: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
        """Mean/std from a backbone's preprocessor_config.json, or None when it does not normalise."""
        if not processor.get("do_normalize", True):
            return None
        mean, std = processor.get("image_mean"), processor.get("image_std")
        if mean is None or std is None:
            return None
        return _three_floats(mean), _three_floats(std)

    def check_config(self) -> None:
        """Raise ValueError (one line, with the fix) for variants of the family VisualAD cannot run faithfully."""
        _ = self.patch_size

    # --- the backbone's parts --------------------------------------------------------------------------------------

    @abstractmethod
    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        """The backbone's transformer layers, in order."""

    @abstractmethod
    def final_norm(self, backbone: nn.Module) -> nn.Module | None:
        """The backbone's final norm, which VisualAD trains; None when the family has none (VisualAD adds one)."""

    def pre_norm(self, backbone: nn.Module) -> nn.Module | None:
        """A norm applied to the sequence before the first layer (CLIP's `pre_layrnorm`), if any."""
        return None

    def eval_only_modules(self, backbone: nn.Module) -> list[nn.Module]:
        """Modules that must stay in eval mode while VisualAD trains (training-time augmentations of the backbone)."""
        return []

    # --- running it -----------------------------------------------------------------------------------------------

    @abstractmethod
    def embed(self, backbone: nn.Module, pixel_values: torch.Tensor, interpolation: str) -> torch.Tensor:
        """The backbone's input sequence `[prefix tokens, patches]` with its positions, before any pre-norm."""

    @abstractmethod
    def token_position(self, backbone: nn.Module) -> torch.Tensor:
        """Position embedding `(hidden,)` the two VisualAD tokens get (SPEC §1: CLIP's CLS position)."""

    def layer_kwargs(self, backbone: nn.Module, pixel_values: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments every layer needs for this input (e.g. RoPE tables); none for absolute positions."""
        return {}

    def run_layers(
        self,
        backbone: nn.Module,
        hidden_states: torch.Tensor,
        keep_layers: Iterable[int],
        layer_kwargs: Mapping[str, Any],
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """The pre-norm and every layer, unchanged, on any sequence; the outputs of the 1-indexed `keep_layers`."""
        keep = set(keep_layers)
        norm = self.pre_norm(backbone)
        if norm is not None:
            hidden_states = norm(hidden_states)
        kept: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers(backbone), start=1):
            # The mask goes positionally (None: every token sees every token); the sequence too, so that
            # gradient checkpointing, which wraps `forward`, passes gradients on to the tokens.
            hidden_states = layer(hidden_states, None, **layer_kwargs)
            if index in keep:
                kept[index] = hidden_states
        return kept, hidden_states

    # --- shared helpers -------------------------------------------------------------------------------------------

    def grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        height, width = pixel_values.shape[-2:]
        return height // self.patch_size, width // self.patch_size

    @staticmethod
    def resize_position_grid(table: torch.Tensor, grid: tuple[int, int], mode: str) -> torch.Tensor:
        """A square `(n*n, hidden)` patch position table resized to `grid` (`align_corners=False`, no antialias,
        computed in float32), as the released CLIP code does for its table (SPEC §1)."""
        native = math.isqrt(table.shape[0])
        if (native, native) == tuple(grid):
            return table
        resized = F.interpolate(
            table.float().reshape(1, native, native, -1).permute(0, 3, 1, 2), size=grid, mode=mode, align_corners=False
        )
        return resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(table.dtype)


def _three_floats(value: float | Iterable[float]) -> list[float]:
    """A per-channel setting as a list (processors may store one number for all channels)."""
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]


__all__ = ["BICUBIC", "BILINEAR", "TABLE_INTERPOLATIONS", "BackboneAdapter", "BackboneCard"]
