"""A deterministic synthetic zero-shot anomaly benchmark, written to disk in the MVTec AD layout.

Eight families of small images: four textures (`stripes`, `checker`, `grain`, `cloud`) and four objects on a dark
background (`disc`, `ring`, `nut`, `capsule`). Anomalous images carry one drawn defect: a `scratch`, a `hole`, a
`stain` or a `cut_paste` patch (a rotated, re-lit piece of the same image). The auxiliary (training) and target
(evaluation) sides use disjoint families, which is the zero-shot protocol: by default the model trains on stripes,
grain, disc and nut and is evaluated on checker, cloud, ring and capsule (two textures and two objects on each side).
That split is the one split of the package: `visualad synthetic`, `SyntheticBenchmark.load`, the offline demo and
`training/configs/synthetic_tiny.yaml` all use it.

Guarantees: the same arguments give the same files, whatever else is generated (each image draws from its own
`numpy` generator seeded by (seed, category, split, defect type, index)); a mask is True exactly on the pixels a
defect changed, and every such pixel differs from the defect-free image. Images are RGB PNG, masks 0/255 PNG, so
both survive the disk round trip exactly.

    <out>/<category>/train/good/000.png
    <out>/<category>/test/good/000.png
    <out>/<category>/test/<defect>/000.png
    <out>/<category>/ground_truth/<defect>/000_mask.png
    <out>/meta.json        AnomalyCLIP-style index of the same files
    <out>/benchmark.json   the generation settings (read back by `SyntheticBenchmark.from_dir`)

Load a side with `SyntheticBenchmark.load("target")` or `load_anomaly_dataset("mvtec", out, categories=...)`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import VisualADError

DEFECT_TYPES = ("scratch", "hole", "stain", "cut_paste")
# The one auxiliary/target split (resources/synthetic_tiny.yaml names the same families; a test checks it).
DEFAULT_AUXILIARY = ("stripes", "grain", "disc", "nut")
DEFAULT_TARGET = ("checker", "cloud", "ring", "capsule")
MANIFEST = "benchmark.json"
FORMAT_VERSION = 1
_SPLIT_IDS = {"train": 0, "test": 1}

class SyntheticBenchmarkError(VisualADError, ValueError):
    """Bad settings for the synthetic benchmark, or an output folder that holds something else."""


Renderer = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]  # -> (float RGB [S,S,3], fg [S,S])


# ------------------------------------------------------------------------------------------------ drawing


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): (y, x), each [S, S]."""
    t = (np.arange(size) + 0.5) / size
    return np.meshgrid(t, t, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a (cells+1)^2 random lattice, bilinearly upsampled to [S, S]."""
    lattice = rng.random((cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _blend(low: Sequence[float], high: Sequence[float], t: np.ndarray) -> np.ndarray:
    low_, high_ = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    return low_ + (high_ - low_) * t[..., None]


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float = 10.0) -> np.ndarray:
    return np.asarray(colour, dtype=float) + rng.uniform(-amount, amount, 3)


def _polygon_mask(size: int, points: Sequence[tuple[float, float]]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points], fill=255)
    return np.asarray(canvas) > 0


def _rotate(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * u - s * v, s * u + c * v


# ----------------------------------------------------------------------------------------------- families


def _stripes(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid(size)
    angle = math.radians(30 + rng.uniform(-8, 8))
    u, _ = _rotate(x, y, angle)
    period = rng.uniform(0.13, 0.16)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (u / period + rng.random()))
    return _blend(_jitter(rng, (45, 60, 140)), _jitter(rng, (205, 212, 232)), t), np.ones((size, size), bool)


def _checker(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid(size)
    u, v = _rotate(x - 0.5, y - 0.5, math.radians(rng.uniform(-6, 6)))
    cell = rng.uniform(0.115, 0.135)
    t = ((np.floor(u / cell + rng.random()) + np.floor(v / cell + rng.random())) % 2).astype(float)
    return _blend(_jitter(rng, (120, 78, 40)), _jitter(rng, (225, 205, 130)), t), np.ones((size, size), bool)


def _grain(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Wood-like: growth rings around a far-away centre, warped by smooth noise."""
    y, x = _grid(size)
    cy, cx = rng.uniform(-1.2, -0.6), rng.uniform(0.2, 0.8)
    distance = np.sqrt((x - cx) ** 2 + 0.15 * (y - cy) ** 2)
    warp = _smooth_noise(rng, size, 4)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (distance * rng.uniform(9, 11) + 0.9 * warp))
    return _blend(_jitter(rng, (150, 98, 52)), _jitter(rng, (214, 168, 108)), t**1.5), np.ones((size, size), bool)


def _cloud(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Marble/leather-like: two octaves of value noise on a green-grey ramp."""
    t = 0.65 * _smooth_noise(rng, size, 4) + 0.35 * _smooth_noise(rng, size, 9)
    return _blend(_jitter(rng, (80, 120, 100)), _jitter(rng, (190, 212, 192)), t), np.ones((size, size), bool)


def _on_background(rng: np.random.Generator, size: int, fg: np.ndarray, body: np.ndarray) -> np.ndarray:
    background = _blend(_jitter(rng, (34, 34, 40), 4), _jitter(rng, (58, 58, 66), 4), _smooth_noise(rng, size, 3))
    return np.where(fg[..., None], body, background)


def _centre(rng: np.random.Generator) -> tuple[float, float]:
    return 0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05)


def _disc(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid(size)
    cy, cx = _centre(rng)
    r = np.hypot(y - cy, x - cx) / rng.uniform(0.3, 0.34)
    fg = r < 1
    body = _blend(_jitter(rng, (150, 75, 35)), _jitter(rng, (235, 150, 80)), np.clip(1 - r, 0, 1) ** 0.6)
    return _on_background(rng, size, fg, body), fg


def _ring(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid(size)
    cy, cx = _centre(rng)
    r = np.hypot(y - cy, x - cx)
    outer, inner = rng.uniform(0.37, 0.41), rng.uniform(0.18, 0.21)
    fg = (r < outer) & (r > inner)
    shade = 0.5 + 0.5 * np.cos(np.arctan2(y - cy, x - cx) - rng.uniform(0, 2 * np.pi))
    body = _blend(_jitter(rng, (120, 122, 135)), _jitter(rng, (215, 215, 225)), shade)
    return _on_background(rng, size, fg, body), fg


def _nut(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid(size)
    cy, cx = _centre(rng)
    radius, turn = rng.uniform(0.35, 0.38), rng.uniform(0, np.pi / 3)
    corners = [
        (size * (cx + radius * math.cos(turn + k * np.pi / 3)), size * (cy + radius * math.sin(turn + k * np.pi / 3)))
        for k in range(6)
    ]
    fg = _polygon_mask(size, corners) & (np.hypot(y - cy, x - cx) > rng.uniform(0.12, 0.14))
    body = _blend(_jitter(rng, (110, 125, 60)), _jitter(rng, (185, 200, 110)), 0.5 + 0.5 * (x - y))
    return _on_background(rng, size, fg, body), fg


def _capsule(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid(size)
    cy, cx = _centre(rng)
    u, v = _rotate(x - cx, y - cy, math.radians(rng.uniform(-12, 12)))
    half, radius = rng.uniform(0.2, 0.23), rng.uniform(0.14, 0.16)
    distance = np.hypot(np.clip(np.abs(u) - half, 0, None), v)
    fg = distance < radius
    left = _blend(_jitter(rng, (150, 30, 35)), _jitter(rng, (225, 70, 70)), 1 - np.abs(v) / radius)
    right = _blend(_jitter(rng, (185, 185, 175)), _jitter(rng, (245, 245, 238)), 1 - np.abs(v) / radius)
    return _on_background(rng, size, fg, np.where((u < 0)[..., None], left, right)), fg


FAMILIES: dict[str, tuple[str, Renderer]] = {
    "stripes": ("texture", _stripes),
    "checker": ("texture", _checker),
    "grain": ("texture", _grain),
    "cloud": ("texture", _cloud),
    "disc": ("object", _disc),
    "ring": ("object", _ring),
    "nut": ("object", _nut),
    "capsule": ("object", _capsule),
}


# ------------------------------------------------------------------------------------------------ defects


def _contrast_colour(rng: np.random.Generator, local: np.ndarray) -> np.ndarray:
    """Near-black on light surfaces, near-white on dark ones: a defect a small model can see."""
    dark = local.mean() > 110
    return _jitter(rng, (22, 20, 24) if dark else (238, 236, 230), 8)


def _pick_point(rng: np.random.Generator, fg: np.ndarray, margin: int) -> tuple[int, int]:
    """A foreground pixel at least `margin` pixels from the border."""
    inner = np.zeros_like(fg)
    inner[margin:-margin, margin:-margin] = fg[margin:-margin, margin:-margin]
    ys, xs = np.nonzero(inner if inner.any() else fg)
    k = rng.integers(len(ys))
    return int(ys[k]), int(xs[k])


def _scratch(rng, clean, fg):
    size = clean.shape[0]
    cy, cx = _pick_point(rng, fg, size // 8)
    length, angle = rng.uniform(0.35, 0.55) * size, rng.uniform(0, np.pi)
    bend = rng.uniform(-0.5, 0.5)
    points = []
    for t in (-0.5, 0.0, 0.5):
        a = angle + bend * t
        points.append((cx + t * length * math.cos(a), cy + t * length * math.sin(a)))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line(points, fill=255, width=max(3, size // 24), joint="curve")
    region = (np.asarray(canvas) > 0) & fg
    return region, _fill(clean, region, _contrast_colour(rng, clean[region]) if region.any() else 0)


def _hole(rng, clean, fg):
    size = clean.shape[0]
    cy, cx = _pick_point(rng, fg, size // 8)
    ry, rx = rng.uniform(0.07, 0.11, 2) * size
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    region = (np.asarray(canvas) > 0) & fg
    return region, _fill(clean, region, _contrast_colour(rng, clean[region]) if region.any() else 0)


STAIN_TINTS = ((150, 40, 165), (40, 165, 70), (205, 45, 40), (235, 205, 35), (30, 110, 215))


def _stain(rng, clean, fg):
    size = clean.shape[0]
    cy, cx = _pick_point(rng, fg, size // 8)
    radius = rng.uniform(0.09, 0.14) * size
    angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
    radii = radius * rng.uniform(0.6, 1.0, 12)
    region = _polygon_mask(size, list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))) & fg
    tints = np.asarray(STAIN_TINTS, dtype=float)
    distance = np.linalg.norm(tints - clean[region].mean(axis=0), axis=1) if region.any() else np.ones(len(tints))
    visible = np.flatnonzero(distance >= 0.6 * distance.max())  # a tint that stands out from the surface
    tint = tints[visible[rng.integers(len(visible))]]
    image = clean.copy()
    image[region] = 0.3 * clean[region] + 0.7 * tint
    return region, image


def _cut_paste(rng, clean, fg):
    """A square patch of the same image, rotated by 90/180/270 degrees, mirrored and re-lit, pasted elsewhere."""
    size = clean.shape[0]
    side = int(rng.uniform(0.18, 0.27) * size)
    sy, sx = rng.integers(0, size - side, 2)
    patch = np.rot90(clean[sy : sy + side, sx : sx + side], k=int(rng.integers(1, 4)))[:, ::-1]
    cy, cx = _pick_point(rng, fg, side // 2 + 1)
    top, left = min(max(cy - side // 2, 0), size - side), min(max(cx - side // 2, 0), size - side)
    region = np.zeros_like(fg)
    region[top : top + side, left : left + side] = True
    region &= fg
    image = clean.copy()
    pasted = image[top : top + side, left : left + side]
    keep = region[top : top + side, left : left + side]
    # re-light away from what it covers, so the patch stands out even on a look-alike surface
    brighter = patch[keep].mean() >= pasted[keep].mean() if keep.any() else True
    pasted[keep] = np.clip(patch[keep] + (1 if brighter else -1) * rng.uniform(45, 70), 0, 255)
    return region, image


def _fill(clean: np.ndarray, region: np.ndarray, colour) -> np.ndarray:
    image = clean.copy()
    image[region] = colour
    return image


DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "cut_paste": _cut_paste}


# ------------------------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class SyntheticSample:
    image: np.ndarray  # uint8 [S, S, 3]
    clean: np.ndarray  # the same image without its defect (equal to `image` for normal samples)
    mask: np.ndarray  # bool [S, S]: True exactly where `image` differs from `clean`
    category: str
    defect_type: str  # "good" for normal samples


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def render_sample(
    category: str, index: int, *, defect_type: str = "good", split: str = "test", seed: int = 0, image_size: int = 96
) -> SyntheticSample:
    """Render one image of the benchmark (what `generate_synthetic_benchmark` writes for that slot)."""
    if category not in FAMILIES:
        raise ValueError(f"unknown synthetic category {category!r}; choose from {', '.join(FAMILIES)}")
    if defect_type != "good" and defect_type not in DEFECTS:
        raise ValueError(f"unknown defect type {defect_type!r}; choose from good, {', '.join(DEFECTS)}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    rng = np.random.default_rng([seed, _stable_id(category), _SPLIT_IDS[split], _stable_id(defect_type), index])
    body, fg = FAMILIES[category][1](rng, image_size)
    clean = np.clip(body + rng.normal(0.0, 3.0, body.shape), 0, 255).round().astype(np.uint8)
    if defect_type == "good":
        return SyntheticSample(clean, clean, np.zeros(fg.shape, bool), category, defect_type)
    minimum_area = max(16, int(0.008 * image_size * image_size))
    for _ in range(50):
        region, drawn = DEFECTS[defect_type](rng, clean.astype(float), fg)
        if region.sum() >= minimum_area:
            break
    else:  # pragma: no cover - the families leave plenty of foreground
        raise RuntimeError(f"could not place a {defect_type} on {category} image {index}")
    image = clean.copy()
    image[region] = np.clip(drawn[region], 0, 255).round().astype(np.uint8)
    unchanged = region & np.all(image == clean, axis=-1)
    image[unchanged] = 255 - clean[unchanged]  # never equal to clean: 255 - c == c has no integer solution
    return SyntheticSample(image, clean, region, category, defect_type)


# ---------------------------------------------------------------------------------------------- benchmark


@dataclass(frozen=True)
class SyntheticBenchmark:
    """A generated benchmark: where it is and which categories belong to which side."""

    root: Path
    auxiliary_categories: tuple[str, ...]
    target_categories: tuple[str, ...]
    seed: int
    image_size: int
    defect_types: tuple[str, ...] = DEFECT_TYPES

    @property
    def categories(self) -> tuple[str, ...]:
        return self.auxiliary_categories + self.target_categories

    def side_categories(self, side: str) -> tuple[str, ...]:
        if side not in ("auxiliary", "target"):
            raise ValueError(f"side must be 'auxiliary' or 'target', got {side!r}")
        return self.auxiliary_categories if side == "auxiliary" else self.target_categories

    def load(self, side: str = "target", split: str = "test", *, cache_dir: str | os.PathLike | None = None):
        """One side as a `datasets.Dataset` (the MVTec loader, restricted to that side's categories)."""
        from .builders import load_anomaly_dataset

        return load_anomaly_dataset("mvtec", self.root, split, self.side_categories(side), cache_dir=cache_dir)

    @classmethod
    def from_dir(cls, root: str | os.PathLike) -> SyntheticBenchmark:
        manifest = Path(root) / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{root} holds no {MANIFEST}; generate it with `visualad synthetic --out {root}`")
        settings = json.loads(manifest.read_text(encoding="utf-8"))
        return cls(
            root=Path(root).absolute(),
            auxiliary_categories=tuple(settings["auxiliary_categories"]),
            target_categories=tuple(settings["target_categories"]),
            seed=settings["seed"],
            image_size=settings["image_size"],
            defect_types=tuple(settings["defect_types"]),
        )


def generate_synthetic_benchmark(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    image_size: int = 96,
    auxiliary_categories: Sequence[str] = DEFAULT_AUXILIARY,
    target_categories: Sequence[str] = DEFAULT_TARGET,
    defect_types: Sequence[str] = DEFECT_TYPES,
    num_train: int = 8,
    num_test_normal: int = 8,
    num_test_anomalous: int = 12,
) -> SyntheticBenchmark:
    """Write the benchmark to `out_dir` (MVTec layout, see the module docstring) and describe it.

    Anomalous test images cycle through `defect_types`, so each gets `num_test_anomalous / len(defect_types)`.
    `out_dir` must be empty, missing, or a previous synthetic benchmark, whose files are replaced; any other
    non-empty folder is refused rather than mixed into.
    """
    auxiliary, target = tuple(auxiliary_categories), tuple(target_categories)
    overlap = sorted(set(auxiliary) & set(target))
    if overlap:
        raise ValueError(f"auxiliary and target categories must be disjoint (zero-shot); both hold {overlap}")
    for name in (*auxiliary, *target):
        if name not in FAMILIES:
            raise ValueError(f"unknown synthetic category {name!r}; choose from {', '.join(FAMILIES)}")
    if not defect_types or any(d not in DEFECTS for d in defect_types):
        raise ValueError(f"defect_types must be a non-empty subset of {', '.join(DEFECTS)}, got {list(defect_types)}")
    if min(num_train, num_test_normal, num_test_anomalous) < 0:
        raise ValueError("image counts must be >= 0")
    root = Path(out_dir).absolute()
    _prepare_output(root)
    settings = {
        "generator": __name__,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "image_size": image_size,
        "auxiliary_categories": list(auxiliary),
        "target_categories": list(target),
        "defect_types": list(defect_types),
        "num_train": num_train,
        "num_test_normal": num_test_normal,
        "num_test_anomalous": num_test_anomalous,
    }
    meta: dict[str, dict[str, list[dict]]] = {"train": {}, "test": {}}
    render = {"seed": seed, "image_size": image_size}
    for category in (*auxiliary, *target):
        records = meta["train"][category] = []
        for i in range(num_train):
            records.append(_write(root, render_sample(category, i, split="train", **render), f"train/good/{i:03d}"))
        records = meta["test"][category] = []
        for i in range(num_test_normal):
            records.append(_write(root, render_sample(category, i, **render), f"test/good/{i:03d}"))
        for j in range(num_test_anomalous):
            defect, i = defect_types[j % len(defect_types)], j // len(defect_types)
            sample = render_sample(category, i, defect_type=defect, **render)
            records.append(_write(root, sample, f"test/{defect}/{i:03d}"))
    (root / "meta.json").write_text(json.dumps(meta, indent=4) + "\n", encoding="utf-8")
    (root / MANIFEST).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return SyntheticBenchmark(root, auxiliary, target, seed, image_size, tuple(defect_types))


def _prepare_output(root: Path) -> None:
    if not root.exists() or not any(root.iterdir()):
        root.mkdir(parents=True, exist_ok=True)
        return
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise FileExistsError(f"{root} is not empty and holds no synthetic benchmark; choose an empty or new folder")
    previous = json.loads(manifest.read_text(encoding="utf-8"))
    for category in previous.get("auxiliary_categories", []) + previous.get("target_categories", []):
        if category in FAMILIES and (root / category).is_dir():
            shutil.rmtree(root / category)
    for name in ("meta.json", MANIFEST):
        (root / name).unlink(missing_ok=True)


def _write(root: Path, sample: SyntheticSample, stem: str) -> dict:
    """Write one image (and its mask) under `<root>/<category>/`; return its AnomalyCLIP meta record."""
    category = sample.category
    image_path = f"{category}/{stem}.png"
    (root / image_path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample.image, "RGB").save(root / image_path)
    mask_path = ""
    if sample.defect_type != "good":
        mask_path = f"{category}/ground_truth/{sample.defect_type}/{Path(stem).name}_mask.png"
        (root / mask_path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample.mask.astype(np.uint8) * 255, "L").save(root / mask_path)
    return {
        "img_path": image_path,
        "mask_path": mask_path,
        "cls_name": category,
        "specie_name": sample.defect_type,
        "anomaly": int(sample.defect_type != "good"),
    }
