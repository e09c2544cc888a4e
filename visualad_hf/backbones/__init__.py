"""Backbone adapters: one per ViT family, found by the backbone config's `model_type`.

Everything outside this package asks `backbone_adapter(vision_config)` (or the helpers below) instead of branching on
the family. Adding a family is one adapter module here plus one entry in `ADAPTERS` (and one row in the tests'
`FAMILIES` table).
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from .base import TABLE_INTERPOLATIONS, BackboneAdapter, BackboneCard
from .clip import ClipAdapter
from .dinov2 import Dinov2Adapter
from .dinov3 import Dinov3Adapter
from .paper import METRIC_ORDER, paper_results
from .radio import RadioAdapter
from .siglip import SiglipAdapter
from .siglip2 import Siglip2NaflexAdapter

#: Every supported family, in the order error messages list them.
ADAPTERS: tuple[type[BackboneAdapter], ...] = (
    ClipAdapter,
    Dinov2Adapter,
    Dinov3Adapter,
    SiglipAdapter,
    Siglip2NaflexAdapter,
    RadioAdapter,
)

_BY_MODEL_TYPE: dict[str, type[BackboneAdapter]] = {
    model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types
}
_BY_CONTAINER: dict[str, type[BackboneAdapter]] = {
    model_type: adapter for adapter in ADAPTERS for model_type in adapter.container_model_types
}


class UnsupportedBackboneError(ValueError):
    """A backbone config of a family VisualAD has no adapter for. (A ValueError like every config error; this package
    imports only its own modules, so that it can be copied into Hub folders flattened.)"""


def supported_model_types() -> tuple[str, ...]:
    """Vision-config `model_type`s VisualAD runs on."""
    return tuple(_BY_MODEL_TYPE)


def supported_families() -> str:
    """A one-line list of the supported families with their `model_type`s, for error messages."""
    return "; ".join(f"{adapter.card.family} ({', '.join(adapter.model_types)})" for adapter in ADAPTERS)


def backbone_adapter(config: PreTrainedConfig) -> BackboneAdapter:
    """The adapter for a backbone (vision) config; UnsupportedBackboneError names the supported families."""
    model_type = getattr(config, "model_type", None)
    adapter = _BY_MODEL_TYPE.get(model_type)
    if adapter is None:
        hint = " (a multi-tower config: pass its vision_config)" if model_type in _BY_CONTAINER else ""
        raise UnsupportedBackboneError(
            f"vision_config.model_type={model_type!r} is not supported{hint}; VisualAD runs on: {supported_families()}."
        )
    instance = adapter(config)
    instance.check_config()
    return instance


def vision_config_of(config: PreTrainedConfig, source: str) -> PreTrainedConfig:
    """The vision tower's config in a backbone folder's config (a full CLIP/SigLIP config holds it as
    `vision_config`); UnsupportedBackboneError when `source` is not a supported ViT family."""
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_CONTAINER:
        config = config.vision_config
    elif model_type not in _BY_MODEL_TYPE:
        raise UnsupportedBackboneError(
            f"{source!r} is a {model_type!r} model; VisualAD needs a ViT backbone of a supported family: "
            f"{supported_families()}."
        )
    return config


def layer_class_names() -> list[str]:
    """Transformer-layer class names of every family (`_no_split_modules`)."""
    return [name for adapter in ADAPTERS for name in adapter.layer_class_names]


def family_cards() -> dict[str, BackboneCard]:
    """Model-card facts per family, keyed by the card's tag."""
    return {adapter.card.tag: adapter.card for adapter in ADAPTERS}


__all__ = [
    "ADAPTERS",
    "METRIC_ORDER",
    "TABLE_INTERPOLATIONS",
    "BackboneAdapter",
    "BackboneCard",
    "UnsupportedBackboneError",
    "backbone_adapter",
    "family_cards",
    "layer_class_names",
    "paper_results",
    "supported_families",
    "supported_model_types",
    "vision_config_of",
]
