"""``snapshot check --update``: rewrite only what drifted, as pytest-regressions' ``--force-regen`` and
syrupy's ``--snapshot-update`` do. Passing entries keep their files byte for byte; drifted and added
images get their current map; recorded images missing from the inputs are dropped (kept with
``--allow-missing``); the metadata takes the current model hash, settings and versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .data import ImageItem
from .render import atomic_write
from .snapshot import (
    METADATA,
    CheckReport,
    SnapshotError,
    Tolerances,
    _map_name,
    check,
    heatmap_settings,
    load_snapshot,
    versions,
    write_entry,
)


def check_and_update(
    config: Config,
    inputs: list[str],
    directory: Path,
    tolerances: Tolerances,
    diff_dir: Path | None,
    *,
    allow_missing: bool,
) -> tuple[CheckReport, list[str]]:
    """Run the check, then bring the snapshot up to date; (the report, one line per change made)."""
    current: dict[str, tuple[ImageItem, np.ndarray]] = {}

    def collect(name: str, item: ImageItem, heat: np.ndarray) -> None:
        current[name] = (item, heat)

    report = check(
        config, inputs, directory, tolerances, diff_dir, allow_missing=allow_missing, collect=collect
    )
    document = load_snapshot(directory)
    if any(change.startswith("model changed") for change in report.changes):
        raise SnapshotError(
            f"{directory}: {report.changes[0]}; --update rewrites entries of the same model only: "
            "record the snapshot again with 'lrp-heatmap snapshot record'"
        )
    changed: list[str] = []
    images: dict[str, Any] = document["images"]
    for comparison in report.comparisons:
        name = comparison.name
        if name in current:
            item, heat = current[name]
            images[name] = write_entry(directory, name, item, heat)
            what = "added" if comparison.status == "added" else "updated"
            changed.append(
                f"{what} {name}" + (f" ({'; '.join(comparison.reasons)})" if what == "updated" else "")
            )
        elif comparison.status == "missing" and not allow_missing:
            del images[name]
            (directory / _map_name(name)).unlink(missing_ok=True)
            changed.append(f"removed {name} (recorded but not among the inputs)")
    changed += [f"metadata: {change}" for change in report.changes]
    if not changed:
        return report, []
    document.update(
        weights_sha256=report.weights_sha256 or document["weights_sha256"],
        settings=heatmap_settings(config),
        versions=versions(),
        images=dict(sorted(images.items())),
    )
    atomic_write(directory / METADATA, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    return report, changed
