"""Heatmaps, overlays and result panels for anomaly maps, drawn with PIL and numpy only (no matplotlib, no OpenCV)."""

from __future__ import annotations

from collections.abc import Sequence

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


def format_value(value: float) -> str:
    """A colour-bar label: 3 significant digits, no "-0"."""
    text = f"{value:.3g}"
    return "0" if text == "-0" else text


def colour_bar(
    height: int, value_range: tuple[float, float], *, width: int = 14, font_size: int = 12, title: str | None = None
) -> Image.Image:
    """A vertical "jet" bar for `value_range` (high at the top), its ends and middle written beside it, so a reader
    can tell what a colour means. `title` goes above the bar (e.g. "anomaly score")."""
    low, high = value_range
    text_font = _font(font_size)
    labels = [format_value(v) for v in (high, (low + high) / 2, low)]
    label_width = max(int(text_font.getlength(t)) for t in labels)
    title_height = font_size + 6 if title else 0
    margin = font_size // 2 + 1  # room for the end labels, which are centred on the bar's ends
    bar_height = max(2, height - title_height - 2 * margin)
    ramp = np.linspace(1.0, 0.0, bar_height, dtype=np.float32)[:, None].repeat(width, axis=1)
    bar = Image.fromarray(colorize(ramp, (0.0, 1.0)), mode="RGB")
    total_width = max(width + 6 + label_width, int(text_font.getlength(title)) if title else 0) + 2
    image = Image.new("RGB", (total_width, height), PANEL_BACKGROUND)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((0, 0), title, fill=TEXT_COLOUR, font=text_font)
    top = title_height + margin
    image.paste(bar, (0, top))
    draw.rectangle((0, top, width - 1, top + bar_height - 1), outline=TEXT_COLOUR)
    for label, fraction in zip(labels, (0.0, 0.5, 1.0)):
        y = top + round(fraction * (bar_height - 1))
        draw.line((width, y, width + 3, y), fill=TEXT_COLOUR)
        draw.text((width + 6, y - font_size // 2 - 1), label, fill=TEXT_COLOUR, font=text_font)
    return image


def render_grid(
    columns: Sequence[Sequence[Image.Image]],
    *,
    row_labels: Sequence[str],
    captions: Sequence[str] = (),
    title: str | None = None,
    value_range: tuple[float, float] | None = None,
    bar_rows: Sequence[int] = (),
    bar_title: str = "anomaly score",
    tile: int = 192,
) -> Image.Image:
    """A figure grid like the paper's appendix figures: one column of `tile`-sized images per sample (rows named by
    `row_labels`, a caption above each column), and, beside the rows in `bar_rows`, a colour bar for `value_range`
    (the range their heatmaps were drawn with)."""
    gap, label_width, title_height, caption_height = 6, 120, 30 if title else 6, 20 if captions else 0
    bar = None
    if value_range is not None and bar_rows:
        span = (max(bar_rows) - min(bar_rows) + 1) * (tile + gap) - gap
        bar = colour_bar(span, value_range, title=bar_title)
    width = label_width + len(columns) * (tile + gap) + gap + (bar.width + 2 * gap if bar is not None else 0)
    height = title_height + caption_height + len(row_labels) * (tile + gap) + gap
    figure = Image.new("RGB", (width, height), PANEL_BACKGROUND)
    draw = ImageDraw.Draw(figure)
    if title:
        draw.text((gap, 6), title, fill=TEXT_COLOUR, font=_font(18))
    small = _font(12)
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
        figure.paste(bar, (label_width + len(columns) * (tile + gap) + gap, top + min(bar_rows) * (tile + gap)))
    return figure


__all__ = [
    "colorize",
    "colour_bar",
    "describe_result",
    "heatmap_image",
    "normalize_map",
    "overlay_heatmap",
    "render_grid",
    "render_panel",
]
