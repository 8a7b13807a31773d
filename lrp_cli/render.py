"""Turning relevance into pictures and files: colormaps, overlays, atomic writers."""

from __future__ import annotations

import io
import os
import tempfile
import zlib
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

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


def normalise(heat: np.ndarray, signed: bool) -> np.ndarray:
    """Scale to [0, 1] (unsigned) or [-1, 1] (signed, zero stays zero) by a high percentile of |R|."""
    magnitude = np.abs(heat) if signed else np.clip(heat, 0, None)
    scale = float(np.percentile(magnitude, SCALE_PERCENTILE)) or float(magnitude.max()) or 1.0
    return np.clip(heat / scale, -1.0 if signed else 0.0, 1.0)


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


def overlay_image(
    photo: np.ndarray, normalised: np.ndarray, signed: bool, policy: str, alpha: float, colormap: str = "auto"
) -> Image.Image:
    """A map scaled by :func:`normalise`, blended onto the photo (uint8 H x W x 3) at the photo's own size
    and orientation.

    Each pixel's blend weight grows with |relevance|, so irrelevant regions show the photo unchanged.
    With the ``crop`` policy only the explained centre square carries a heatmap. The colours and the
    weights are scaled up and blended by Pillow in uint8, which costs a few milliseconds per photo.
    """
    height, width = photo.shape[:2]
    box = (0, 0, width, height) if policy == "squash" else crop_box(width, height)
    size = (box[2] - box[0], box[3] - box[1])
    colours = Image.fromarray(colorize(normalised, signed, colormap), "RGB").resize(
        size, Image.Resampling.BILINEAR
    )
    weight = (np.abs(normalised) * (alpha * 255.0) + 0.5).astype(np.uint8)
    mask = Image.fromarray(weight, "L").resize(size, Image.Resampling.BILINEAR)
    blended = Image.fromarray(photo, "RGB").copy()
    blended.paste(colours, box[:2], mask)
    return blended
