"""A generated data set and a tiny CNN, to try ``train`` end to end in seconds on a CPU (README, tests).

``python -m lrp_cli.training.shapes DIR`` writes DIR/circle, DIR/square and DIR/triangle: 32x32 PNGs of
one shape each, of random bright colour, size and place on a dark noisy background.
``lrp_cli.training.shapes:tiny_cnn`` is a model factory for ``--model``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import nn

CLASSES = ("circle", "square", "triangle")


def shape_image(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One ``kind`` shape, filled with a random bright colour, on a dark noisy background."""
    background = rng.integers(0, 90, 3)
    colour = rng.integers(0, 256, 3)
    colour[rng.integers(3)] = rng.integers(180, 256)
    noise = rng.normal(0, 12, (size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8), "RGB")
    radius = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    draw = ImageDraw.Draw(image)
    fill = tuple(int(c) for c in colour)
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif kind == "square":
        half = radius * 0.85
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        angle = rng.uniform(0, 2 * np.pi / 3)
        corners = [
            (cx + radius * np.cos(angle + k * 2 * np.pi / 3), cy + radius * np.sin(angle + k * 2 * np.pi / 3))
            for k in range(3)
        ]
        draw.polygon(corners, fill=fill)
    return image


def write_shapes(folder: str | Path, per_class: int = 60, seed: int = 0, size: int = 32) -> Path:
    """``per_class`` images of each class in ``folder/CLASS/NNNN.png``; the same seed writes the same files."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            shape_image(kind, rng, size).save(folder / kind / f"{index:04d}.png")
    return folder


def tiny_cnn() -> nn.Module:
    """Three 3x3 convolutions with batch norms and a linear head (about 15k parameters); ``train``
    resizes the head to the classes."""
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(((3, 16), (16, 32), (32, 32))):
        layers += [nn.Conv2d(width_in, width_out, 3, padding=1), nn.BatchNorm2d(width_out), nn.ReLU()]
        if index < 2:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(CLASSES)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lrp_cli.training.shapes", description=__doc__.splitlines()[0]
    )
    parser.add_argument("folder", help="folder to write the class folders into")
    parser.add_argument("--per-class", type=int, default=60, help="images per class (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    options = parser.parse_args(argv)
    folder = write_shapes(options.folder, options.per_class, options.seed, options.size)
    print(f"wrote {options.per_class * len(CLASSES)} images in {folder}/{{{','.join(CLASSES)}}}")


if __name__ == "__main__":
    main()
