"""Training data from class folders: which images, which class, which split, and the tensors a step gets.

Everything that can refuse the data (too few classes, an empty class, an empty split) is found before the
model loads; unreadable images are found by decoding every image once and are left out with a report.
Data order and augmentation are functions of (seed, epoch, image), never of a global random state, so a
resumed run, any number of DataLoader workers and any number of DDP processes see the same data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import IMAGE_EXTENSIONS, InputError, decode, prepare

VAL_FOLDER, TRAIN_FOLDER = "val", "train"
Sample = tuple[Path, int]


@dataclass
class Split:
    """The classes (folder names, sorted: index = class index) and the images of each split."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    source: str  # where the validation images come from, for the report
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable images and why


def _images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive, sorted, hidden files and folders skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            Path(root) / name
            for name in sorted(files)
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return found


def _class_folders(root: Path, skip: tuple[str, ...] = (), exclude: Path | None = None) -> dict[str, Path]:
    return {
        entry.name: entry
        for entry in sorted(root.iterdir(), key=lambda e: e.name)
        if entry.is_dir()
        and not entry.name.startswith(".")
        and entry.name not in skip
        and (exclude is None or entry.resolve() != exclude)
    }


def _listed(folders: dict[str, Path], what: str) -> dict[str, list[Path]]:
    images = {name: _images(folder) for name, folder in folders.items()}
    for name, paths in images.items():
        if not paths:
            raise InputError(
                f"{folders[name]}: {what} class folder {name!r} holds no image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            )
    return images


def find_split(
    data_dir: str | Path,
    val_fraction: float,
    seed: int,
    max_pixels: int,
    workers: int,
    exclude: Path | None = None,
) -> Split:
    """Classes and splits of ``data_dir``: ``train/`` and ``val/`` folders of class folders, class
    folders plus a ``val/`` folder, or class folders alone (``val_fraction`` of each class held out, chosen
    by ``seed``); ``exclude`` (the run's output folder) is never a class. Unreadable images are dropped (listed in ``skipped``); InputError (exit 2) for a data
    set that cannot be trained on, naming the folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(
            f"{root}: {'not a folder' if root.exists() else 'no such folder'}; pass a folder "
            "with one sub-folder of images per class"
        )
    train_root = root / TRAIN_FOLDER if (root / TRAIN_FOLDER).is_dir() else root
    exclude = exclude.resolve() if exclude is not None else None
    folders = _class_folders(train_root, (VAL_FOLDER, TRAIN_FOLDER), exclude)
    if len(folders) < 2:
        found = f" ({', '.join(folders)})" if folders else ""
        raise InputError(
            f"{train_root}: found {len(folders)} class folder(s){found}; training needs at least two "
            "sub-folders of images, one per class"
        )
    classes = list(folders)
    train = _listed(folders, "training")
    val_root = root / VAL_FOLDER
    val: dict[str, list[Path]] = {}
    if val_root.is_dir():
        val_folders = _class_folders(val_root)
        missing = [name for name in classes if name not in val_folders]
        extra = [name for name in val_folders if name not in folders]
        if not val_folders or not any(_images(f) for f in val_folders.values()):
            raise InputError(
                f"{val_root}: the validation split is empty; put images in {val_root}/CLASS/ "
                "folders or remove the folder to hold out train.val_fraction of each class"
            )
        if missing or extra:
            what = "; ".join(
                part
                for part in (
                    f"no folder for class(es) {', '.join(missing)}" if missing else "",
                    f"class folder(s) {', '.join(extra)} not among the training classes" if extra else "",
                )
                if part
            )
            raise InputError(f"{val_root}: {what}; the val/ folder needs the training set's class folders")
        val = _listed({name: val_folders[name] for name in classes}, "validation")
        source = f"{val_root}"
    skipped = _unreadable(
        [p for paths in [*train.values(), *val.values()] for p in paths], max_pixels, workers
    )
    bad = {path for path, _ in skipped}
    for images, where in ((train, train_root), (val, val_root)):
        for name, paths in images.items():
            images[name] = [p for p in paths if p not in bad]
            if not images[name]:
                raise InputError(
                    f"{where / name}: class {name!r} holds no readable image (all "
                    f"{len([p for p, _ in skipped if p.parent == where / name])} unreadable)"
                )
    if not val_root.is_dir():
        train, val = _hold_out(train, val_fraction, seed)
        source = f"{val_fraction:g} of each class" if val_fraction else "none"
        if val_fraction and not any(val.values()):
            raise InputError(
                f"{train_root}: the validation split is empty ({val_fraction:g} of each class rounds to no "
                "image); add images, add a val/ folder, or set train.val_fraction: 0 to train without one"
            )
    return Split(
        classes,
        [(p, i) for i, name in enumerate(classes) for p in train[name]],
        [(p, i) for i, name in enumerate(classes) for p in val.get(name, [])],
        source,
        skipped,
    )


def _hold_out(
    images: dict[str, list[Path]], fraction: float, seed: int
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """``fraction`` of each class (rounded, at least one image left for training) drawn by ``seed``."""
    train, val = {}, {}
    generator = torch.Generator().manual_seed(seed)
    for name, paths in images.items():
        count = min(len(paths) - 1, round(len(paths) * fraction))
        order = torch.randperm(len(paths), generator=generator).tolist()
        held = set(order[:count])
        val[name] = [p for i, p in enumerate(paths) if i in held]
        train[name] = [p for i, p in enumerate(paths) if i not in held]
    return train, val


class _Probe(Dataset):
    def __init__(self, paths: Sequence[Path], max_pixels: int) -> None:
        self.paths, self.max_pixels = paths, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str | None:
        try:
            decode(self.paths[index], self.max_pixels)
        except (ValueError, OSError) as error:
            return str(error)
        return None


def _unreadable(paths: list[Path], max_pixels: int, workers: int) -> list[tuple[Path, str]]:
    """Each image that does not decode, with the reason (decoded in ``workers`` processes)."""
    loader = DataLoader(
        _Probe(paths, max_pixels),
        batch_size=32,
        num_workers=min(workers, math.ceil(len(paths) / 32)),
        collate_fn=list,
    )
    reasons = [reason for batch in loader for reason in batch]
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input; stored in checkpoints, so ``run`` feeds the same."""

    resolution: int
    resize: str
    interpolation: str
    mean: list[float]
    std: list[float]


def _draw(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _crop(photo: Image.Image, scale: float, generator: torch.Generator) -> Image.Image:
    """A random crop of at least ``scale`` of the area, aspect ratio in [3/4, 4/3]."""
    width, height = photo.size
    area = width * height * _draw(generator, scale, 1.0)
    ratio = math.exp(_draw(generator, math.log(3 / 4), math.log(4 / 3)))
    w = max(1, min(width, round(math.sqrt(area * ratio))))
    h = max(1, min(height, round(math.sqrt(area / ratio))))
    left = round(_draw(generator) * (width - w))
    top = round(_draw(generator) * (height - h))
    return photo.crop((left, top, left + w, top + h))


def _jitter(pixels: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a factor in [1 - amount, 1 + amount]."""
    pixels = pixels * _draw(generator, 1 - amount, 1 + amount)
    mean = pixels.mean()
    pixels = (pixels - mean) * _draw(generator, 1 - amount, 1 + amount) + mean
    gray = (pixels * torch.tensor([0.299, 0.587, 0.114]).reshape(3, 1, 1)).sum(0, keepdim=True)
    pixels = (pixels - gray) * _draw(generator, 1 - amount, 1 + amount) + gray
    return pixels.clamp(0.0, 1.0)


class ClassImages(Dataset):
    """``(index, epoch)`` to ``(pixels, label)``, augmented when ``augment`` is given (the train keys
    flip, crop_scale, jitter), with the draws seeded by (seed, epoch, index); an image that fails to
    decode now yields its error instead (the collate function sets it aside)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        pre: Preprocessing,
        max_pixels: int,
        augment: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.samples, self.pre, self.max_pixels = list(samples), pre, max_pixels
        self.augment, self.seed = augment, seed
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int, str | None]:
        index, epoch = key
        path, label = self.samples[index]
        try:
            photo = decode(path, self.max_pixels)
        except (ValueError, OSError) as error:
            return None, label, f"{path}: {error}"
        augment = self.augment
        generator = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63
        )
        if augment and augment["crop_scale"] < 1:
            photo = _crop(photo, augment["crop_scale"], generator)
        image = prepare(photo, self.pre.resolution, self.pre.resize, self.pre.interpolation)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        if augment and augment["flip"] and _draw(generator) < 0.5:
            pixels = pixels.flip(-1)
        if augment and augment["jitter"] > 0:
            pixels = _jitter(pixels, augment["jitter"], generator)
        return (pixels - self.mean) / self.std, label, None


def collate(batch: list[tuple[torch.Tensor | None, int, str | None]]) -> dict[str, Any]:
    good = [(pixels, label) for pixels, label, _ in batch if pixels is not None]
    return {
        "pixels": torch.stack([p for p, _ in good]) if good else None,
        "labels": torch.tensor([label for _, label in good], dtype=torch.long),
        "failures": [error for _, _, error in batch if error is not None],
    }


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Global batches of ``batch_size`` in an order drawn from (seed, epoch), of which this process
    (``rank`` of ``world``) takes every ``world``-th image. Training drops a last batch with fewer than two
    images per process (batch norms cannot train on one)."""

    def __init__(
        self, count: int, batch_size: int, seed: int, *, shuffle: bool, rank: int = 0, world: int = 1
    ) -> None:
        self.count, self.batch_size, self.seed, self.shuffle = count, batch_size, seed, shuffle
        self.rank, self.world, self.epoch = rank, world, 0

    def _global(self) -> list[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.count, generator=generator).tolist()
        else:
            order = list(range(self.count))
        batches = [order[i : i + self.batch_size] for i in range(0, self.count, self.batch_size)]
        if self.shuffle and batches and len(batches[-1]) < 2 * self.world:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self._global():
            mine = batch[self.rank :: self.world]
            if mine:
                yield [(index, self.epoch) for index in mine]

    def __len__(self) -> int:
        return sum(1 for batch in self._global() if batch[self.rank :: self.world])


def loader(dataset: ClassImages, sampler: EpochBatches, workers: int, pin_memory: bool) -> DataLoader:
    """Batches from ``sampler``; the DataLoader's own generator keeps it off the global random state (which
    the model's dropout draws from). Workers persist across epochs: the epoch travels in each index."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,
    )
