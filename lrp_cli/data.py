"""Finding images, decoding them to correct RGB, and batching them through a torch DataLoader."""

from __future__ import annotations

import errno
import os
import sys
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"}
"""Found in folders by ``run`` and ``video`` and handed to :mod:`lrp_cli.video`."""


class InputError(ValueError):
    """An input argument that names nothing usable (missing path, empty folder)."""


@dataclass(frozen=True)
class ImageItem:
    """One input image: where it is and the relative name its outputs mirror.

    ``error`` is set for an entry found but unusable before decoding (a broken or looping symbolic link,
    an unreadable folder, a folder named on stdin): it is reported and recorded, never decoded.
    """

    path: Path
    relative: Path  # output name stem, relative to the output folder
    error: str | None = None


# every file name a stem can get in the output folder (see lrp_cli.outputs): names must stay apart
OUTPUT_SUFFIXES = (
    ".heatmap.png", ".overlay.jpg", ".overlay.png", ".relevance.npy", ".overlay.mp4", ".heatmap.mp4",
    ".frames.jsonl",
)  # fmt: skip


def _absolute(path: str | Path) -> Path:
    """The absolute path without resolving symbolic links: a link keeps its own name and folder."""
    return Path(os.path.abspath(path))


def _link_problem(path: Path) -> str | None:
    """Why a path that is a symbolic link cannot be read (None for a working link or a plain file)."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"broken symbolic link to {os.readlink(path)}"
    return None


def _walk(
    folder: Path, exclude: Path | None, found: list[tuple[Path, str | None]], extensions: set[str]
) -> None:
    """Image files below ``folder``, recursively, in sorted order, skipping hidden files and folders
    and the output folder ``exclude``; unreadable sub-folders and broken links are kept as errors.
    Symbolic links to folders are not followed (no loops, no duplicates)."""

    def unreadable(error: OSError) -> None:
        if Path(error.filename) == folder:
            raise InputError(f"{folder}: cannot read folder: {error.strerror}")
        found.append((Path(error.filename), f"cannot read folder: {error.strerror}"))

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(root, d) != exclude)
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                path = Path(root) / name
                found.append((path, _link_problem(path)))


def _stdin_paths(lines: Iterable[str] | None) -> Iterable[str]:
    """Paths on stdin, one a line, kept exactly (leading and trailing spaces are part of a name); read
    as bytes from the real stdin so that names that are not valid UTF-8 survive."""
    source = lines if lines is not None else (os.fsdecode(raw) for raw in sys.stdin.buffer)
    for line in source:
        line = line.removesuffix("\n").removesuffix("\r")
        if line:
            yield line


def _stdin_entry(text: str) -> tuple[Path, str | None]:
    path = _absolute(text)
    if path.is_dir():
        return path, "is a folder, not an image file (give folders as arguments, not on stdin)"
    if not path.exists():
        return path, _link_problem(path) or "no such file"
    return path, None


def name_key(name: str) -> str:
    """Names that one file system may treat as equal (case-insensitive, Unicode-normalising ones) share a key."""
    return unicodedata.normalize("NFC", name).casefold()


def unique_stems(relatives: Sequence[PurePath]) -> list[PurePath]:
    """Output stems for input paths relative to their common folder, distinct on every file system.

    A stem drops the extension (``cat.png`` -> ``cat``); inputs whose stems clash keep their extension
    (``cat.png``, ``cat.jpg``); a name still taken (``cat.png.png`` beside ``cat.png`` and ``cat.jpg``,
    ``CAT.png`` beside ``cat.png``) or one whose outputs would be a folder another name needs takes its
    whole file name, and failing that ``~2``, ``~3``..., in input order.
    """
    stems = [r.with_suffix("") if r.suffix else r for r in relatives]
    clashes = Counter(name_key(str(s)) for s in stems)
    candidates = [str(r if clashes[name_key(str(s))] > 1 else s) for r, s in zip(relatives, stems)]
    natural = {name_key(c) for c in candidates}
    folders = {name_key(str(p)) for c in candidates for p in PurePath(c).parents if str(p) != "."}
    taken: set[str] = set()

    def free(name: str, natural_allowed: bool) -> bool:
        key = name_key(name)
        return (
            key not in taken
            and (natural_allowed or key not in natural)
            and not any(name_key(name + suffix) in folders for suffix in OUTPUT_SUFFIXES)
        )

    names = []
    for candidate, relative in zip(candidates, relatives):
        name, copy = candidate, 1
        if not free(name, True):
            name = str(relative)
        while not free(name, name == candidate):
            copy += 1
            name = f"{candidate}~{copy}"
        taken.add(name_key(name))
        names.append(PurePath(name))
    return names


def discover(
    arguments: Sequence[str],
    stdin: Iterable[str] | None = None,
    exclude: Path | None = None,
    extensions: set[str] = IMAGE_EXTENSIONS,
) -> list[ImageItem]:
    """Expand folders, files and ``-`` (paths on stdin) into image items with collision-free names.

    Output names are paths relative to the inputs' common folder, so ``a/cat.png`` and ``b/cat.png``
    stay apart (see :func:`unique_stems`). ``exclude`` (the output folder) is never searched, so a run
    never takes its own outputs as inputs. Folders are searched for files with ``extensions``. Unusable
    entries found on the way become items with an ``error`` instead of stopping the search.
    """
    exclude = _absolute(exclude) if exclude is not None else None
    found: list[tuple[Path, str | None]] = []
    for argument in arguments:
        if argument == "-":
            found.extend(_stdin_entry(line) for line in _stdin_paths(stdin))
            continue
        path = _absolute(argument)
        if path.is_dir():
            if exclude is not None and path == exclude:
                raise InputError(
                    f"{argument}: this folder is also the output folder; outputs would mix with (and could "
                    "overwrite) the inputs: choose another --output"
                )
            start = len(found)
            _walk(path, exclude, found, extensions)
            if len(found) == start:
                raise InputError(f"{argument}: folder holds no image files ({', '.join(sorted(extensions))})")
        elif path.exists():
            found.append((path, None))
        else:
            problem = _link_problem(path)
            raise InputError(f"{argument}: {problem or 'no such file or folder'}")
    entries = dict(reversed(found))  # one entry per path, the first one found
    unique = [(path, entries[path]) for path in dict.fromkeys(p for p, _ in found)]
    if not unique:
        raise InputError("no input images given")
    base = Path(os.path.commonpath([str(p.parent) for p, _ in unique]))
    stems = unique_stems([p.relative_to(base) for p, _ in unique])
    return [ImageItem(path, Path(stem), error) for (path, error), stem in zip(unique, stems)]


def decode(path: Path, max_pixels: int) -> Image.Image:
    """Open any supported image as 8-bit RGB in its upright orientation.

    Handles EXIF rotation, palette and transparency (composited on white), grayscale, 16-bit, CMYK
    and animated images (first frame). Raises ``ValueError`` with a reason for unusable files.
    """
    # Pillow refuses images over twice its own limit before we see their size: let ours decide
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        if path.is_dir():
            raise ValueError("is a folder, not an image file")
        if path.stat().st_size == 0:
            raise ValueError("empty file")
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
    except OSError as error:
        if error.errno is not None:  # the system refused (permissions, I/O), not the image's content
            raise ValueError(f"cannot read file: {error.strerror}") from None
        raise ValueError(f"corrupt or truncated image: {error}") from None
    except SyntaxError as error:
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


RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
"""Resampling filters by the names timm and torchvision give the interpolation a model was trained with."""


def prepare(image: Image.Image, resolution: int, policy: str, interpolation: str = "bicubic") -> Image.Image:
    """Resize for the model: ``squash`` scales the whole photo to a square (every pixel explained),
    ``crop`` takes the centred square first (no distortion, borders not explained)."""
    if policy == "crop":
        image = image.crop(crop_box(*image.size))
    resample = RESAMPLING.get(interpolation, Image.Resampling.BICUBIC)
    return image.resize((resolution, resolution), resample, reducing_gap=3.0)


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
        interpolation: str = "bicubic",
    ) -> None:
        self.items = list(items)
        self.interpolation = interpolation
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
        image = prepare(photo, self.resolution, self.policy, self.interpolation)
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
