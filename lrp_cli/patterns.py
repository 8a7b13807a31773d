"""``lrp-heatmap patterns fit``: PatternNet's signal estimators from a folder of images, and reading the
patterns file that ``run --composite patternnet|patternattribution --patterns FILE`` uses."""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import TextIO

import torch

from .config import Config, ConfigError
from .data import InputError, discover, make_loader
from .errors import EXIT_FAILED_INPUTS, EXIT_OK, RunError
from .lrp.patterns import PatternFitter, Patterns
from .models import LoadedModel, load_model
from .render import atomic_write

PATTERN_COMPOSITES = ("patternnet", "patternattribution")
DEFAULT_FILE = "patterns.pt"


def read_patterns(path: str | Path) -> Patterns:
    """A patterns file, or an error naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"patterns file {path}: {'is a folder' if path.is_dir() else 'no such file'}")
    try:
        return Patterns.load(path)
    except (
        ValueError,
        RuntimeError,
        EOFError,
        OSError,
        pickle.UnpicklingError,
    ) as error:  # torch.load's, ours
        detail = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(
            f"patterns file {path} cannot be used ({detail}); write one with `lrp-heatmap patterns fit`"
        ) from None


def load_patterns(config: Config, loaded: LoadedModel) -> Patterns | None:
    """The patterns the configured composite needs, checked against the loaded model's weights (exit 2
    naming the file and both hashes when they were fitted for other weights)."""
    wants = config.composite in PATTERN_COMPOSITES
    if config.patterns is None:
        if wants:
            raise ConfigError(
                f"composite {config.composite!r} needs --patterns FILE, fitted on this model with "
                "`lrp-heatmap patterns fit DATA_DIR --model ...`"
            )
        return None
    if not wants:
        raise ConfigError(
            f"key 'patterns' = {config.patterns!r} is used only by the composites "
            f"{' and '.join(PATTERN_COMPOSITES)}, not {config.composite!r}"
        )
    patterns = read_patterns(config.patterns)
    if patterns.weights_hash != loaded.weights_hash:
        raise RunError(
            f"patterns file {config.patterns} was fitted for other weights (model {patterns.model or '?'}, "
            f"weights {patterns.weights_hash}) than model {loaded.name!r} has now (weights "
            f"{loaded.weights_hash}); fit them again with `lrp-heatmap patterns fit DATA_DIR --model ...`"
        )
    return patterns


def fit_file(
    config: Config,
    data_dir: str,
    output: Path,
    *,
    limit: int | None = None,
    quiet: bool = False,
    err: TextIO | None = None,
) -> int:
    """Fit the patterns of the configured model over the images under ``data_dir`` and write them to
    ``output`` atomically. Exit 0, or 1 when some images could not be read (each reported)."""
    from .pipeline import image_dataset, input_resolution, resolve_device

    err = err or sys.stderr
    if output.is_dir():
        raise InputError(f"--output {output} is a folder; give the patterns file's name, e.g. {DEFAULT_FILE}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: expected a number of images >= 1")
    items = discover([data_dir])[:limit]
    device = resolve_device(config.device)
    loaded = load_model(config.model, config.weights, config.mean, config.std)
    resolution = input_resolution(config, loaded)
    loaded.module.to(device)
    fitter = PatternFitter(loaded.module, name=loaded.name)
    skipped = [(item, item.error) for item in items if item.error is not None]
    usable = [item for item in items if item.error is None]
    loader = make_loader(
        image_dataset(config, loaded, usable),
        config.batch_size,
        config.workers,
        pin_memory=device.type == "cuda",
    )
    bar = None
    if not quiet and err.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(usable), unit="img", desc="fitting patterns", file=err)
    try:
        for batch in loader:
            skipped += [(usable[i], error) for i, error in batch["failures"]]
            if batch["pixels"] is not None:
                fitter.update(batch["pixels"].to(device, non_blocking=True))
            if bar is not None:
                bar.update(len(batch["indices"]) + len(batch["failures"]))
    finally:
        if bar is not None:
            bar.close()
    for item, error in skipped:
        err.write(f"skipped {item.path}: {error}\n")
    if fitter.images == 0:
        raise InputError(f"{data_dir}: none of its {len(items)} image file(s) could be read; nothing written")
    patterns = fitter.patterns()
    buffer = io.BytesIO()
    torch.save(patterns.state(), buffer)
    atomic_write(output, buffer.getvalue())
    if not quiet:
        err.write(
            f"lrp-heatmap: patterns of {len(patterns.kinds)} layers of {loaded.name} (weights "
            f"{patterns.weights_hash}) fitted on {fitter.images} image(s) at {resolution}x{resolution}, "
            f"written to {output}\n"
        )
    return EXIT_FAILED_INPUTS if skipped else EXIT_OK
