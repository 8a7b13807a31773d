"""A run's files: where each image's outputs go, that they never overwrite an input, how they are written
and what the manifest records about them."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from .config import Config
from .data import ImageItem, name_key
from .errors import RunError, disk_failure
from .lock import FolderLock
from .manifest import add_paths
from .models import LoadedModel
from .panel import Caption, panel_image
from .render import TEMP_SUFFIX, Pictures, atomic_write, image_bytes, npy_bytes, pictures


@dataclass
class Prediction:
    """What the engine said about one image, ready for the writer threads."""

    item: ImageItem
    relevance: np.ndarray  # (C, H, W) float32
    photo: np.ndarray  # the decoded photo, uint8 (H, W, 3), for the overlay
    class_index: int  # the explained class, or the predicted one for a start over all classes
    probability: float  # softmax probability of class_index
    predicted_index: int  # the model's top class
    target: int | str  # the explained class, or "softmax"
    compute_ms: float
    start_sum: float | None = None  # total relevance the explanation started from (conservation)


def output_paths(out_dir: Path, item: ImageItem, config: Config) -> dict[str, Path]:
    stem = str(item.relative)
    paths = {
        "heatmap": out_dir / f"{stem}.heatmap.png",
        "overlay": out_dir / f"{stem}.overlay.{config.overlay_format}",
    }
    if config.panel:
        paths["panel"] = out_dir / f"{stem}.panel.jpg"
    if config.save_relevance:
        paths["relevance"] = out_dir / f"{stem}.relevance.npy"
    return paths


def check_inputs_kept(items: list[ImageItem], out_dir: Path, config: Config) -> None:
    """Refuse a run that would write an output over one of its own inputs (RunError, exit code 2)."""
    inputs = {name_key(str(item.path)): item.path for item in items}
    for item in items:
        for path in output_paths(out_dir, item, config).values():
            overwritten = inputs.get(name_key(str(path)))
            if overwritten is not None:
                raise RunError(
                    f"the output {path} would overwrite the input {overwritten}; choose another --output"
                )


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the temporary files of writes cut short by a SIGKILL or power loss (only ever ours: hidden,
    ending in ``TEMP_SUFFIX``); call only while holding the folder's lock. Returns how many."""
    removed = 0
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                Path(root, name).unlink(missing_ok=True)
                removed += 1
    return removed


def take_over_folder(lock: FolderLock, err: TextIO, *, clean: bool = True) -> None:
    """After the lock is held: say whose killed run's lock was taken over and remove that run's
    unfinished temporary files (``clean=False`` for a torchrun rank, whose rank 0 cleaned for all)."""
    if lock.taken_over:
        err.write(
            f"lrp-heatmap: took over the lock of a run that ended without releasing it ({lock.taken_over})\n"
        )
    removed = remove_stale_temporaries(lock.folder) if clean else 0
    if removed:
        err.write(f"lrp-heatmap: removed {removed} unfinished temporary file(s) left by a killed run\n")


def render_outputs(
    prediction: Prediction, config: Config, signed: bool, out_dir: Path, loaded: LoadedModel
) -> dict[str, Any]:
    """Write one image's files (atomically) and return its manifest record.

    A file that decoded for the model but cannot be written becomes a failure record; a full or failing
    disk raises EnvironmentFailure, as it stops every image alike.
    """
    started = time.perf_counter()
    item = prediction.item
    paths = output_paths(out_dir, item, config)
    try:
        shown = pictures(
            prediction.relevance, prediction.photo, signed, config.resize, config.overlay_alpha,
            config.colormap, config.overlay_mode,
        )  # fmt: skip
        atomic_write(paths["heatmap"], image_bytes(shown.heatmap))
        atomic_write(paths["overlay"], image_bytes(shown.overlay, config.overlay_format))
        if "panel" in paths:
            atomic_write(paths["panel"], image_bytes(panel_for(prediction, shown, config, loaded), "jpg"))
        if "relevance" in paths:
            atomic_write(paths["relevance"], npy_bytes(prediction.relevance.astype(np.float32)))
    except (OSError, ValueError) as error:
        failure = disk_failure(error, f"the outputs of {item.path}")
        if failure is not None:
            raise failure from None
        return failure_record(item, f"could not write outputs: {error}")
    ms = prediction.compute_ms + (time.perf_counter() - started) * 1000.0
    record = add_paths({}, item.path, item.relative, paths)
    return record | {
        "class_index": prediction.class_index,
        "label": loaded.label(prediction.class_index),
        "probability": round(prediction.probability, 6),
        "predicted_index": prediction.predicted_index,
        "predicted_label": loaded.label(prediction.predicted_index),
        "target": prediction.target,
        "composite": config.composite,
        "start_sum": prediction.start_sum,
        "relevance_sum": float(prediction.relevance.sum(dtype=np.float64)),
        "ms": round(ms, 2),
        "error": None,
    }


def panel_for(prediction: Prediction, shown: Pictures, config: Config, loaded: LoadedModel) -> Image.Image:
    """The image's NAME.panel.jpg picture (lrp_cli.panel), captioned from its prediction and the run."""
    caption = Caption(
        loaded.label(prediction.class_index), prediction.class_index, prediction.probability,
        prediction.target, prediction.predicted_index, loaded.label(prediction.predicted_index),
        config.composite, config.topk, config.renormalize, config.overlay_mode,
    )  # fmt: skip
    return panel_image(prediction.photo, shown, caption)


def failure_record(item: ImageItem, error: str) -> dict[str, Any]:
    record = add_paths({}, item.path, item.relative, {})
    return record | {
        "class_index": None,
        "label": None,
        "probability": None,
        "predicted_index": None,
        "predicted_label": None,
        "target": None,
        "composite": None,
        "start_sum": None,
        "relevance_sum": None,
        "ms": None,
        "error": error,
    }
