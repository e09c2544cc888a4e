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
COLUMN_LABELS = ("image", "heatmap", "overlay")


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


@dataclass(frozen=True)
class ColourScale:
    """A fixed heatmap colour range and where it comes from (shown in the panel, so a reader knows what red means)."""

    low: float
    high: float
    source: str

    def as_range(self) -> tuple[float, float]:
        return (self.low, self.high)


def map_value_bounds(num_feature_layers: int) -> ColourScale:
    """The range every VisualAD map lies in: each of the L layer maps is cos(patch, anomaly) - cos(patch, normal) in
    [-2, 2] and the map is their sum, so [-2L, 2L]; smoothing and resizing keep it. Trained maps use most of it (the
    per-layer maps are the logits of the segmentation loss), and 0 is where both tokens are equally close. One range
    for every image of a model: normal images stay blue instead of being stretched to red by their own maximum."""
    bound = 2.0 * int(num_feature_layers)
    return ColourScale(-bound, bound, f"full map range: {num_feature_layers} layer maps x [-2, 2]")


def _scale_of(anomaly_map: np.ndarray, value_range) -> ColourScale:
    if isinstance(value_range, ColourScale):
        return value_range
    if value_range is not None:
        return ColourScale(float(value_range[0]), float(value_range[1]), "fixed range")
    return ColourScale(float(anomaly_map.min()), float(anomaly_map.max()), "this map's own min..max")


def colour_bar(
    scale: ColourScale, height: int, threshold: float | None = None, font=None, width: int = 14
) -> Image.Image:
    """A vertical colour bar (high at the top) with its end values and, when known, the threshold marked."""
    font = font or _font(12)
    ramp = np.linspace(scale.high, scale.low, max(height, 2), dtype=np.float32)[:, None].repeat(width, axis=1)
    bar = heatmap_image(ramp, (scale.low, scale.high)) if scale.high > scale.low else heatmap_image(ramp * 0)
    label_width = max(_text_width(font, f"{value:.2f}") for value in (scale.low, scale.high, threshold or 0.0)) + 8
    image = Image.new("RGB", (width + 4 + label_width, height), PANEL_BACKGROUND)
    image.paste(bar, (0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width - 1, height - 1), outline=TEXT_COLOUR)
    text_height = _text_height(font)
    draw.text((width + 4, 0), f"{scale.high:.2f}", fill=TEXT_COLOUR, font=font)
    draw.text((width + 4, height - text_height - 2), f"{scale.low:.2f}", fill=TEXT_COLOUR, font=font)
    if threshold is not None and scale.high > scale.low:
        fraction = min(max((scale.high - threshold) / (scale.high - scale.low), 0.0), 1.0)
        y = round(fraction * (height - 1))
        draw.line((0, y, width + 2, y), fill=(0, 0, 0), width=2)
        label_y = min(max(y - text_height // 2, text_height + 2), height - 2 * text_height - 4)
        draw.text((width + 4, label_y), f"{threshold:.2f}", fill=(0, 0, 0), font=font)
    return image


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _text_height(font) -> int:
    _, top, _, bottom = font.getbbox("0.123456789-")
    return int(bottom - top) + 2


def render_panel(
    image: Image.Image | np.ndarray,
    anomaly_map: np.ndarray,
    score: float,
    threshold: float | None = None,
    *,
    title: str | None = None,
    alpha: float = 0.5,
    value_range: ColourScale | tuple[float, float] | None = None,
    min_side: int = 256,
    max_side: int = 512,
) -> Image.Image:
    """A result panel: labelled columns image | heatmap | overlay and a colour bar, under a caption with the score
    (and decision) and the colour range with its source.

    `value_range`: a `ColourScale` (e.g. `map_value_bounds(config.num_feature_layers)`), a `(low, high)` pair, or
    None for the map's own min..max (which makes every map look hot somewhere: use a fixed range to compare images).
    The threshold, when given, is marked on the colour bar. Each tile is scaled so that its longer side lies within
    `min_side..max_side` pixels: panels of large images stay small and those of small images stay readable.
    """
    image = _as_rgb(image)
    anomaly_map = np.asarray(anomaly_map)
    _check_size(image, anomaly_map)
    scale = _scale_of(anomaly_map, value_range)
    bounds = scale.as_range()
    tiles = [image, heatmap_image(anomaly_map, bounds), overlay_heatmap(image, anomaly_map, alpha, bounds)]
    longer = max(image.size)
    factor = min(max(longer, min_side), max_side) / longer
    if factor != 1.0:
        tile_size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        tiles = [tile.resize(tile_size, Image.Resampling.BILINEAR) for tile in tiles]
    tile_width, tile_height = tiles[0].size
    gap = 8
    font_size = max(12, min(20, tile_width // 18))
    font = _font(font_size)
    line_height = _text_height(font) + 6
    caption = [
        (line, colour)
        for line, colour in (
            (title, TEXT_COLOUR),
            (describe_result(score, threshold), _verdict_colour(score, threshold)),
            (f"colour range {scale.low:.2f} .. {scale.high:.2f} ({scale.source})", TEXT_COLOUR),
        )
        if line
    ]
    header = gap + line_height * len(caption)
    labels_top = header
    tiles_top = labels_top + line_height
    bar = colour_bar(scale, tile_height, threshold, font=_font(max(11, font_size - 2)))
    width = 3 * tile_width + 4 * gap + bar.width + gap
    panel = Image.new("RGB", (width, tiles_top + tile_height + gap), PANEL_BACKGROUND)
    draw = ImageDraw.Draw(panel)
    for row, (line, colour) in enumerate(caption):
        draw.text((gap, gap + row * line_height), line, fill=colour, font=font)
    for column, (tile, label) in enumerate(zip(tiles, COLUMN_LABELS)):
        left = gap + column * (tile_width + gap)
        draw.text((left + (tile_width - _text_width(font, label)) // 2, labels_top), label, fill=TEXT_COLOUR, font=font)
        panel.paste(tile, (left, tiles_top))
    panel.paste(bar, (gap + 3 * (tile_width + gap), tiles_top))
    return panel


def _verdict_colour(score: float, threshold: float | None) -> tuple[int, int, int]:
    if threshold is None:
        return TEXT_COLOUR
    return ANOMALOUS_COLOUR if score >= threshold else NORMAL_COLOUR


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
    "COLUMN_LABELS",
    "ColourScale",
    "colorize",
    "colour_bar",
    "describe_result",
    "heatmap_image",
    "map_value_bounds",
    "normalize_map",
    "overlay_heatmap",
    "render_grid",
    "render_panel",
]
