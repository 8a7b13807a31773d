"""Per-epoch metrics as JSON lines and a plot of the loss and accuracy curves, both rewritten whole
(atomically) after every epoch."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ..render import atomic_write

METRICS, CURVES = "metrics.jsonl", "curves.png"


def read_metrics(path: Path, epochs: int) -> list[dict[str, Any]]:
    """The records of the first ``epochs`` epochs of an earlier run (those a resumed run keeps)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= epochs:
            records.append(record)
    return records


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(record) + "\n" for record in history).encode())


def plot(history: list[dict[str, Any]], title: str) -> bytes:
    """A PNG: loss (left) and accuracy (right) per epoch, training and validation."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.2), dpi=100, layout="constrained")
    epochs = [record["epoch"] for record in history]
    for axes, metric, label in zip(figure.subplots(1, 2), ("loss", "accuracy"), ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [record.get(f"{split}_{metric}") for record in history]
            if any(value is not None for value in values):
                axes.plot(
                    epochs, [float("nan") if v is None else v for v in values], style, ms=3, label=split
                )
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        if metric == "accuracy":
            axes.set_ylim(0, 1.02)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_curves(path: Path, history: list[dict[str, Any]], title: str) -> None:
    atomic_write(path, plot(history, title))
