"""Finding images, decoding them to correct RGB, and batching them through a torch DataLoader."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class InputError(ValueError):
    """An input argument that names nothing usable (missing path, empty folder)."""


@dataclass(frozen=True)
class ImageItem:
    """One input image: where it is and the relative name its outputs mirror."""

    path: Path
    relative: Path  # output name stem, relative to the output folder


def _walk(folder: Path) -> Iterable[Path]:
    """Image files below ``folder``, recursively, skipping hidden files and folders, in sorted order."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(root) / name


def discover(arguments: Sequence[str], stdin: Iterable[str] | None = None) -> list[ImageItem]:
    """Expand folders, files and ``-`` (paths on stdin) into image items with collision-free names.

    Output names are paths relative to the inputs' common folder, so ``a/cat.png`` and ``b/cat.png``
    stay apart; two files differing only by extension keep their extension in the name.
    """
    files: list[Path] = []
    for argument in arguments:
        if argument == "-":
            lines = stdin if stdin is not None else sys.stdin
            files.extend(Path(line.strip()) for line in lines if line.strip())
            continue
        path = Path(argument)
        if path.is_dir():
            found = list(_walk(path))
            if not found:
                raise InputError(
                    f"{argument}: folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise InputError(f"{argument}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        raise InputError("no input images given")
    parents = [p.parent for p in unique]
    base = Path(os.path.commonpath([str(p) for p in parents]))
    stems = [p.relative_to(base).with_suffix("") for p in unique]
    clashes = {s for s in stems if stems.count(s) > 1}
    return [
        ImageItem(path, path.relative_to(base) if stem in clashes else stem)
        for path, stem in zip(unique, stems)
    ]


def decode(path: Path, max_pixels: int) -> Image.Image:
    """Open any supported image as 8-bit RGB in its upright orientation.

    Handles EXIF rotation, palette and transparency (composited on white), grayscale, 16-bit, CMYK
    and animated images (first frame). Raises ``ValueError`` with a reason for unusable files.
    """
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise Image.DecompressionBombError(
                        f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
                        "(raise max_pixels if the file is trusted)"
                    )
                image.seek(0)
                image.load()
                return _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise ValueError(f"decompression bomb refused: {error}") from None
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file PIL can read") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"corrupt or truncated image: {error}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low or 1.0) * 255.0
        image = Image.fromarray(scaled.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGB" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square the ``crop`` policy explains, in photo coordinates."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def prepare(image: Image.Image, resolution: int, policy: str) -> Image.Image:
    """Resize for the model: ``squash`` scales the whole photo to a square (every pixel explained),
    ``crop`` takes the centred square first (no distortion, borders not explained)."""
    if policy == "crop":
        image = image.crop(crop_box(*image.size))
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)


class ImageDataset(Dataset):
    """Items to normalised tensors; a file that fails to decode yields its error instead of raising."""

    def __init__(
        self,
        items: Sequence[ImageItem],
        resolution: int,
        policy: str,
        mean: Sequence[float],
        std: Sequence[float],
        max_pixels: int,
    ) -> None:
        self.items = list(items)
        self.resolution, self.policy, self.max_pixels = resolution, policy, max_pixels
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]:
        """(index, normalised model input, the decoded photo as uint8 HxWx3 for the overlay, error)."""
        try:
            photo = decode(self.items[index].path, self.max_pixels)
        except (ValueError, OSError) as error:
            return index, None, None, str(error)
        image = prepare(photo, self.resolution, self.policy)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return index, (pixels - self.mean) / self.std, torch.from_numpy(np.asarray(photo).copy()), None


def collate(batch: list[tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    """Stack the decodable images; keep photos (of any size) as a list and failures aside."""
    good = [(i, t, photo) for i, t, photo, _ in batch if t is not None]
    return {
        "indices": [i for i, _, _ in good],
        "pixels": torch.stack([t for _, t, _ in good]) if good else None,
        "photos": [photo for _, _, photo in good],
        "failures": [(i, e) for i, _, _, e in batch if e is not None],
    }


def make_loader(dataset: ImageDataset, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """Batches in order, decoded by ``workers`` processes ahead of the engine."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
