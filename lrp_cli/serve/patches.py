"""Patches laid over a photo before it is explained: the page's way of asking "what if this region
were gone?". Positions and sizes are fractions of the photo, so they mean the same at any resolution."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from .engine import RequestError

KINDS = ("solid", "blur", "noise", "image")
MAX_PATCHES = 256
_FIELDS = {
    "solid": {"color"},
    "blur": {"radius"},
    "noise": {"seed"},
    "image": set(),
}
_HEX = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass(frozen=True)
class Patch:
    """A rectangle (x, y: top-left corner; w, h: size; all fractions of the photo) and what fills it:
    a solid ``color``, the photo blurred (``radius``: Gaussian radius as a fraction of the rectangle's
    shorter side), uniform noise (``seed``: the same seed gives the same noise), or the patch image."""

    kind: str
    x: float
    y: float
    w: float
    h: float
    color: tuple[int, int, int] = (128, 128, 128)
    radius: float = 0.25
    seed: int = 0


def _fraction(where: str, key: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{where}.{key}: expected a number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bound = "(" if low_open else "["
        raise RequestError(f"{where}.{key}: {value} is outside {bound}{low:g}, {high:g}]")
    return float(value)


def parse_patches(value: Any) -> list[Patch]:
    """Patches from a request's JSON; RequestError names the patch and key that is wrong."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"patches: expected a list, got {type(value).__name__}")
    if len(value) > MAX_PATCHES:
        raise RequestError(f"patches: {len(value)} patches, at most {MAX_PATCHES}")
    patches = []
    for number, spec in enumerate(value):
        where = f"patches[{number}]"
        if not isinstance(spec, dict):
            raise RequestError(f"{where}: expected an object, got {type(spec).__name__}")
        kind = spec.get("kind")
        if kind not in KINDS:
            raise RequestError(f"{where}.kind: {kind!r} is not one of {', '.join(KINDS)}")
        unknown = set(spec) - {"kind", "x", "y", "w", "h"} - _FIELDS[kind]
        if unknown:
            raise RequestError(f"{where}: unknown key {sorted(unknown)[0]!r} for a {kind} patch")
        missing = [key for key in ("x", "y", "w", "h") if key not in spec]
        if missing:
            raise RequestError(f"{where}.{missing[0]}: missing")
        extra: dict[str, Any] = {}
        if "color" in spec:
            color = spec["color"]
            if not isinstance(color, str) or not _HEX.fullmatch(color):
                raise RequestError(f"{where}.color: expected '#rrggbb', got {color!r}")
            extra["color"] = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
        if "radius" in spec:
            extra["radius"] = _fraction(where, "radius", spec["radius"], 0.0, 1.0, low_open=True)
        if "seed" in spec:
            seed = spec["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
                raise RequestError(f"{where}.seed: expected an integer in [0, 2^32), got {seed!r}")
            extra["seed"] = seed
        patches.append(
            Patch(
                kind,
                _fraction(where, "x", spec["x"], 0.0, 1.0),
                _fraction(where, "y", spec["y"], 0.0, 1.0),
                _fraction(where, "w", spec["w"], 0.0, 1.0, low_open=True),
                _fraction(where, "h", spec["h"], 0.0, 1.0, low_open=True),
                **extra,
            )
        )
    return patches


def box(patch: Patch, width: int, height: int) -> tuple[int, int, int, int]:
    """The patch's pixel box in a width x height photo, clipped to it and at least one pixel."""
    left = min(round(patch.x * width), width - 1)
    top = min(round(patch.y * height), height - 1)
    right = max(left + 1, min(width, round((patch.x + patch.w) * width)))
    bottom = max(top + 1, min(height, round((patch.y + patch.h) * height)))
    return left, top, right, bottom


def apply_patches(
    photo: Image.Image, patches: list[Patch], patch_image: Image.Image | None = None
) -> Image.Image:
    """The photo with every patch laid over it in order (a later patch covers an earlier one)."""
    if not patches:
        return photo
    if patch_image is None and any(p.kind == "image" for p in patches):
        raise RequestError("patch_image: an image patch needs a patch image; upload one as 'patch_image'")
    result = photo.copy()
    for patch in patches:
        left, top, right, bottom = box(patch, *photo.size)
        size = (right - left, bottom - top)
        if patch.kind == "solid":
            fill = Image.new("RGB", size, patch.color)
        elif patch.kind == "blur":
            radius = max(1.0, patch.radius * min(size))
            margin = int(3 * radius) + 1  # blur only the region and what its kernel reaches
            outer = (max(0, left - margin), max(0, top - margin))
            region = result.crop(
                (*outer, min(photo.width, right + margin), min(photo.height, bottom + margin))
            )
            blurred = region.filter(ImageFilter.GaussianBlur(radius))
            fill = blurred.crop((left - outer[0], top - outer[1], right - outer[0], bottom - outer[1]))
        elif patch.kind == "noise":
            noise = np.random.default_rng(patch.seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            fill = Image.fromarray(noise, "RGB")
        else:
            fill = patch_image.resize(size, Image.Resampling.BILINEAR)  # type: ignore[union-attr]
        result.paste(fill, (left, top))
    return result
