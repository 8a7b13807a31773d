"""``NAME.panel.jpg``: photo | heatmap | overlay side by side at the photo's proportions, with what was
explained (class, probability, target, rules) above and the heatmap's colour bar with its scale below.

Drawn with Pillow in the writer threads (a few milliseconds per image); text in DejaVu Sans as matplotlib
ships it, so the panel looks the same on every machine.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .render import Pictures, colorize

TILE_HEIGHT = 256  # pixels of each picture's height in the panel
MAX_ASPECT = 3.0  # a tile is at most this many times as wide as high (or high as wide); longer is cut
GAP = 8
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)


@dataclass
class Caption:
    """What the panel says about the explanation."""

    label: str | None  # class name of the explained (shown) class; None for models without names
    class_index: int
    probability: float
    target: int | str  # the explained class index, or "softmax"
    predicted_index: int
    predicted_label: str | None
    composite: str
    topk: float
    renormalize: bool
    overlay_mode: str = "blend"


@functools.lru_cache(maxsize=8)
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's data folder (present wherever matplotlib is); Pillow's own font
    otherwise."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default(size)


def _class_name(label: str | None, index: int) -> str:
    return f"{label} (class {index})" if label else f"class {index}"


def caption_lines(caption: Caption) -> tuple[str, str]:
    """The headline (class and probability) and the settings line."""
    headline = f"{_class_name(caption.label, caption.class_index)}: p = {caption.probability:.3f}"
    if caption.target == "softmax":
        explained = "explained: softmax over all classes (shown: the top class)"
    else:
        explained = f"explained: class {caption.target}"
        if caption.predicted_index != caption.class_index:
            explained += (
                f"; model's top class: {_class_name(caption.predicted_label, caption.predicted_index)}"
            )
    rules = f"composite {caption.composite}, top-k {caption.topk:g}"
    if caption.topk < 1.0 and caption.renormalize:
        rules += " (renormalised)"
    return headline, f"{explained}  |  {rules}"


def _scaled(image: Image.Image, height: int) -> Image.Image:
    """``image`` at ``height`` pixels high, its proportions kept (box filter: fast and clean downwards)."""
    width = max(1, round(image.width * height / image.height))
    return image.resize(
        (width, height), Image.Resampling.BOX if height < image.height else Image.Resampling.BILINEAR
    )


def _cut(tile: Image.Image) -> Image.Image:
    """At most MAX_ASPECT times as wide as high: the centre of a longer tile."""
    limit = round(tile.height * MAX_ASPECT)
    if tile.width <= limit:
        return tile
    left = (tile.width - limit) // 2
    return tile.crop((left, 0, left + limit, tile.height))


def _colour_bar(pictures: Pictures, width: int) -> Image.Image:
    """The heatmap's colours from one end of its scale to the other, with the values at the ends (and at
    zero for signed maps) in relevance units."""
    bar_height, text = 14, font(13)
    levels = np.linspace(-1.0 if pictures.signed else 0.0, 1.0, max(width, 2))
    strip = colorize(np.broadcast_to(levels, (bar_height, levels.size)), pictures.signed, pictures.colormap)
    image = Image.new("RGB", (width, bar_height + 36), BACKGROUND)
    image.paste(Image.fromarray(np.ascontiguousarray(strip), "RGB"), (0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width - 1, bar_height - 1), outline=MUTED)
    scale = pictures.scale
    ticks = [(0.0, f"{-scale:.3g}"), (0.5, "0"), (1.0, f"{scale:.3g}")] if pictures.signed else []
    ticks = ticks or [(0.0, "0"), (1.0, f"{scale:.3g}")]
    for position, label in ticks:
        x = round(position * (width - 1))
        draw.line((x, bar_height, x, bar_height + 4), fill=INK)
        anchor = "la" if position == 0.0 else "ra" if position == 1.0 else "ma"
        draw.text((x, bar_height + 5), label, fill=INK, font=text, anchor=anchor)
    draw.text(
        (width // 2, bar_height + 21), "relevance (sum over RGB)", fill=MUTED, font=font(11), anchor="ma"
    )
    return image


def panel_image(photo: np.ndarray, pictures: Pictures, caption: Caption) -> Image.Image:
    """The panel of one image (RGB): three tiles of TILE_HEIGHT, a caption of two lines above, the
    column titles and the colour bar (under the heatmap) below."""
    small = _scaled(Image.fromarray(photo, "RGB"), TILE_HEIGHT)
    overlay = pictures.overlay_at(np.asarray(small))  # drawn at the tile's size, not resized down
    tiles = [_cut(small), _cut(_scaled(pictures.heatmap, TILE_HEIGHT)), _cut(overlay)]
    headline, settings = caption_lines(caption)
    head = 50
    width = sum(t.width for t in tiles) + GAP * (len(tiles) + 1)
    width = max(width, round(font(13).getlength(settings)) + 2 * GAP)
    bar = _colour_bar(pictures, max(tiles[1].width, 80))
    height = head + TILE_HEIGHT + 22 + bar.height + GAP
    panel = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    draw.text((GAP, 6), headline, fill=INK, font=font(17, bold=True))
    draw.text((GAP, 29), settings, fill=MUTED, font=font(13))
    titles = ("photo", "heatmap", f"overlay ({caption.overlay_mode})")
    x = GAP
    for index, (tile, title) in enumerate(zip(tiles, titles, strict=True)):
        panel.paste(tile, (x, head))
        draw.text((x + tile.width // 2, head + TILE_HEIGHT + 4), title, fill=INK, font=font(13), anchor="ma")
        if index == 1:
            panel.paste(bar, (x + (tile.width - bar.width) // 2, head + TILE_HEIGHT + 22))
        x += tile.width + GAP
    return panel
