"""A pytest helper for users' own suites: fail when a model's heatmaps drift from a recorded snapshot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import load_config
from .snapshot import Tolerances, check, format_table


def assert_heatmaps_match(
    inputs: Sequence[str | Path],
    snapshot: str | Path,
    *,
    config: str | Path | None = None,
    diff_dir: str | Path | None = None,
    **overrides: Any,
) -> None:
    """Recompute the heatmaps of ``inputs`` and compare them with ``snapshot`` (made by
    ``lrp-heatmap snapshot record``); raise AssertionError with the report table on any drift.

    ``overrides`` are config keys (``topk=0.05``, ``device="cuda"``) or tolerances (``min_pearson=0.99``).
    """
    settings = load_config(config, overrides)
    report = check(
        settings,
        [str(path) for path in inputs],
        Path(snapshot),
        Tolerances(**settings.snapshot),
        Path(diff_dir) if diff_dir is not None else None,
    )
    if not report.passed:
        raise AssertionError("heatmaps drifted from the snapshot:\n" + format_table(report))
