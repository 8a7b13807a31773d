"""The job behind ``lrp-heatmap evaluate``: which setting's heatmaps are faithful to the model?

Every setting (a cross product of composites, top-k fractions and renormalisation, for each config file)
explains the same images; a random map and gradient x input are scored alongside as reference rows.
Each map is scored by region perturbation (:mod:`lrp_cli.faithfulness`) in both orders, and the area
between the curves (ABPC) is reported per setting with its mean and 95% confidence interval.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from .config import Config, ConfigError, load_config, merge
from .data import ImageItem, discover, make_loader
from .errors import EXIT_FAILED_INPUTS, EXIT_OK, RunError
from .faithfulness import BASELINES, ORDERS, Curves, RegionPerturbation, region_perturbation
from .lrp import Explainer
from .models import LoadedModel, load_model
from .pipeline import image_dataset, prepare_engine
from .render import atomic_write

FILES = {"summary": "evaluation.json", "records": "evaluation.jsonl", "png": "evaluation.png",
         "svg": "evaluation.svg"}  # fmt: skip
SHARED_KEYS = ("model", "weights", "mean", "std", "resolution", "resize", "target", "device", "max_pixels")
"""Keys every compared setting must agree on: the same images, model and explained class."""
RANDOM, GRADIENT = "random", "gradient x input"
IMAGES_PER_PASS = 64
"""Images whose perturbations are generated and scored together (bounds the bookkeeping's memory)."""
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass
class Setting:
    """One row of the comparison: its label and the config that explains with it (None: a baseline)."""

    label: str
    config: Config | None
    source: Path | None = None  # the config file, named in the label when several are compared


def split_list(text: str | None, key: str) -> list[str] | None:
    if text is None:
        return None
    values = [part.strip() for part in text.split(",")]
    if not all(values):
        raise ConfigError(f"command line: --{key} {text!r} has an empty entry; give a comma-separated list")
    return values


def parse_topks(text: str | None) -> list[float] | None:
    values = split_list(text, "topk")
    if values is None:
        return None
    try:
        return [float(value) for value in values]
    except ValueError:
        raise ConfigError(
            f"command line: --topk {text!r} is invalid; expected numbers in (0, 1], e.g. 1.0,0.2,0.05"
        ) from None


def parse_renormalize(text: str | None) -> list[bool] | None:
    values = split_list(text, "renormalize")
    if values is None:
        return None
    if values == ["both"]:
        return [False, True]
    parsed = []
    for value in values:
        if value.lower() not in TRUE_WORDS + FALSE_WORDS:
            raise ConfigError(
                f"command line: --renormalize {value!r} is invalid; expected true, false, a list of them "
                "(false,true) or both"
            )
        parsed.append(value.lower() in TRUE_WORDS)
    return parsed


def expand_settings(
    configs: Sequence[Path] | None,
    overrides: dict[str, Any],
    composites: list[str] | None,
    topks: list[float] | None,
    renormalize: list[bool] | None,
) -> list[Setting]:
    """The cross product of config files x composites x top-k x renormalise, each validated like a config
    key. Renormalising does nothing without a filter (top-k 1), so that duplicate is dropped."""
    sources: list[Path | None] = list(configs) if configs else [None]
    settings: list[Setting] = []
    for source in sources:
        base = load_config(source, overrides)
        for composite in composites or [base.composite]:
            for topk in topks or [base.topk]:
                for renorm in renormalize or [base.renormalize]:
                    if renorm and topk == 1.0 and renormalize and False in renormalize:
                        continue
                    config = merge(base, {"composite": composite, "topk": topk, "renormalize": renorm},
                                   "command line")  # fmt: skip
                    named = source if len(sources) > 1 else None
                    settings.append(Setting(_label(config, named), config, named))
    first = settings[0].config
    for setting in settings[1:]:
        for key in SHARED_KEYS:
            if getattr(setting.config, key) != getattr(first, key):
                raise ConfigError(
                    f"settings to compare must share {key!r}: {settings[0].label} has "
                    f"{getattr(first, key)!r}, {setting.label} has {getattr(setting.config, key)!r}"
                )
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"the settings to compare repeat themselves: {', '.join(labels)}")
    return settings


def _label(config: Config, source: Path | None) -> str:
    parts = [config.composite]
    if config.topk < 1.0:
        parts.append(f"topk {config.topk:g}" + (" renorm" if config.renormalize else ""))
    if config.rules:
        parts.append("+rules")
    return (f"{source.stem}: " if source is not None else "") + " ".join(parts)


def load_images(
    config: Config, items: Sequence[ImageItem], loaded: LoadedModel, err: TextIO
) -> tuple[list[ImageItem], torch.Tensor, int]:
    """Decode every input once (DataLoader workers): the usable items, their model inputs, and how many
    inputs failed (each reported on stderr)."""
    failed = 0
    for item in items:
        if item.error is not None:
            failed += 1
            err.write(f"lrp-heatmap: skipped {item.path}: {item.error}\n")
    usable = [item for item in items if item.error is None]
    dataset = image_dataset(config, loaded, usable)
    kept: list[int] = []
    pixels: list[torch.Tensor] = []
    for batch in make_loader(dataset, config.batch_size, config.workers, pin_memory=False):
        for index, error in batch["failures"]:
            failed += 1
            err.write(f"lrp-heatmap: skipped {usable[index].path}: {error}\n")
        if batch["pixels"] is not None:
            kept += batch["indices"]
            pixels.append(batch["pixels"])
    if not pixels:
        raise RunError("no input could be decoded; nothing to evaluate")
    return [usable[i] for i in kept], torch.cat(pixels), failed


def lrp_maps(
    config: Config, loaded: LoadedModel, x: torch.Tensor, engine: tuple[torch.device, Explainer] | None = None
) -> tuple[np.ndarray, torch.Tensor]:
    """(N, H, W) relevance maps (summed over colour channels) of one setting and the explained classes
    (-1 where the start spans all classes); ``engine`` from :func:`prepare_engine` if already built."""
    device, explainer = engine or prepare_engine(config, loaded)
    maps, targets = [], []
    for chunk in x.split(config.batch_size):
        result = explainer(chunk.to(device), config.target)
        maps.append(result.relevance.float().sum(dim=1).cpu().numpy())
        targets.append(result.targets.cpu())
    return np.concatenate(maps), torch.cat(targets)


def gradient_times_input(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """(N, H, W) gradient of the explained logit with respect to the input, times the input, summed over
    colour channels."""
    maps = []
    for chunk, target in zip(x.split(16), targets.split(16), strict=True):
        chunk = chunk.clone().requires_grad_(True)
        with torch.enable_grad():
            logit = model(chunk).gather(1, target[:, None]).sum()
            (gradient,) = torch.autograd.grad(logit, chunk)
        maps.append((gradient * chunk).detach().sum(dim=1).cpu().numpy())
    return np.concatenate(maps)


def confidence_interval(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and half-width of the 95% t-interval (half-width NaN for a single value)."""
    from scipy import stats

    count = values.shape[axis]
    mean = values.mean(axis=axis)
    if count < 2:
        return mean, np.full_like(mean, np.nan)
    sem = values.std(axis=axis, ddof=1) / math.sqrt(count)
    return mean, sem * stats.t.ppf(0.975, count - 1)


def evaluate(
    settings: list[Setting],
    inputs: Sequence[str],
    perturbation: RegionPerturbation,
    *,
    eval_batch_size: int = 256,
    json_output: bool = False,
    stdin: Iterable[str] | None = None,
    err: TextIO | None = None,
) -> int:
    """Explain, score and report; returns the exit code (1 when some inputs could not be read)."""
    err = err or sys.stderr
    config = settings[0].config
    assert config is not None
    out_dir = Path(config.output).absolute()
    items = discover(inputs, stdin, exclude=out_dir)
    check_output_folder(out_dir)  # before the model loads: nothing is computed for an unwritable folder
    loaded = load_model(config.model, config.weights, config.mean, config.std)
    engine = prepare_engine(config, loaded)  # resolution, device, model on it; bad rules or target stop here
    device = engine[0]
    items, x, failed = load_images(config, items, loaded, err)
    x = x.to(device)
    maps, explained = [], None
    for index, setting in enumerate(settings):
        assert setting.config is not None
        if setting.config.resolution is None:
            setting.config.resolution = config.resolution
        setting_maps, targets = lrp_maps(setting.config, loaded, x, engine if index == 0 else None)
        setting.label = _label(setting.config, setting.source)  # composite "auto" resolved
        maps.append(setting_maps)
        explained = targets if explained is None else explained
    model = loaded.module.eval()
    with torch.inference_mode():
        top = torch.cat([model(chunk).argmax(dim=1) for chunk in x.split(eval_batch_size)])
    targets = torch.where(explained.to(device) >= 0, explained.to(device), top)
    maps.append(np.random.default_rng(0).uniform(size=maps[0].shape).astype(np.float32))
    maps.append(gradient_times_input(model, x, targets))
    rows = [*settings, Setting(RANDOM, None), Setting(GRADIENT, None)]
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    bar = None
    if err.isatty() and not json_output:
        from tqdm import tqdm

        bar = tqdm(unit="img", desc="perturbed images", file=err)

    stacked = np.stack(maps)  # (S, N, H, W) float32
    parts: list[Curves] = []
    try:
        for start in range(0, len(x), IMAGES_PER_PASS):  # no image shares perturbed images with another
            part = slice(start, start + IMAGES_PER_PASS)

            def progress(done: int, total: int, first: int = start) -> None:
                if bar is not None:
                    bar.set_postfix_str(
                        f"images {first + 1}-{min(first + IMAGES_PER_PASS, len(x))} of {len(x)}"
                    )
                    bar.total = total
                    bar.update(done - bar.n)

            if bar is not None:
                bar.reset()
            parts.append(
                region_perturbation(model, x[part], stacked[:, part], targets[part], perturbation, ORDERS,
                                    eval_batch_size, progress=progress)
            )  # fmt: skip
        curves = join_curves(parts)
    finally:
        if bar is not None:
            bar.close()
    summary = summarise(rows, curves, perturbation, len(items), failed)
    summary["model"], summary["forwards"] = loaded.name, curves.forwards
    records = list(image_records(rows, items, curves, targets, loaded))
    write_outputs(out_dir, summary, records)
    err.write(format_table(summary) + "\n")
    err.write(f"lrp-heatmap: {len(items)} image(s), {curves.forwards} images scored; wrote "
              f"{', '.join(str(out_dir / name) for name in FILES.values())}\n")  # fmt: skip
    if json_output:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return EXIT_FAILED_INPUTS if failed else EXIT_OK


def join_curves(parts: list[Curves]) -> Curves:
    """Curves of consecutive image chunks as one (images along axis 1 of the drops)."""
    return Curves(
        np.concatenate([p.original for p in parts]),
        {order: np.concatenate([p.drops[order] for p in parts], axis=1) for order in ORDERS},
        sum(p.forwards for p in parts),
    )


def check_output_folder(out_dir: Path) -> None:
    """The output folder exists (made if needed) and is writable, or RunError (exit 2)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"output folder {out_dir} is a file; choose another --output")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create output folder {out_dir}: {error.strerror or error}") from None
    if not os.access(out_dir, os.W_OK):
        raise RunError(f"cannot write to output folder {out_dir}: permission denied")


def summarise(
    rows: list[Setting], curves: Curves, perturbation: RegionPerturbation, images: int, failed: int
) -> dict[str, Any]:
    """The document behind the table, ``--json`` and the plot: per row the score means and intervals
    and the mean curves with their interval bands."""
    abpc, morf, lerf = curves.abpc(), curves.aopc("morf"), curves.aopc("lerf")
    entries = []
    for index, row in enumerate(rows):
        entry: dict[str, Any] = {"setting": row.label, "baseline": row.config is None}
        if row.config is not None:
            entry |= {"composite": row.config.composite, "topk": row.config.topk,
                      "renormalize": row.config.renormalize, "rules": row.config.rules}  # fmt: skip
        for name, values in (("abpc", abpc), ("aopc_morf", morf), ("aopc_lerf", lerf)):
            mean, half = confidence_interval(values[index])
            entry[name] = {"mean": float(mean), "ci95": [float(mean - half), float(mean + half)]}
        for order in ORDERS:
            mean, half = confidence_interval(curves.drops[order][index])
            entry[f"curve_{order}"] = {"mean": mean.tolist(), "ci95_half_width": half.tolist()}
        entries.append(entry)
    return {
        "metric": "region perturbation (Samek et al. 2016), Quantus 0.6 conventions",
        "patch_size": perturbation.patch_size,
        "regions": curves.drops["morf"].shape[-1],
        "baseline": perturbation.baseline,
        "score": "softmax probability of the explained class" if perturbation.softmax else "logit",
        "images": images,
        "failed": failed,
        "settings": entries,
    }


def image_records(
    rows: list[Setting], items: list[ImageItem], curves: Curves, targets: torch.Tensor, loaded: LoadedModel
) -> Iterable[dict[str, Any]]:
    abpc, morf, lerf = curves.abpc(), curves.aopc("morf"), curves.aopc("lerf")
    for index, row in enumerate(rows):
        for n, item in enumerate(items):
            target = int(targets[n])
            yield {
                "path": str(item.path), "name": str(item.relative), "setting": row.label,
                "class_index": target, "label": loaded.label(target), "probability": float(curves.original[n]),
                "abpc": float(abpc[index, n]), "aopc_morf": float(morf[index, n]),
                "aopc_lerf": float(lerf[index, n]),
                "curve_morf": curves.drops["morf"][index, n].tolist(),
                "curve_lerf": curves.drops["lerf"][index, n].tolist(),
            }  # fmt: skip


def format_table(summary: dict[str, Any]) -> str:
    """Rows sorted by ABPC, best first."""
    entries = sorted(summary["settings"], key=lambda e: -e["abpc"]["mean"])
    width = max(len("setting"), *(len(e["setting"]) for e in entries))
    lines = [
        f"region perturbation: {summary['images']} image(s), {summary['regions']} patches of "
        f"{summary['patch_size']}x{summary['patch_size']} px, baseline {summary['baseline']}",
        f"{'setting':<{width}}  {'ABPC':>7}  {'95% CI':<17}  {'AOPC MoRF':>9}  {'AOPC LeRF':>9}",
    ]
    for entry in entries:
        low, high = entry["abpc"]["ci95"]
        interval = f"[{low:.3f}, {high:.3f}]" if math.isfinite(low) else "-"
        lines.append(
            f"{entry['setting']:<{width}}  {entry['abpc']['mean']:>7.3f}  {interval:<17}  "
            f"{entry['aopc_morf']['mean']:>9.3f}  {entry['aopc_lerf']['mean']:>9.3f}"
        )
    return "\n".join(lines)


def write_outputs(out_dir: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    atomic_write(out_dir / FILES["summary"], (json.dumps(summary, indent=2) + "\n").encode())
    lines = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(out_dir / FILES["records"], lines.encode())
    png, svg = plot(summary)
    atomic_write(out_dir / FILES["png"], png)
    atomic_write(out_dir / FILES["svg"], svg)


def plot(summary: dict[str, Any]) -> tuple[bytes, bytes]:
    """MoRF and LeRF curves side by side, one line per setting with its 95% band: PNG and SVG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    entries = summary["settings"]
    columns = 3 if len(entries) > 6 else 2
    legend_height = 0.17 * math.ceil(len(entries) / columns) + 0.35  # inches
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.4 + legend_height), sharey=True)
    colours = plt.get_cmap("tab20" if len(entries) > 10 else "tab10")
    for index, entry in enumerate(entries):
        colour = colours(index % colours.N)
        style = "--" if entry["baseline"] else "-"
        for axis, order in zip(axes, ORDERS, strict=True):
            mean = np.concatenate([[0.0], entry[f"curve_{order}"]["mean"]])
            half = np.nan_to_num(np.concatenate([[0.0], entry[f"curve_{order}"]["ci95_half_width"]]))
            steps = np.arange(len(mean))
            label = f"{entry['setting']} (ABPC {entry['abpc']['mean']:.3f})" if order == "morf" else None
            axis.plot(steps, mean, style, color=colour, linewidth=1.4, label=label)
            axis.fill_between(steps, mean - half, mean + half, color=colour, alpha=0.1, linewidth=0)
    for axis, title in zip(axes, ("most relevant first (MoRF)", "least relevant first (LeRF)"), strict=True):
        axis.set_title(title)
        axis.set_xlabel(f"patches of {summary['patch_size']}x{summary['patch_size']} px replaced")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("drop of the explained class' probability")
    figure.legend(loc="lower center", ncol=columns, fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, legend_height / (4.4 + legend_height), 1, 1))
    images = []
    for kind in ("png", "svg"):
        buffer = io.BytesIO()
        metadata = {"Date": None} if kind == "svg" else {}
        matplotlib.rcParams["svg.hashsalt"] = "lrp-heatmap"
        figure.savefig(buffer, format=kind, dpi=110, metadata=metadata)
        images.append(buffer.getvalue())
    plt.close(figure)
    return images[0], images[1]


def run_evaluation(
    inputs: Sequence[str],
    configs: Sequence[Path] | None,
    overrides: dict[str, Any],
    options: dict[str, Any],
    *,
    json_output: bool = False,
) -> int:
    """The command: settings from the options, then :func:`evaluate`."""
    baseline: str | float = options["baseline"]
    if baseline not in BASELINES:
        try:
            baseline = float(baseline)
        except ValueError:
            raise ConfigError(
                f"command line: --baseline {baseline!r} is invalid; expected black, white, mean or a number"
            ) from None
    perturbation = RegionPerturbation(options["patch_size"], options["regions"], baseline)
    composites = split_list(options["composite"], "composite")
    settings = expand_settings(
        configs,
        overrides,
        composites,
        parse_topks(options["topk"]),
        parse_renormalize(options["renormalize"]),
    )
    return evaluate(settings, inputs, perturbation, eval_batch_size=options["eval_batch_size"],
                    json_output=json_output)  # fmt: skip
