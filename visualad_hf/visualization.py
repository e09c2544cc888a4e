"""Heatmaps, overlays and result panels for anomaly maps, drawn with PIL and numpy only (no matplotlib, no OpenCV)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL_BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)
ANOMALOUS_COLOUR = (200, 30, 30)
NORMAL_COLOUR = (30, 130, 60)


def normalize_map(anomaly_map: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Map values to [0, 1]: by `value_range` (vmin, vmax) when given, else by the map's own min..max.

    Per-map scaling shows where a map is highest but makes every image look anomalous somewhere; pass a fixed
    `value_range` (e.g. the same for a whole run) to compare images with one another.
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    low, high = value_range if value_range is not None else (float(values.min()), float(values.max()))
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def colorize(anomaly_map: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """An `[H, W]` map as an `[H, W, 3]` uint8 "jet" heatmap (blue low, red high)."""
    x = normalize_map(anomaly_map, value_range)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue peaks along the jet ramp
    rgb = np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


def _as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_size(image: Image.Image, anomaly_map: np.ndarray) -> None:
    if tuple(anomaly_map.shape) != (image.height, image.width):
        raise ValueError(
            f"anomaly_map has shape {tuple(anomaly_map.shape)} but the image is {image.height}x{image.width} (HxW); "
            "resize the map to the image first (the pipeline returns maps at the original image size)."
        )


def heatmap_image(anomaly_map: np.ndarray, value_range: tuple[float, float] | None = None) -> Image.Image:
    """The map alone as an RGB heatmap image."""
    return Image.fromarray(colorize(anomaly_map, value_range), mode="RGB")


def overlay_heatmap(
    image: Image.Image | np.ndarray,
    anomaly_map: np.ndarray,
    alpha: float = 0.5,
    value_range: tuple[float, float] | None = None,
) -> Image.Image:
    """`image` blended with the heatmap of `anomaly_map` (same size), `alpha` being the heatmap's weight."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1].")
    image = _as_rgb(image)
    anomaly_map = np.asarray(anomaly_map)
    _check_size(image, anomaly_map)
    return Image.blend(image, heatmap_image(anomaly_map, value_range), alpha)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at `size` pixels: the one font of every panel, figure and colour bar."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def describe_result(score: float, threshold: float | None = None) -> str:
    """One line for a result: score, and the decision when a threshold is known."""
    text = f"score {score:.4f}"
    if threshold is not None:
        verdict = "ANOMALOUS" if score >= threshold else "normal"
        text += f"  |  threshold {threshold:.4f}  ->  {verdict}"
    return text


def render_panel(
    image: Image.Image | np.ndarray,
    anomaly_map: np.ndarray,
    score: float,
    threshold: float | None = None,
    *,
    title: str | None = None,
    alpha: float = 0.5,
    value_range: tuple[float, float] | None = None,
    min_side: int = 256,
    max_side: int = 512,
) -> Image.Image:
    """A result panel: image | heatmap | overlay side by side, under a caption with the score (and decision).

    Each tile is scaled so that its longer side lies within `min_side..max_side` pixels: panels of large images stay
    small and those of small images stay readable.
    """
    image = _as_rgb(image)
    anomaly_map = np.asarray(anomaly_map)
    _check_size(image, anomaly_map)
    tiles = [image, heatmap_image(anomaly_map, value_range), overlay_heatmap(image, anomaly_map, alpha, value_range)]
    longer = max(image.size)
    scale = min(max(longer, min_side), max_side) / longer
    if scale != 1.0:
        tile_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        tiles = [tile.resize(tile_size, Image.Resampling.BILINEAR) for tile in tiles]
    tile_width, tile_height = tiles[0].size
    gap = 8
    font_size = max(12, min(24, tile_width // 16))
    text_font = _font(font_size)
    lines = [line for line in (title, describe_result(score, threshold)) if line]
    line_height = font_size + 6
    header = gap + line_height * len(lines)
    panel = Image.new("RGB", (3 * tile_width + 4 * gap, header + tile_height + gap), PANEL_BACKGROUND)
    draw = ImageDraw.Draw(panel)
    for row, line in enumerate(lines):
        colour = TEXT_COLOUR
        if line is lines[-1] and threshold is not None:
            colour = ANOMALOUS_COLOUR if score >= threshold else NORMAL_COLOUR
        draw.text((gap, gap + row * line_height), line, fill=colour, font=text_font)
    for column, tile in enumerate(tiles):
        panel.paste(tile, (gap + column * (tile_width + gap), header))
    return panel


@dataclass(frozen=True)
class ColourScale:
    """A fixed heatmap colour range and where it comes from (written beside the colour bar, so a reader knows what
    red means)."""

    low: float
    high: float
    source: str

    def as_range(self) -> tuple[float, float]:
        return (self.low, self.high)


def colour_bar(
    scale: ColourScale, height: int, threshold: float | None = None, font=None, width: int = 14
) -> Image.Image:
    """A vertical "jet" bar for `scale` (high at the top) with its end values written beside it, and the threshold
    marked when one is given."""
    font = font or _font(12)
    ramp = np.linspace(1.0, 0.0, max(height, 2), dtype=np.float32)[:, None].repeat(width, axis=1)
    bar = Image.fromarray(colorize(ramp, (0.0, 1.0)), mode="RGB")
    values = [scale.low, scale.high] + ([threshold] if threshold is not None else [])
    label_width = max(int(font.getlength(f"{value:.2f}")) for value in values) + 8
    image = Image.new("RGB", (width + 4 + label_width, max(height, 2)), PANEL_BACKGROUND)
    image.paste(bar, (0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width - 1, image.height - 1), outline=TEXT_COLOUR)
    text_height = font.getbbox("0.123456789-")[3] + 2
    draw.text((width + 4, 0), f"{scale.high:.2f}", fill=TEXT_COLOUR, font=font)
    draw.text((width + 4, image.height - text_height), f"{scale.low:.2f}", fill=TEXT_COLOUR, font=font)
    if threshold is not None and scale.high > scale.low:
        y = round(min(max((scale.high - threshold) / (scale.high - scale.low), 0.0), 1.0) * (image.height - 1))
        draw.line((0, y, width + 2, y), fill=(0, 0, 0), width=2)
        draw.text((width + 4, min(max(y - text_height // 2, text_height), image.height - 2 * text_height)),
                  f"{threshold:.2f}", fill=(0, 0, 0), font=font)  # fmt: skip
    return image


def render_grid(
    columns: Sequence[Sequence[Image.Image]],
    *,
    row_labels: Sequence[str],
    captions: Sequence[str] = (),
    title: str | None = None,
    scale: ColourScale | None = None,
    bar_rows: Sequence[int] = (),
    bar_title: str = "anomaly score",
    tile: int = 192,
) -> Image.Image:
    """A figure grid like the paper's appendix figures: one column of `tile`-sized images per sample (rows named by
    `row_labels`, a caption above each column) and, beside the rows in `bar_rows`, a colour bar for `scale` (the
    range their heatmaps were drawn with), whose range and source are also written under the title."""
    gap, label_width, caption_height = 6, 120, 20 if captions else 0
    small = _font(12)
    lines = [line for line in (title, f"colour range {scale.low:.2f} .. {scale.high:.2f} ({scale.source})"
                                if scale is not None and bar_rows else None) if line]  # fmt: skip
    title_height = 6 + 22 * len(lines)
    bar = None
    if scale is not None and bar_rows:
        span = (max(bar_rows) - min(bar_rows) + 1) * (tile + gap) - gap
        bar = colour_bar(scale, span - 18, font=small)
    bar_width = max(bar.width, int(small.getlength(bar_title))) + 2 * gap if bar is not None else 0
    width = label_width + len(columns) * (tile + gap) + gap + bar_width
    height = title_height + caption_height + len(row_labels) * (tile + gap) + gap
    figure = Image.new("RGB", (width, height), PANEL_BACKGROUND)
    draw = ImageDraw.Draw(figure)
    for index, line in enumerate(lines):
        draw.text((gap, 6 + 22 * index), line, fill=TEXT_COLOUR, font=_font(18 if index == 0 and title else 12))
    top = title_height + caption_height
    for row, label in enumerate(row_labels):
        draw.text((gap, top + row * (tile + gap) + tile // 2 - 6), label, fill=TEXT_COLOUR, font=small)
    for column, tiles in enumerate(columns):
        left = label_width + column * (tile + gap)
        if column < len(captions):
            draw.text((left, title_height), captions[column][:30], fill=TEXT_COLOUR, font=small)
        for row, image in enumerate(tiles):
            figure.paste(_as_rgb(image).resize((tile, tile), Image.Resampling.BILINEAR), (left, top + row * (tile + gap)))
    if bar is not None:
        left, bar_top = label_width + len(columns) * (tile + gap) + gap, top + min(bar_rows) * (tile + gap)
        draw.text((left, bar_top), bar_title, fill=TEXT_COLOUR, font=small)
        figure.paste(bar, (left, bar_top + 18))
    return figure


__all__ = [
    "ColourScale",
    "colorize",
    "colour_bar",
    "describe_result",
    "heatmap_image",
    "normalize_map",
    "overlay_heatmap",
    "render_grid",
    "render_panel",
]
