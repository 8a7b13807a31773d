"""What a run tells its user besides the records: the set-up time (once, so that each record's ``ms`` is
the steady per-image time), the final ``--json`` summary, and a resolution the weights were not trained
at."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from .config import Config


class SetupClock:
    """Times the set-up: model load, tracing and the trial batch (the size of the first real one)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ms: float | None = None

    def stop(self) -> float:
        self.ms = (time.perf_counter() - self.started) * 1000.0
        return self.ms


def summary_record(explained: int, failed: int, setup_ms: float | None, manifest: Path) -> dict[str, Any]:
    """The last line of ``--json``: one key, ``summary``, so it is never mistaken for an image record
    (those always have ``path``); it is not written to manifest.jsonl."""
    return {
        "summary": {
            "explained": explained,
            "failed": failed,
            "setup_ms": None if setup_ms is None else round(setup_ms, 1),
            "manifest": str(manifest),
        }
    }


def setup_text(setup_ms: float | None) -> str:
    return "" if setup_ms is None else f"; set-up {setup_ms / 1000.0:.1f} s (model, tracing, warm-up)"


def resolution_notice(
    config: Config, trained: tuple[int, int] | None, model: str, err: TextIO | None = None
) -> None:
    """Warn when ``resolution`` differs from the size the weights were trained at: predictions (and so
    the explained class) can change, as the embedded model's do at 384 (bobsled 0.19 becomes football
    helmet 0.04)."""
    if trained is None or config.resolution is None or config.weights is not None:
        return
    if config.resolution != trained[0]:
        (err or sys.stderr).write(
            f"lrp-heatmap: warning: the weights of {model} were trained at {trained[0]}x{trained[1]}; at "
            f"--resolution {config.resolution} its predictions may change (leave resolution unset to use "
            f"{trained[0]})\n"
        )


def image_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The image records among ``--json`` output lines, without the final summary record."""
    return [record for record in map(json.loads, lines) if "summary" not in record]
