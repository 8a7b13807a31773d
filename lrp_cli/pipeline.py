"""The batch job behind ``lrp-heatmap run``: discover, decode, explain, render, record."""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from .config import Config
from .data import ImageDataset, ImageItem, discover, make_loader
from .lrp import Explainer, get_composite, retain_freed_memory
from .models import LoadedModel, load_model
from .render import (
    atomic_write,
    heatmap_image,
    image_bytes,
    normalise,
    npy_bytes,
    overlay_image,
    relevance_map,
)

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MANIFEST = "manifest.jsonl"


class RunError(RuntimeError):
    """A problem that stops the run before any image is processed (exit code 2)."""


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunError(
                f"device {requested!r} asked for, but CUDA is not available here; use --device cpu"
            )
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise RunError(f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device(requested)


def prepare_engine(config: Config, loaded: LoadedModel) -> tuple[torch.device, Explainer]:
    """The configured device, with the model on it, and the engine as the config describes it
    (composite preset plus rule overrides)."""
    device = resolve_device(config.device)
    retain_freed_memory()  # batch after batch reuses the same large buffers instead of page-faulting them
    loaded.module.to(device)
    composite = get_composite(config.composite).with_overrides(config.rules)
    return device, Explainer(
        loaded.module,
        composite,
        config.topk,
        renormalize=config.renormalize,
        precision=config.precision,  # type: ignore[arg-type]
        winograd=config.winograd,
        mean=loaded.mean,
        std=loaded.std,
    )


@dataclass
class Prediction:
    """What the engine said about one image, ready for the writer threads."""

    item: ImageItem
    relevance: np.ndarray  # (C, H, W) float32
    photo: np.ndarray  # the decoded photo, uint8 (H, W, 3), for the overlay
    class_index: int
    probability: float
    target: int | str
    compute_ms: float


def output_paths(out_dir: Path, item: ImageItem, config: Config) -> dict[str, Path]:
    stem = str(item.relative)
    paths = {
        "heatmap": out_dir / f"{stem}.heatmap.png",
        "overlay": out_dir / f"{stem}.overlay.{config.overlay_format}",
    }
    if config.save_relevance:
        paths["relevance"] = out_dir / f"{stem}.relevance.npy"
    return paths


def explained_batches(
    config: Config,
    items: Sequence[ImageItem],
    loaded: LoadedModel,
    explainer: Explainer,
    device: torch.device,
) -> Iterable[tuple[list[Prediction], list[tuple[ImageItem, str]]]]:
    """Run the DataLoader and the engine; yield each batch's predictions and decode failures."""
    dataset = ImageDataset(
        items, config.resolution, config.resize, loaded.mean, loaded.std, config.max_pixels
    )
    loader = make_loader(dataset, config.batch_size, config.workers, pin_memory=device.type == "cuda")
    target = config.target
    for batch in loader:
        failures = [(items[i], error) for i, error in batch["failures"]]
        predictions: list[Prediction] = []
        if batch["pixels"] is not None:
            started = time.perf_counter()
            pixels = batch["pixels"].to(device, non_blocking=True)
            try:
                result = explainer(pixels, target)
            except ValueError as error:  # e.g. a target class the model does not have
                raise RunError(f"cannot explain with target {target!r}: {error}") from error
            probabilities = result.logits.float().softmax(dim=1)
            top = probabilities.argmax(dim=1)
            relevance = result.relevance.float().cpu().numpy()
            elapsed = (time.perf_counter() - started) * 1000.0 / len(batch["indices"])
            for row, index in enumerate(batch["indices"]):
                explained = int(result.targets[row])
                predictions.append(
                    Prediction(
                        items[index],
                        relevance[row],
                        batch["photos"][row].numpy(),
                        int(top[row]),
                        float(probabilities[row, top[row]]),
                        explained if explained >= 0 else "softmax",
                        elapsed,
                    )
                )
        yield predictions, failures


def render_outputs(
    prediction: Prediction, config: Config, signed: bool, out_dir: Path, loaded: LoadedModel
) -> dict:
    """Write one image's files (atomically) and return its manifest record."""
    started = time.perf_counter()
    item = prediction.item
    paths = output_paths(out_dir, item, config)
    heat = normalise(relevance_map(prediction.relevance), signed)
    atomic_write(paths["heatmap"], image_bytes(heatmap_image(heat, signed, config.colormap)))
    overlay = overlay_image(
        prediction.photo, heat, signed, config.resize, config.overlay_alpha, config.colormap
    )
    atomic_write(paths["overlay"], image_bytes(overlay, config.overlay_format))
    if "relevance" in paths:
        atomic_write(paths["relevance"], npy_bytes(prediction.relevance.astype(np.float32)))
    ms = prediction.compute_ms + (time.perf_counter() - started) * 1000.0
    return {
        "path": str(item.path),
        "name": str(item.relative),
        "outputs": {kind: str(path) for kind, path in paths.items()},
        "class_index": prediction.class_index,
        "label": loaded.label(prediction.class_index),
        "probability": round(prediction.probability, 6),
        "target": prediction.target,
        "relevance_sum": float(prediction.relevance.sum(dtype=np.float64)),
        "ms": round(ms, 2),
        "error": None,
    }


def failure_record(item: ImageItem, error: str) -> dict:
    return {
        "path": str(item.path),
        "name": str(item.relative),
        "outputs": {},
        "class_index": None,
        "label": None,
        "probability": None,
        "target": None,
        "relevance_sum": None,
        "ms": None,
        "error": error,
    }


def completed_paths(manifest: Path) -> set[str]:
    """Inputs a previous run finished: recorded without error and with every output file present."""
    done: set[str] = set()
    if not manifest.exists():
        return done
    for line in manifest.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: that image is simply redone
        if record.get("error") is None and all(Path(p).exists() for p in record.get("outputs", {}).values()):
            done.add(record["path"])
    return done


class Reporter:
    """Manifest lines (flushed one by one), optional JSON on stdout, errors on stderr."""

    def __init__(self, manifest: Path, append: bool, json_out: TextIO | None, err: TextIO) -> None:
        manifest.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            atomic_write(manifest, b"")
        self.file = manifest.open("a", encoding="utf-8")
        self.json_out, self.err = json_out, err
        self.failed = 0
        self.succeeded = 0

    def record(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        self.file.write(line + "\n")
        self.file.flush()
        if self.json_out is not None:
            self.json_out.write(line + "\n")
            self.json_out.flush()
        if record["error"] is not None:
            self.failed += 1
            self.err.write(f"lrp-heatmap: skipped {record['path']}: {record['error']}\n")
        else:
            self.succeeded += 1

    def close(self) -> None:
        self.file.close()


def run(
    config: Config,
    inputs: Sequence[str],
    *,
    resume: bool = False,
    json_output: bool = False,
    quiet: bool = False,
    stdin: Iterable[str] | None = None,
) -> int:
    """The whole job; returns the exit code (0 all good, 1 some inputs failed, 130 interrupted)."""
    items = discover(inputs, stdin)
    out_dir = Path(config.output)
    manifest = out_dir / MANIFEST
    if resume:
        done = completed_paths(manifest)
        items = [item for item in items if str(item.path) not in done]
    loaded = load_model(config.model, config.weights, config.mean, config.std)
    device, explainer = prepare_engine(config, loaded)
    if device.type == "cuda":  # every batch has one shape: let cuDNN time its kernels once and keep the best
        torch.backends.cudnn.benchmark = True
    signed = explainer.composite.signed
    reporter = Reporter(manifest, append=resume, json_out=sys.stdout if json_output else None, err=sys.stderr)
    bar = None
    if not (json_output or quiet) and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="img", file=sys.stderr)
    pending: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lrp-writer")

    def drain(limit: int) -> None:
        while pending and (len(pending) > limit or pending[0].done()):
            reporter.record(pending.popleft().result())
            if bar is not None:
                bar.update(1)

    try:
        for predictions, failures in explained_batches(config, items, loaded, explainer, device):
            for item, error in failures:
                reporter.record(failure_record(item, error))
            for prediction in predictions:
                pending.append(pool.submit(_render_safely, prediction, config, signed, out_dir, loaded))
            drain(limit=4 * config.batch_size)
        drain(limit=0)
    except KeyboardInterrupt:
        for future in pending:
            future.cancel()
        finished = [f for f in pending if not f.cancelled()]
        pending.clear()
        pending.extend(finished)
        drain(limit=0)
        sys.stderr.write(
            f"lrp-heatmap: interrupted after {reporter.succeeded} image(s); finished outputs are complete, "
            "run again with --resume to continue\n"
        )
        return EXIT_INTERRUPTED
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        reporter.close()
        if bar is not None:
            bar.close()
    if not quiet and not json_output:
        sys.stderr.write(
            f"lrp-heatmap: {reporter.succeeded} explained, {reporter.failed} failed; manifest {manifest}\n"
        )
    return EXIT_FAILED_INPUTS if reporter.failed else EXIT_OK


def _render_safely(
    prediction: Prediction, config: Config, signed: bool, out_dir: Path, loaded: LoadedModel
) -> dict:
    """A file that decoded for the model but cannot be written or re-read becomes a failure record."""
    try:
        return render_outputs(prediction, config, signed, out_dir, loaded)
    except (OSError, ValueError) as error:
        return failure_record(prediction.item, f"could not write outputs: {error}")
