"""Occlusion sensitivity next to LRP: a second, model-free view of which pixels matter, and a check on the
heatmaps.

A ``patch`` x ``patch`` square of the model input is set to the dataset's mean colour (0 after
normalisation) at every ``stride``-th position (plus one flush with the far border, so every pixel is
covered); the drop of the explained class's logit is the window's value, and a pixel's value is the mean
over the windows that cover it. The perturbed inputs go through the model in batches. The correlation
with LRP is taken after the LRP map has gone through the same windows (its sum inside each window,
averaged per pixel the same way): a window's logit drop approximates the relevance inside it, while the
raw LRP map has detail no window of that size can resolve (``pearson_pixels`` gives that one too).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import Config
from .data import ImageItem, discover
from .errors import EXIT_FAILED_INPUTS, EXIT_INTERRUPTED, EXIT_OK, RunError, disk_failure
from .lock import FolderLock
from .manifest import ManifestWriter, add_paths
from .models import LoadedModel, load_model
from .outputs import failure_record
from .pipeline import HalvingExplainer, Reporter, image_dataset, prepare_engine, resolve_device
from .render import atomic_write, heatmap_image, image_bytes, normalise, npy_bytes

MANIFEST = "occlusion.jsonl"
FORWARD_BATCH = 4
"""Perturbed inputs per forward pass, as a multiple of batch_size: a forward costs a third of an LRP pass."""


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Top (or left) edges of the windows along one side: every ``stride`` pixels, and one flush with the
    far border when the stride does not land there."""
    if not 0 < patch <= size:
        raise RunError(f"--patch {patch}: give a size from 1 to the model's input size {size}")
    if stride < 1:
        raise RunError(f"--stride {stride}: give a step of 1 pixel or more")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def _positions(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int]]:
    rows, columns = window_starts(height, patch, stride), window_starts(width, patch, stride)
    return [(top, left) for top in rows for left in columns]


def spread(values: Sequence[float], positions: Sequence[tuple[int, int]], shape: tuple[int, int], patch: int):
    """Per-pixel mean of the window values over the windows covering each pixel, (H, W) float64."""
    total, count = np.zeros(shape), np.zeros(shape)
    for value, (top, left) in zip(values, positions, strict=True):
        total[top : top + patch, left : left + patch] += value
        count[top : top + patch, left : left + patch] += 1
    return total / count


@torch.inference_mode()
def occlusion_map(
    model: nn.Module, image: torch.Tensor, target: int, patch: int, stride: int, batch_size: int = 32
) -> np.ndarray:
    """(H, W) occlusion sensitivity of one normalised (3, H, W) input for class ``target``: the logit drop
    when a window is set to 0 (the mean colour), spread over the pixels it covers (see the module's doc)."""
    height, width = image.shape[-2:]
    positions = _positions(height, width, patch, stride)
    base = float(model(image[None])[0, target])
    drops: list[float] = []
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        batch = image[None].repeat(len(chunk), 1, 1, 1)
        for row, (top, left) in enumerate(chunk):
            batch[row, :, top : top + patch, left : left + patch] = 0.0
        drops.extend((base - model(batch)[:, target].double()).tolist())
    return spread(drops, positions, (height, width), patch)


def windowed(relevance: np.ndarray, patch: int, stride: int) -> np.ndarray:
    """The (H, W) relevance map seen through the occlusion windows: each window's sum, spread per pixel."""
    positions = _positions(*relevance.shape, patch, stride)
    sums = [float(relevance[top : top + patch, left : left + patch].sum()) for top, left in positions]
    return spread(sums, positions, relevance.shape, patch)


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson's r of two maps; None where one is constant (r is undefined)."""
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    norm = float(np.sqrt((a @ a) * (b @ b)))
    return float(a @ b) / norm if norm > 0 else None


def _outputs(out_dir: Path, item: ImageItem) -> dict[str, Path]:
    stem = str(item.relative)
    return {
        "heatmap": out_dir / f"{stem}.heatmap.png",
        "occlusion": out_dir / f"{stem}.occlusion.png",
        "relevance": out_dir / f"{stem}.relevance.npy",
        "occlusion_map": out_dir / f"{stem}.occlusion.npy",
    }


def _write(
    item: ImageItem,
    relevance: np.ndarray,
    occlusion: np.ndarray,
    config: Config,
    signed: bool,
    out_dir: Path,
) -> dict[str, Path]:
    paths = _outputs(out_dir, item)
    heat = relevance.sum(axis=0)
    atomic_write(
        paths["heatmap"], image_bytes(heatmap_image(normalise(heat, signed), signed, config.colormap))
    )
    # a logit drop is signed (occluding can raise the logit): always the signed colour scale
    atomic_write(
        paths["occlusion"], image_bytes(heatmap_image(normalise(occlusion, True), True, config.colormap))
    )
    atomic_write(paths["relevance"], npy_bytes(relevance.astype(np.float32)))
    atomic_write(paths["occlusion_map"], npy_bytes(occlusion.astype(np.float32)))
    return paths


def run_occlusion(
    config: Config, inputs: Sequence[str], patch: int, stride: int, *, quiet: bool = False
) -> int:
    """``lrp-heatmap occlude``: per image the LRP map, the occlusion map, their correlation; records in
    ``occlusion.jsonl``. Returns the exit code (0, 1 when some inputs failed, 130 interrupted)."""
    out_dir = Path(os.path.abspath(config.output))
    items = discover(inputs, None, exclude=out_dir)
    lock = FolderLock(out_dir).acquire()
    err = sys.stderr
    try:
        if config.resolution is not None:  # a patch that does not fit stops the run before the model loads
            window_starts(config.resolution, patch, stride)
        resolve_device(config.device)
        loaded = load_model(config.model, config.weights, config.mean, config.std)
        device, explainer = prepare_engine(config, loaded)
        window_starts(config.resolution, patch, stride)  # the model's own input size
        writer = ManifestWriter(out_dir / MANIFEST, fresh=True)
        reporter = Reporter(writer, None, err)
        try:
            _occlude_all(config, items, loaded, HalvingExplainer(explainer, config, device, err), device, out_dir,
                         patch, stride, explainer.composite.signed, reporter)  # fmt: skip
        except KeyboardInterrupt:
            err.write(
                f"lrp-heatmap: interrupted after {reporter.succeeded} image(s); finished outputs are whole\n"
            )
            return EXIT_INTERRUPTED
        finally:
            writer.close()
    finally:
        lock.release()
    if not quiet:
        err.write(
            f"lrp-heatmap: {reporter.succeeded} occlusion map(s), {reporter.failed} failed; "
            f"records {out_dir / MANIFEST}\n"
        )
    return EXIT_FAILED_INPUTS if reporter.failed else EXIT_OK


def _occlude_all(
    config: Config,
    items: list[ImageItem],
    loaded: LoadedModel,
    engine: HalvingExplainer,
    device: torch.device,
    out_dir: Path,
    patch: int,
    stride: int,
    signed: bool,
    reporter: Reporter,
) -> None:
    dataset = image_dataset(config, loaded, items)
    for index, item in enumerate(items):
        if item.error is not None:
            reporter.record(failure_record(item, item.error))
            continue
        _, pixels, _, error = dataset[index]
        if pixels is None:
            reporter.record(failure_record(item, error or "could not decode"))
            continue
        relevance, logits, targets = engine(pixels[None].to(device))
        probabilities = logits.softmax(dim=1)[0]
        target = int(targets[0]) if int(targets[0]) >= 0 else int(probabilities.argmax())
        forward_batch = FORWARD_BATCH * config.batch_size
        occlusion = occlusion_map(loaded.module, pixels.to(device), target, patch, stride, forward_batch)
        heat = relevance[0].sum(axis=0).astype(np.float64)
        try:
            paths = _write(item, relevance[0], occlusion, config, signed, out_dir)
        except OSError as failure:
            raise disk_failure(failure, f"the outputs of {item.path}") or failure from None
        record = add_paths({}, item.path, item.relative, paths)
        reporter.record(
            record
            | {
                "class_index": target,
                "label": loaded.label(target),
                "probability": round(float(probabilities[target]), 6),
                "composite": config.composite,
                "patch": patch,
                "stride": stride,
                "windows": len(_positions(*occlusion.shape, patch, stride)),
                "pearson": _rounded(pearson(occlusion, windowed(heat, patch, stride))),
                "pearson_pixels": _rounded(pearson(occlusion, heat)),
                "error": None,
            }
        )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
