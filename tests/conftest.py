"""Shared test setup: offline hub, one thread per worker, tiny random backbones."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

torch.set_num_threads(1)

# Test data lives in the repository: a fresh clone has no ../shared beside it.
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
PARITY_DIR = FIXTURES_DIR / "official_parity"
RELEASED_PARITY_DIR = FIXTURES_DIR / "official_parity_released"


def tiny_vision_config(kind: str = "clip", **overrides):
    """A 4-layer, width-64 backbone config of the given family ("clip", "dinov2", "dinov2_registers")."""
    from transformers import CLIPVisionConfig, Dinov2Config, Dinov2WithRegistersConfig

    common = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2, "patch_size": 14}
    if kind == "clip":
        return CLIPVisionConfig(**{**common, "image_size": 56, **overrides})
    if kind == "dinov2":
        common.pop("intermediate_size")
        return Dinov2Config(**{**common, "mlp_ratio": 2, "image_size": 56, **overrides})
    if kind == "dinov2_registers":
        common.pop("intermediate_size")
        return Dinov2WithRegistersConfig(**{**common, "mlp_ratio": 2, "image_size": 56, "num_register_tokens": 2, **overrides})
    raise ValueError(kind)


def tiny_visualad_config(kind: str = "clip", **overrides):
    """VisualAD heads on a tiny backbone: 70 px input (5x5 grid), all four layers as feature layers."""
    from visualad_hf import VisualADConfig

    vision_overrides = overrides.pop("vision_overrides", {})
    defaults = {"feature_layers": [1, 2, 3, 4], "image_size": 70}
    return VisualADConfig(vision_config=tiny_vision_config(kind, **vision_overrides), **{**defaults, **overrides})


@dataclass(frozen=True)
class Family:
    """One backbone family in the shared test parametrisation (tests/test_backbones.py).

    `vision_config(**overrides)` builds a tiny random config (4 layers, width 64, native grid 4x4); `hidden_states`
    runs the backbone's *own* forward on normalised `pixel_values` and returns its per-layer hidden states;
    `image_mean` is the normalisation the family publishes; `license` the Hub licence id its card states.
    """

    name: str
    vision_config: Callable[..., Any]
    image_mean: tuple[float, ...]
    license: str
    hidden_states: Callable[[Any, Any], tuple] = lambda backbone, pixel_values: backbone(
        pixel_values, output_hidden_states=True
    ).hidden_states

    @property
    def patch_size(self) -> int:
        return self.vision_config().patch_size

    @property
    def native_size(self) -> int:
        return 4 * self.patch_size


def _tiny(config_class_name: str, **values):
    import transformers

    def build(**overrides):
        return getattr(transformers, config_class_name)(**{**values, **overrides})

    return build


_TINY = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2}


def _siglip2_hidden_states(backbone, pixel_values):
    from visualad_hf.backbones import backbone_adapter

    patches, spatial_shapes = backbone_adapter(backbone.config).patchify(pixel_values)
    mask = torch.ones(patches.shape[:2], dtype=torch.long)
    return backbone(
        pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=spatial_shapes, output_hidden_states=True
    ).hidden_states


def _radio_hidden_states(backbone, pixel_values):
    # RADIO normalises [0, 1] pixels itself; VisualAD's processor normalises instead, so undo it for the reference.
    conditioner = backbone.input_conditioner
    raw = pixel_values * conditioner.norm_std + conditioner.norm_mean
    return backbone(raw, output_hidden_states=True).hidden_states


def _families() -> dict[str, Family]:
    from transformers.image_utils import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_STANDARD_MEAN,
        OPENAI_CLIP_MEAN,
    )

    return {
        family.name: family
        for family in (
            Family("clip", lambda **o: tiny_vision_config("clip", **o), tuple(OPENAI_CLIP_MEAN), "mit"),
            Family("dinov2", lambda **o: tiny_vision_config("dinov2", **o), tuple(IMAGENET_DEFAULT_MEAN), "apache-2.0"),
            Family(
                "dinov2_registers",
                lambda **o: tiny_vision_config("dinov2_registers", **o),
                tuple(IMAGENET_DEFAULT_MEAN),
                "apache-2.0",
            ),
            Family(
                "dinov3",
                _tiny("DINOv3ViTConfig", **_TINY, intermediate_size=128, patch_size=16, image_size=64,
                      num_register_tokens=4),
                tuple(IMAGENET_DEFAULT_MEAN),
                "other",
            ),
            Family(
                "siglip",
                _tiny("SiglipVisionConfig", **_TINY, intermediate_size=128, patch_size=16, image_size=64),
                tuple(IMAGENET_STANDARD_MEAN),
                "apache-2.0",
            ),
            Family(
                "siglip2_naflex",
                _tiny("Siglip2VisionConfig", **_TINY, intermediate_size=128, patch_size=16, num_patches=16),
                (0.5, 0.5, 0.5),
                "apache-2.0",
                _siglip2_hidden_states,
            ),
            Family(
                "radio",
                _tiny("RadioConfig", **_TINY, mlp_ratio=2.0, patch_size=16, image_size=64, max_img_size=128,
                      num_cls_tokens=2, num_registers=2),
                tuple(OPENAI_CLIP_MEAN),
                "other",
                _radio_hidden_states,
            ),
        )
    }


#: Every backbone family, by name: adding a family is one adapter module plus one entry here.
FAMILIES: dict[str, Family] = _families()


@pytest.fixture
def tiny_config():
    return tiny_visualad_config("clip")


def save_tiny_model(folder, **config_overrides):
    """Save a seeded tiny VisualAD model and its image processor to `folder` (a model directory for pipelines/CLIs)."""
    from visualad_hf import VisualADImageProcessor, VisualADModel

    torch.manual_seed(0)
    config = tiny_visualad_config("clip", **config_overrides)
    VisualADModel(config).eval().save_pretrained(folder)
    VisualADImageProcessor.from_model_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_visualad"))



def png_header_only(path, width: int, height: int) -> None:
    """A PNG that declares `width x height` pixels but holds almost nothing: a decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
