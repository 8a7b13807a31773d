"""Heatmap snapshots for CI: record relevance maps once, then fail when explanations drift.

A snapshot folder holds ``snapshot.json`` (model, weights hash, the settings that shape heatmaps,
library versions, input hashes) and one ``NAME.relevance.npy.gz`` per image: the (H, W) relevance map
divided by its largest magnitude (the scale is in the metadata) and stored in float16, gzip-compressed
without timestamps so that recording twice gives identical files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import torch
from PIL import Image

from . import __version__
from .config import Config
from .data import ImageItem, discover
from .distributed import gather_comparisons, share_items
from .lrp import Explainer
from .models import LoadedModel, load_model
from .pipeline import explained_batches, prepare_engine
from .render import atomic_write, colorize, image_bytes, relevance_map

FORMAT = 1
METADATA = "snapshot.json"
# settings that change heatmaps; device, batch size, workers, colours and paths do not
HEATMAP_KEYS = (
    "model", "weights", "mean", "std", "composite", "rules", "topk", "renormalize", "target", "precision",
    "resolution", "resize",
)  # fmt: skip


class SnapshotError(RuntimeError):
    """A snapshot folder that cannot be used (missing, corrupt); exit code 2."""


@dataclass(frozen=True)
class Tolerances:
    """Pass criteria per image; defaults absorb float noise between CPU kinds and CPU vs GPU."""

    min_pearson: float = 0.98
    max_diff: float = 0.5  # largest |current - recorded| / max |recorded|
    max_mean_diff: float = 0.03  # mean |current - recorded| / max |recorded|
    min_iou: float = 0.7  # overlap of the top `mask_fraction` pixels by |relevance|
    mask_fraction: float = 0.05


@dataclass
class Comparison:
    """One image's verdict."""

    name: str
    status: str  # "pass" | "drift" | "added" | "missing" | "error"
    pearson: float | None = None
    max_diff: float | None = None
    mean_diff: float | None = None
    iou: float | None = None
    reasons: list[str] = field(default_factory=list)
    diff: str | None = None  # the side-by-side image written for a drift, where one could be drawn


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    names = ("torch", "torchvision", "timm", "numpy", "pillow")
    found = {"lrp-heatmap": __version__, "python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def heatmap_settings(config: Config) -> dict[str, Any]:
    return {key: getattr(config, key) for key in HEATMAP_KEYS}


def quantise(heat: np.ndarray) -> tuple[np.ndarray, float]:
    """Relevance values are often far below float16's range: store heat / max|heat| and the scale."""
    scale = float(np.abs(heat).max()) or 1.0
    return (heat / scale).astype(np.float16), scale


def map_bytes(scaled: np.ndarray) -> bytes:
    """float16 .npy, gzip-compressed with a zero timestamp (deterministic bytes)."""
    raw = io.BytesIO()
    np.save(raw, scaled)
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0, compresslevel=6) as zipped:
        zipped.write(raw.getvalue())
    return packed.getvalue()


def read_map(path: Path, scale: float) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as zipped:
            return np.load(io.BytesIO(zipped.read()), allow_pickle=False).astype(np.float32) * np.float32(
                scale
            )
    except (OSError, ValueError, EOFError) as error:
        raise SnapshotError(f"{path}: corrupt snapshot file ({error}); record the snapshot again") from error


def _map_name(item_name: str) -> str:
    return f"{item_name}.relevance.npy.gz"


def write_entry(directory: Path, name: str, item: ImageItem, heat: np.ndarray) -> dict[str, Any]:
    """Write one image's map into the snapshot folder; its ``images`` entry of ``snapshot.json``."""
    scaled, scale = quantise(heat)
    atomic_write(directory / _map_name(name), map_bytes(scaled))
    return {
        "file": str(item.path.name),
        "sha256": file_hash(item.path),
        "shape": list(heat.shape),
        "scale": scale,
    }


def compute_maps(
    config: Config, items: Sequence[ImageItem], loaded: LoadedModel, engine: tuple[torch.device, Explainer]
) -> Iterable[tuple[ImageItem, np.ndarray | None, str | None]]:
    """(item, (H, W) relevance map or None, error) for every item, in order, by ``engine`` (from
    :func:`prepare_engine`)."""
    device, explainer = engine
    for predictions, failures in explained_batches(config, items, loaded, explainer, device):
        for item, error in failures:
            yield item, None, error
        for prediction in predictions:
            yield prediction.item, relevance_map(prediction.relevance), None


def record(config: Config, inputs: Sequence[str], directory: Path, stdin: Iterable[str] | None = None) -> int:
    """Write a snapshot of every input's relevance map; returns the exit code (1 if any input failed)."""
    items = discover(inputs, stdin, exclude=directory)
    loaded = load_model(config.model, config.weights, config.mean, config.std)
    engine = prepare_engine(config, loaded)  # also resolves composite "auto" to the preset used
    directory.mkdir(parents=True, exist_ok=True)
    images: dict[str, Any] = {}
    failed = 0
    for item, heat, error in compute_maps(config, items, loaded, engine):
        name = str(item.relative)
        if heat is None:
            failed += 1
            sys.stderr.write(f"lrp-heatmap: skipped {item.path}: {error}\n")
            continue
        images[name] = write_entry(directory, name, item, heat)
    document = {
        "format": FORMAT,
        "model": loaded.name,
        "weights_sha256": loaded.weights_hash,
        "settings": heatmap_settings(config),
        "versions": versions(),
        "images": dict(sorted(images.items())),
    }
    atomic_write(directory / METADATA, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    return 1 if failed else 0


def load_snapshot(directory: Path) -> dict[str, Any]:
    path = directory / METADATA
    if not path.is_file():
        raise SnapshotError(f"{directory}: no {METADATA} here; record one with 'lrp-heatmap snapshot record'")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: invalid JSON or invalid UTF-8
        raise SnapshotError(
            f"{path}: corrupt snapshot metadata ({error}); record the snapshot again"
        ) from error
    required = {"format", "model", "weights_sha256", "settings", "images"}
    if not isinstance(document, dict) or not required <= set(document):
        raise SnapshotError(f"{path}: not a snapshot file (needs keys {', '.join(sorted(required))})")
    if document["format"] != FORMAT:
        raise SnapshotError(
            f"{path}: snapshot format {document['format']!r} is not supported (expected {FORMAT})"
        )
    problem = _structure_problem(document)
    if problem:
        raise SnapshotError(f"{path}: corrupt snapshot metadata ({problem}); record the snapshot again")
    return document


def _structure_problem(document: dict[str, Any]) -> str | None:
    """What is wrong with a parsed snapshot.json's layout, if anything."""
    if not isinstance(document["model"], str) or not isinstance(document["weights_sha256"], str):
        return "'model' and 'weights_sha256' must be strings"
    if not isinstance(document["settings"], dict):
        return f"'settings' must be a mapping, got {document['settings']!r}"
    if not isinstance(document["images"], dict):
        return f"'images' must be a mapping, got {document['images']!r}"
    for name, entry in document["images"].items():
        if not isinstance(entry, dict):
            return f"image {name!r} must be a mapping, got {entry!r}"
        scale = entry.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            return f"image {name!r}: 'scale' must be a number, got {scale!r}"
    return None


def metrics(recorded: np.ndarray, current: np.ndarray, fraction: float) -> dict[str, float]:
    """Pearson r, normalised max/mean absolute difference and top-fraction mask IoU."""
    a, b = recorded.astype(np.float64).ravel(), current.astype(np.float64).ravel()
    scale = float(np.abs(a).max()) or 1.0
    if a.std() == 0 or b.std() == 0:
        pearson = 1.0 if np.array_equal(a, b) else 0.0
    else:
        pearson = float(np.corrcoef(a, b)[0, 1])
    k = max(1, int(fraction * a.size))
    mask_a = np.zeros(a.size, bool)
    mask_b = np.zeros(a.size, bool)
    mask_a[np.argsort(-np.abs(a), kind="stable")[:k]] = True
    mask_b[np.argsort(-np.abs(b), kind="stable")[:k]] = True
    iou = float((mask_a & mask_b).sum() / (mask_a | mask_b).sum())
    difference = np.abs(a - b) / scale
    return {
        "pearson": pearson,
        "max_diff": float(difference.max()),
        "mean_diff": float(difference.mean()),
        "iou": iou,
    }


def judge(name: str, values: dict[str, float], tolerances: Tolerances) -> Comparison:
    reasons = []
    if values["pearson"] < tolerances.min_pearson:
        reasons.append(f"pearson {values['pearson']:.4f} < {tolerances.min_pearson}")
    if values["max_diff"] > tolerances.max_diff:
        reasons.append(f"max diff {values['max_diff']:.4f} > {tolerances.max_diff}")
    if values["mean_diff"] > tolerances.max_mean_diff:
        reasons.append(f"mean diff {values['mean_diff']:.4f} > {tolerances.max_mean_diff}")
    if values["iou"] < tolerances.min_iou:
        reasons.append(f"top-{tolerances.mask_fraction:g} IoU {values['iou']:.3f} < {tolerances.min_iou}")
    return Comparison(name, "drift" if reasons else "pass", reasons=reasons, **values)


DIFF_LABELS = ("recorded", "current", "difference")


def diff_image(recorded: np.ndarray, current: np.ndarray) -> Image.Image:
    """Recorded | current | difference (current - recorded), labelled, all three on one shared scale
    (the larger of the two maps' magnitudes, written under the panels), so that neither map saturates
    when the scale itself changed and equal colours mean equal relevance."""
    from PIL import ImageDraw

    scale = max(float(np.abs(recorded).max()), float(np.abs(current).max())) or 1.0
    panels = [
        colorize(recorded / scale, signed=True),
        colorize(current / scale, signed=True),
        colorize(np.clip((current - recorded) / scale, -1, 1), signed=True, colormap="PiYG"),
    ]
    height, width = recorded.shape
    top, bottom, gap = 14, 14, 4
    canvas = Image.new("RGB", (3 * width + 2 * gap, top + height + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (panel, label) in enumerate(zip(panels, DIFF_LABELS, strict=True)):
        left = index * (width + gap)
        canvas.paste(Image.fromarray(panel, "RGB"), (left, top))
        draw.text((left + 2, 1), label, fill="black")
    draw.text((2, top + height + 1), f"shared scale: ±{scale:.3g} (full colour)", fill="black")
    return canvas


@dataclass
class CheckReport:
    comparisons: list[Comparison]
    changes: list[str]  # model / weights / settings differences
    diff_dir: Path | None = None  # where diff images of failing images went
    allow_missing: bool = False  # recorded images absent from the inputs warn instead of failing
    weights_sha256: str | None = None  # of the weights checked now

    def fails(self, comparison: Comparison) -> bool:
        return comparison.status != "pass" and not (self.allow_missing and comparison.status == "missing")

    @property
    def passed(self) -> bool:
        return not self.changes and not any(self.fails(c) for c in self.comparisons)


def check(
    config: Config,
    inputs: Sequence[str],
    directory: Path,
    tolerances: Tolerances,
    diff_dir: Path | None = None,
    stdin: Iterable[str] | None = None,
    *,
    allow_missing: bool = False,
    collect: Callable[[str, ImageItem, np.ndarray], None] | None = None,
) -> CheckReport:
    """Recompute every input's map and compare it with the snapshot. ``collect(name, item, map)`` is
    called for every added or drifted image (``snapshot check --update`` rewrites those)."""
    document = load_snapshot(directory)
    items = share_items(lambda: discover(inputs, stdin, exclude=diff_dir))  # torchrun: this rank's share
    loaded = load_model(config.model, config.weights, config.mean, config.std)
    changes = []
    if document["model"] != loaded.name:
        changes.append(f"model changed: recorded {document['model']!r}, now {loaded.name!r}")
        return CheckReport([], changes)
    if document["weights_sha256"] != loaded.weights_hash:
        changes.append(f"weights changed: recorded {document['weights_sha256']}, now {loaded.weights_hash}")
    engine = prepare_engine(config, loaded)  # also resolves composite "auto" to the preset used
    settings = heatmap_settings(config)
    for key in HEATMAP_KEYS:
        if document["settings"].get(key) != settings[key]:
            changes.append(
                f"setting {key!r} changed: recorded {document['settings'].get(key)!r}, now {settings[key]!r}"
            )
    recorded_images: dict[str, Any] = document["images"]
    comparisons = []
    seen = set()
    for item, heat, error in compute_maps(config, items, loaded, engine):
        name = str(item.relative)
        seen.add(name)
        if name not in recorded_images:
            comparisons.append(Comparison(name, "added", reasons=["not in the snapshot (--update adds it)"]))
            if collect is not None and heat is not None:
                collect(name, item, heat)
            continue
        if heat is None:
            comparisons.append(Comparison(name, "error", reasons=[error or "could not be read"]))
            continue
        recorded = read_map(directory / _map_name(name), float(recorded_images[name].get("scale", 1.0)))
        scaled, scale = quantise(heat)
        current = scaled.astype(np.float32) * np.float32(scale)  # the same quantisation as the recording
        if recorded.shape != current.shape:
            comparisons.append(
                Comparison(
                    name, "drift", reasons=[f"shape {current.shape} differs from recorded {recorded.shape}"]
                )
            )
            if collect is not None:
                collect(name, item, heat)
            continue
        result = judge(name, metrics(recorded, current, tolerances.mask_fraction), tolerances)
        if recorded_images[name].get("sha256") != file_hash(item.path):
            result.status = "drift"
            result.reasons.insert(0, "input file changed since recording")
        if result.status != "pass" and collect is not None:
            collect(name, item, heat)
        if result.status != "pass" and diff_dir is not None:
            result.diff = str(diff_dir / f"{name}.diff.png")
            atomic_write(Path(result.diff), image_bytes(diff_image(recorded, current)))
        comparisons.append(result)
    comparisons, seen = gather_comparisons(comparisons, seen, changes)  # torchrun: all ranks' on rank 0
    for name in sorted(set(recorded_images) - seen):
        comparisons.append(Comparison(name, "missing", reasons=["recorded but not among the inputs"]))
    return CheckReport(comparisons, changes, diff_dir, allow_missing, loaded.weights_hash)


def format_table(report: CheckReport) -> str:
    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"CHANGED: {change}" for change in report.changes]
    header = f"{'image':<32} {'pearson':>8} {'max diff':>9} {'mean diff':>9} {'IoU':>6}  result"
    lines += [header, "-" * len(header)]
    for c in report.comparisons:
        verdict = "FAIL" if report.fails(c) else "WARN"
        verdict = "PASS" if c.status == "pass" else f"{verdict} ({c.status}: {'; '.join(c.reasons)})"
        lines.append(
            f"{c.name:<32} {number(c.pearson, 4):>8} {number(c.max_diff, 4):>9} "
            f"{number(c.mean_diff, 4):>9} {number(c.iou, 3):>6}  {verdict}"
        )
    failed = sum(report.fails(c) for c in report.comparisons)
    warned = sum(c.status != "pass" and not report.fails(c) for c in report.comparisons)
    summary = f"{len(report.comparisons) - failed - warned} passed, {failed} failed"
    if warned:
        summary += f", {warned} missing (allowed)"
    if report.changes:  # the images may all be within tolerance, yet the check fails
        summary = (
            f"FAILED: the model or its settings changed since the recording ({len(report.changes)} "
            f"change(s), listed above); heatmaps: {summary}"
        )
    lines.append(summary)
    if any(c.diff for c in report.comparisons):
        lines.append(f"diff images (recorded | current | difference): {report.diff_dir}")
    return "\n".join(lines)


def junit_xml(report: CheckReport) -> bytes:
    failures = sum(report.fails(c) for c in report.comparisons) + (1 if report.changes else 0)
    suite = ElementTree.Element(
        "testsuite",
        name="lrp-heatmap snapshot",
        tests=str(len(report.comparisons) + 1),
        failures=str(failures),
    )
    meta = ElementTree.SubElement(suite, "testcase", classname="snapshot", name="model-and-settings")
    if report.changes:
        ElementTree.SubElement(meta, "failure", message="; ".join(report.changes)).text = "\n".join(
            report.changes
        )
    for c in report.comparisons:
        case = ElementTree.SubElement(suite, "testcase", classname="snapshot", name=c.name)
        if report.fails(c):
            message = f"{c.status}: {'; '.join(c.reasons)}"
            ElementTree.SubElement(case, "failure", message=message).text = json.dumps(asdict(c))
    return ElementTree.tostring(suite, encoding="utf-8", xml_declaration=True)
