"""Synthetic defects pasted onto normal images, with exact masks: training from good images only.

Two families, after the ideas of DRAEM and CutPaste (our own code):

- **Perlin** (`"perlin"`): a mask from thresholded Perlin gradient noise (random lattice resolution per axis, so the
  blobs range from large and smooth to small and scattered), filled with a texture blended into the image,
  `out = (1 - M)·I + M·((1 - β)·T + β·I)` with β drawn from `blend_range`. The texture T is another image of the
  batch, flipped/rotated and re-lit (`"images"`), or a procedural pattern: stripes, checks or smooth noise in random
  colours (`"procedural"`).
- **Cut-paste** (`"cutpaste"`): a rectangle of the image itself (area 2–15 % of the image, aspect 0.3–3.3, or a thin
  "scar" strip), re-lit and pasted elsewhere.

The mask is **exact**: True on precisely the pixels whose value changed (a drawn region whose pixels happen to keep
their value is not marked). The synthesis works at the model's input size (the image is resized first, as the image
processor would), so the processor's own resize of image and mask is the identity and the mask stays exact.

```python
from visualad_hf.data.anomaly_synthesis import AnomalySynthesizer, SynthesizingCollator

synth = AnomalySynthesizer(probability=0.5, methods=("perlin", "cutpaste"), textures=("images", "procedural"))
image, mask = synth(pil_image, np.random.default_rng(0), textures=[other_rgb_array])   # uint8 HWC, bool HW
collate = SynthesizingCollator(VisualADCollator(processor), synth, seed=111)          # any dataset's normal rows
```

`SynthesizingCollator` draws each row's randomness from (seed, image path, epoch), so a run is reproducible, resumes
exactly, and sees new defects every epoch (`set_epoch`). Rows that are already anomalous are left as they are.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

SYNTHESIS_METHODS = ("perlin", "cutpaste")
TEXTURE_SOURCES = ("images", "procedural")


def perlin_noise(shape: tuple[int, int], resolution: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise of `shape` with `resolution` lattice cells per axis; values in about [-0.7, 0.7]."""
    height, width = shape
    cells_y, cells_x = resolution
    angles = rng.uniform(0.0, 2.0 * np.pi, (cells_y + 1, cells_x + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = (np.arange(height) + 0.5) * cells_y / height
    x = (np.arange(width) + 0.5) * cells_x / width
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[(y0 + dy)[:, None], (x0 + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return top * (1 - uy) + bottom * uy


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, area_range: tuple[float, float]) -> np.ndarray:
    """A blob mask: Perlin noise (lattice 2^0..2^3 cells per axis) above the quantile leaving `area` of the image."""
    resolution = (2 ** int(rng.integers(0, 4)), 2 ** int(rng.integers(0, 4)))
    noise = perlin_noise(shape, resolution, rng)
    area = rng.uniform(*area_range)
    return noise > np.quantile(noise, 1.0 - area)


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Stripes, checks or smooth noise between two random colours, float RGB `[H, W, 3]` in 0..255."""
    height, width = shape
    y, x = np.meshgrid(np.arange(height) / height, np.arange(width) / width, indexing="ij")
    kind = int(rng.integers(3))
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.04, 0.2)
    u, v = math.cos(angle) * x + math.sin(angle) * y, -math.sin(angle) * x + math.cos(angle) * y
    if kind == 0:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    elif kind == 1:
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(float)
    else:
        t = perlin_noise(shape, (int(rng.integers(2, 9)), int(rng.integers(2, 9))), rng) + 0.5
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return low + (high - low) * np.clip(t, 0, 1)[..., None]


def image_texture(source: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Another image as a texture: resized to `shape`, rotated by a multiple of 90°, maybe mirrored, re-lit."""
    picture = Image.fromarray(source).convert("RGB").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    array = np.rot90(np.asarray(picture, dtype=float), k=int(rng.integers(4)))
    if array.shape[:2] != tuple(shape):  # a non-square image turned by 90°
        array = np.asarray(Image.fromarray(array.astype(np.uint8)).resize((shape[1], shape[0])), dtype=float)
    if rng.random() < 0.5:
        array = array[:, ::-1]
    contrast, brightness = rng.uniform(0.6, 1.4), rng.uniform(-40, 40)
    return np.clip((array - array.mean()) * contrast + array.mean() + brightness, 0, 255)


@dataclass
class AnomalySynthesizer:
    """Pastes one synthetic defect on an image (see the module docstring).

    Args:
        probability: chance that a normal row becomes anomalous (`SynthesizingCollator`); DRAEM uses one half.
        methods: subset of `("perlin", "cutpaste")`, drawn with equal chance.
        textures: texture sources of the Perlin defects, subset of `("images", "procedural")`; `"images"` needs
            other images (falls back to procedural without them).
        blend_range: range of β, the share of the original image kept under a Perlin texture.
        area_range: fraction of the image a Perlin mask covers.
        min_area: smallest fraction of changed pixels for a defect to count; smaller draws are retried.
    """

    probability: float = 0.5
    methods: Sequence[str] = SYNTHESIS_METHODS
    textures: Sequence[str] = TEXTURE_SOURCES
    blend_range: tuple[float, float] = (0.0, 0.6)
    area_range: tuple[float, float] = (0.02, 0.15)
    min_area: float = 0.005
    max_attempts: int = 10

    def __post_init__(self):
        self.methods, self.textures = tuple(self.methods), tuple(self.textures)
        if not self.methods or any(m not in SYNTHESIS_METHODS for m in self.methods):
            raise ValueError(f"synthesis methods {list(self.methods)}: choose a non-empty subset of {SYNTHESIS_METHODS}")
        if not self.textures or any(t not in TEXTURE_SOURCES for t in self.textures):
            raise ValueError(f"synthesis textures {list(self.textures)}: choose a non-empty subset of {TEXTURE_SOURCES}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"synthesis probability {self.probability} must lie in [0, 1]")
        low, high = self.blend_range
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"blend_range {self.blend_range} must satisfy 0 <= low <= high < 1")

    def __call__(
        self, image: Image.Image | np.ndarray, rng: np.random.Generator, textures: Sequence[np.ndarray] = ()
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """`(defective uint8 RGB [H, W, 3], exact bool mask [H, W], method)`; the mask may be empty if no draw
        changed enough pixels in `max_attempts` tries (then the image is returned unchanged)."""
        original = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
        if original.ndim != 3 or original.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {original.shape}")
        minimum = max(1, int(self.min_area * original.shape[0] * original.shape[1]))
        method = self.methods[int(rng.integers(len(self.methods)))]
        for _ in range(self.max_attempts):
            drawn, region = (self._perlin if method == "perlin" else self._cutpaste)(original, rng, textures)
            result = np.where(region[..., None], np.clip(np.rint(drawn), 0, 255), original).astype(np.uint8)
            mask = np.any(result != original, axis=-1)
            if mask.sum() >= minimum:
                return result, mask, method
        return original.copy(), np.zeros(original.shape[:2], bool), method

    def _perlin(self, original: np.ndarray, rng: np.random.Generator, textures: Sequence[np.ndarray]):
        shape = original.shape[:2]
        region = perlin_mask(shape, rng, self.area_range)
        source = self.textures[int(rng.integers(len(self.textures)))]
        if source == "images" and len(textures):
            texture = image_texture(textures[int(rng.integers(len(textures)))], shape, rng)
        else:
            texture = procedural_texture(shape, rng)
        beta = rng.uniform(*self.blend_range)
        return (1.0 - beta) * texture + beta * original.astype(float), region

    def _cutpaste(self, original: np.ndarray, rng: np.random.Generator, textures: Sequence[np.ndarray]):
        height, width = original.shape[:2]
        if rng.random() < 0.5:  # a rectangle
            area = rng.uniform(0.02, 0.15) * height * width
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            ph, pw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        else:  # a scar: a thin strip, horizontal or vertical
            long, thin = int(rng.uniform(0.15, 0.35) * max(height, width)), max(2, int(rng.uniform(0.02, 0.05) * height))
            ph, pw = (thin, long) if rng.random() < 0.5 else (long, thin)
        ph, pw = max(2, min(ph, height - 1)), max(2, min(pw, width - 1))
        sy, sx = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
        ty, tx = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
        patch = original[sy : sy + ph, sx : sx + pw].astype(float)
        patch = (patch - patch.mean()) * rng.uniform(0.7, 1.3) + patch.mean() + rng.choice([-1, 1]) * rng.uniform(20, 60)
        drawn = original.astype(float).copy()
        drawn[ty : ty + ph, tx : tx + pw] = patch
        region = np.zeros((height, width), bool)
        region[ty : ty + ph, tx : tx + pw] = True
        return drawn, region


class SynthesizingCollator:
    """Wraps a row collator: normal rows become anomalous with the synthesizer's probability, with exact masks.

    Each row's random numbers come from `(seed, image path or row position, epoch)`; textures from other images are
    the batch's other images. Rows are resized to `size` (the model input; PIL bicubic, as the image processor does)
    before the defect is drawn.
    """

    def __init__(self, collator, synthesizer: AnomalySynthesizer, *, seed: int, size: tuple[int, int] | None = None):
        self.collator, self.synthesizer, self.seed = collator, synthesizer, int(seed)
        processor_size = getattr(getattr(collator, "image_processor", None), "size", None) or {}
        self.size = size or ((processor_size["height"], processor_size["width"]) if processor_size else None)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        resized = [self._resized(row["image"]) for row in rows]
        arrays = [np.asarray(image) for image in resized]
        out = []
        for index, (row, image) in enumerate(zip(rows, resized)):
            key = str(row.get("image_path") or index)
            rng = np.random.default_rng([self.seed, zlib.crc32(key.encode("utf-8")), self.epoch])
            if int(row.get("label", 0)) != 0 or rng.random() >= self.synthesizer.probability:
                out.append({**row, "mask": row.get("mask")})  # every row has a mask column for the collator
                continue
            others = [a for j, a in enumerate(arrays) if j != index]
            result, mask, method = self.synthesizer(image, rng, others)
            anomalous = bool(mask.any())
            out.append({**row, "image": Image.fromarray(result), "label": int(anomalous),
                        "mask": Image.fromarray(mask.astype(np.uint8) * 255) if anomalous else None,
                        "defect_type": f"synthetic_{method}" if anomalous else row.get("defect_type", "good")})  # fmt: skip
        return self.collator(out)

    def _resized(self, image) -> Image.Image:
        picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        picture = picture.convert("RGB")
        if self.size is not None and picture.size != (self.size[1], self.size[0]):
            picture = picture.resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC)
        return picture


def synthesizing_collator(collator, data_args, *, seed: int) -> SynthesizingCollator:
    """The trainer's hook: wrap `collator` as `--synthesize_anomalies` and the `--synthesis_*` arguments say."""
    synthesizer = AnomalySynthesizer(
        probability=data_args.synthesis_probability,
        methods=data_args.synthesis_methods or SYNTHESIS_METHODS,
        textures=data_args.synthesis_textures or TEXTURE_SOURCES,
    )
    return SynthesizingCollator(collator, synthesizer, seed=seed)


__all__ = [
    "SYNTHESIS_METHODS",
    "TEXTURE_SOURCES",
    "AnomalySynthesizer",
    "SynthesizingCollator",
    "image_texture",
    "perlin_mask",
    "perlin_noise",
    "procedural_texture",
    "synthesizing_collator",
]
