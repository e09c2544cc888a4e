"""Shared test setup: offline hub, one thread per worker, tiny random backbones."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import struct  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Test data lives in the repository: a fresh clone has no ../shared beside it.
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
PARITY_DIR = FIXTURES_DIR / "official_parity"
RELEASED_PARITY_DIR = FIXTURES_DIR / "official_parity_released"


def tiny_vision_config(kind: str = "clip", **overrides):
    """A 4-layer, width-64 backbone config of the given family ("clip", "dinov2", "dinov2_registers")."""
    from transformers import CLIPVisionConfig, Dinov2Config, Dinov2WithRegistersConfig

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, patch_size=14)
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
    defaults = dict(feature_layers=[1, 2, 3, 4], image_size=70)
    return VisualADConfig(vision_config=tiny_vision_config(kind, **vision_overrides), **{**defaults, **overrides})


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
