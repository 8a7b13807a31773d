"""Turning relevance into pictures and files: colormaps, overlays, atomic writers."""

from __future__ import annotations

import io
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageChops, ImageFilter

from .data import crop_box

UNSIGNED_COLORMAP = "afmhot"  # the seed's choice: black (none) to white (most relevant)
SIGNED_COLORMAP = "bwr"  # blue negative, white zero, red positive
SCALE_PERCENTILE = 99.5  # a few extreme pixels must not wash out the rest of the map
# Pillow save options per output format: PNG fast and still compact; JPEG for photo-like overlays (a
# tenth of a PNG's encoding time and a quarter of its size)
SAVE_OPTIONS: dict[str, dict] = {
    "png": {"format": "PNG", "compress_level": 1, "compress_type": zlib.Z_RLE},
    "jpg": {"format": "JPEG", "quality": 90},
}


TEMP_SUFFIX = ".lrp.tmp"  # hidden temporaries end in this: a run removes those a killed run left


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: a file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def image_bytes(image: Image.Image, image_format: str = "png") -> bytes:
    """The image encoded as ``png`` or ``jpg`` (see ``SAVE_OPTIONS``)."""
    buffer = io.BytesIO()
    image.save(buffer, **SAVE_OPTIONS[image_format])
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def relevance_map(relevance: np.ndarray) -> np.ndarray:
    """(C, H, W) input relevance to one (H, W) map: the sum over colour channels."""
    return relevance.sum(axis=0) if relevance.ndim == 3 else relevance


def scale_of(heat: np.ndarray, signed: bool) -> float:
    """The relevance that maps to the end of the colour scale: a high percentile of |R| (of R's positive
    part when unsigned); the largest value when that is 0, else 1."""
    magnitude = np.abs(heat) if signed else np.clip(heat, 0, None)
    return float(np.percentile(magnitude, SCALE_PERCENTILE)) or float(magnitude.max()) or 1.0


def normalise(heat: np.ndarray, signed: bool, scale: float | None = None) -> np.ndarray:
    """Scale to [0, 1] (unsigned) or [-1, 1] (signed, zero stays zero) by :func:`scale_of`."""
    scale = scale_of(heat, signed) if scale is None else scale
    return np.clip(heat / scale, -1.0 if signed else 0.0, 1.0)


GRID_TAPS = (0.25, 0.5, 0.25)
"""The display filter against the dot grid: a stride-2 first layer (3x3 kernels) covers every second
pixel by two windows per axis and the others by one, so rules that spread relevance over windows (flat,
z+ with ones) leave a period-2 grid. These taps have zero response at that period and pass smooth maps nearly
unchanged (see README, "The dot grid")."""
OVERLAY_SIGMA = 0.01
"""Gaussian blur of overlays, as a fraction of the map's side: sparse (top-k filtered) maps become
regions one can see at a glance."""


def _taps(heat: np.ndarray, taps: np.ndarray, axis: int, edge: bool) -> np.ndarray:
    """``heat`` convolved with symmetric ``taps`` along ``axis``: edge pixels repeated (``edge``) or the
    map cut at its borders with each pixel's weights renormalised to 1. Shifted slices, no BLAS threads
    to compete with the engine's."""
    radius = len(taps) // 2
    length = heat.shape[axis]
    pad = [(radius, radius) if a == axis else (0, 0) for a in range(heat.ndim)]
    padded = np.pad(heat, pad, mode="edge" if edge else "constant")
    out = np.zeros_like(heat)
    for offset, tap in enumerate(taps):
        window = [slice(offset, offset + length) if a == axis else slice(None) for a in range(heat.ndim)]
        out += tap * padded[tuple(window)]
    if not edge:
        ones = np.pad(np.ones(length, heat.dtype), radius)
        norm = np.convolve(ones, taps, mode="valid").astype(heat.dtype)
        out /= norm.reshape([-1 if a == axis else 1 for a in range(heat.ndim)])
    return out


def smooth(heat: np.ndarray, sigma: float = 0.0) -> np.ndarray:
    """The (H, W) map through the grid taps (edges repeated, so a constant map stays constant) and, when
    ``sigma`` > 0, a Gaussian of ``sigma`` pixels cut at 4 sigma and at the map's borders (weights
    renormalised): about a millisecond at 224 x 224."""
    heat = heat.astype(np.float32)
    grid = np.asarray(GRID_TAPS, np.float32)
    for axis in (0, 1):
        heat = _taps(heat, grid, axis, edge=True)
    if sigma > 0:
        offsets = np.arange(-int(np.ceil(4 * sigma)), int(np.ceil(4 * sigma)) + 1)
        gauss = np.exp(-0.5 * (offsets / sigma) ** 2).astype(np.float32)
        for axis in (0, 1):
            heat = _taps(heat, gauss / gauss.sum(), axis, edge=False)
    return heat


def aspect_size(map_shape: tuple[int, int], photo_size: tuple[int, int], policy: str) -> tuple[int, int]:
    """(width, height) at which a model-sized map shows the photo's proportions: with ``squash`` the
    shorter side keeps the map's size and the longer one is stretched back (no sample is lost); with
    ``crop`` the map covers the centred square and stays square."""
    height, width = map_shape
    photo_width, photo_height = photo_size
    if policy != "squash" or photo_width == photo_height:
        return width, height
    if photo_width > photo_height:
        return max(width, round(height * photo_width / photo_height)), height
    return width, max(height, round(width * photo_height / photo_width))


def resize_map(normalised: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map resampled (bilinear) to ``size`` = (width, height)."""
    if normalised.shape[::-1] == tuple(size):
        return normalised
    image = Image.fromarray(normalised.astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64)


def _lookup_table(name: str) -> np.ndarray:
    """The colormap sampled at 256 levels as uint8 RGB: indexing it is far cheaper than calling it."""
    return (matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


_TABLES: dict[str, np.ndarray] = {}


def colorize(normalised: np.ndarray, signed: bool, colormap: str = "auto") -> np.ndarray:
    """RGB uint8 image of a normalised map."""
    name = colormap if colormap != "auto" else SIGNED_COLORMAP if signed else UNSIGNED_COLORMAP
    if name not in _TABLES:
        _TABLES[name] = _lookup_table(name)
    values = (normalised + 1.0) * 127.5 if signed else normalised * 255.0
    return _TABLES[name][np.clip(values + 0.5, 0, 255).astype(np.uint8)]


def heatmap_image(normalised: np.ndarray, signed: bool, colormap: str = "auto") -> Image.Image:
    """The colour-mapped heatmap of a map already scaled by :func:`normalise`."""
    return Image.fromarray(colorize(normalised, signed, colormap), "RGB")


@dataclass
class Pictures:
    """What one explanation looks like: the heatmap at the photo's proportions, the overlay at the
    photo's size, and the relevance that maps to the end of the heatmap's colour scale."""

    heatmap: Image.Image
    overlay: Image.Image
    scale: float
    signed: bool
    colormap: str
    shown: np.ndarray  # the overlay's map, normalised: to draw it again at another size (panels)
    policy: str
    alpha: float
    mode: str

    def overlay_at(self, photo: np.ndarray) -> Image.Image:
        """The overlay drawn again onto a resized copy of the photo (cheaper than resizing it)."""
        return overlay_image(
            photo, self.shown, self.signed, self.policy, self.alpha, self.colormap, self.mode
        )


def pictures(
    relevance: np.ndarray,
    photo: np.ndarray,
    signed: bool,
    policy: str,
    alpha: float,
    colormap: str = "auto",
    mode: str = "blend",
) -> Pictures:
    """Heatmap and overlay of one (C, H, W) relevance map: summed over colour channels, through the grid
    taps (both) and a Gaussian of ``OVERLAY_SIGMA`` of the side (the overlay only), each scaled by its
    own 99.5th percentile of |R|; the heatmap stretched to the photo's proportions (``aspect_size``)."""
    heat = relevance_map(relevance)
    shown = smooth(heat)
    scale = scale_of(shown, signed)
    size = aspect_size(shown.shape, (photo.shape[1], photo.shape[0]), policy)
    heatmap = heatmap_image(resize_map(normalise(shown, signed, scale), size), signed, colormap)
    blurred = normalise(smooth(heat, OVERLAY_SIGMA * max(heat.shape)), signed)
    overlay = overlay_image(photo, blurred, signed, policy, alpha, colormap, mode)
    return Pictures(heatmap, overlay, scale, signed, colormap, blurred, policy, alpha, mode)


OVERLAY_MODES = ("blend", "mask", "contour")
VISIBILITY = 0.5
"""Blend weight = alpha * |R|^VISIBILITY: the square root lifts the many moderate values of a sparse map
(a tenth of the scale gets a third of the weight) while zero stays the photo unchanged."""
MASK_FLOOR = 0.2  # brightness of the photo where a mask overlay finds no relevance
CONTOUR_LEVELS = (0.25, 0.5, 0.75)  # fractions of the scale outlined by contour overlays


def overlay_image(
    photo: np.ndarray,
    normalised: np.ndarray,
    signed: bool,
    policy: str,
    alpha: float,
    colormap: str = "auto",
    mode: str = "blend",
) -> Image.Image:
    """A map scaled by :func:`normalise`, drawn onto the photo (uint8 H x W x 3) at the photo's own size
    and orientation, by ``mode``:

    - ``blend``: the heatmap colours blended in with weight alpha * |R|^0.5, so irrelevant regions show
      the photo unchanged and a sparse map still reads;
    - ``mask``: the photo at full brightness where relevance is high, dimmed towards MASK_FLOOR where it
      is absent (|R| for unsigned rules, the positive evidence for signed ones), alpha the depth;
    - ``contour``: the photo with the outlines of 25%, 50% and 75% of the scale in the heatmap's colours
      (for signed rules also the negative levels).

    With the ``crop`` policy only the explained centre square is drawn on. Colours and weights are
    scaled up and blended by Pillow in uint8, a few milliseconds per photo.
    """
    height, width = photo.shape[:2]
    box = (0, 0, width, height) if policy == "squash" else crop_box(width, height)
    size = (box[2] - box[0], box[3] - box[1])
    blended = Image.fromarray(photo, "RGB").copy()
    if mode == "contour":
        _draw_contours(blended, normalised, signed, colormap, box)
        return blended
    if mode == "mask":
        evidence = np.clip(normalised, 0.0, 1.0) ** VISIBILITY
        weight = ((1.0 - alpha * (1.0 - MASK_FLOOR) * (1.0 - evidence)) * 255.0 + 0.5).astype(np.uint8)
        mask = Image.fromarray(weight, "L").resize(size, Image.Resampling.BILINEAR)
        region = blended.crop(box)
        dark = Image.new("RGB", size)
        blended.paste(Image.composite(region, dark, mask), box[:2])
        return blended
    colours = Image.fromarray(colorize(normalised, signed, colormap), "RGB").resize(
        size, Image.Resampling.BILINEAR
    )
    weight = (np.abs(normalised) ** VISIBILITY * (alpha * 255.0) + 0.5).astype(np.uint8)
    mask = Image.fromarray(weight, "L").resize(size, Image.Resampling.BILINEAR)
    blended.paste(colours, box[:2], mask)
    return blended


def _draw_contours(
    photo: Image.Image, normalised: np.ndarray, signed: bool, colormap: str, box: tuple[int, int, int, int]
) -> None:
    """Outline each level of the map on ``photo`` (in place) inside ``box``, lines about 1/160 of the
    photo's side wide: a level's region minus its erosion."""
    size = (box[2] - box[0], box[3] - box[1])
    values = resize_map(normalised, size)
    width = max(3, (max(size) // 160) | 1)  # odd, for the min filter
    levels = [*CONTOUR_LEVELS, *(-level for level in CONTOUR_LEVELS)] if signed else list(CONTOUR_LEVELS)
    region = photo.crop(box)
    for level in levels:
        selected = values >= level if level > 0 else values <= level
        inside = Image.fromarray(selected.astype(np.uint8) * 255)
        edge = ImageChops.subtract(inside, inside.filter(ImageFilter.MinFilter(width)))
        shade = np.sign(level) * (0.5 + 0.5 * abs(level))  # the upper half of the colours: they stand out
        colour = tuple(int(c) for c in colorize(np.array([shade]), signed, colormap)[0])
        region.paste(Image.new("RGB", size, colour), (0, 0), edge)
    photo.paste(region, box[:2])
