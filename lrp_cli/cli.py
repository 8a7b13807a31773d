"""Typer commands only: parse options, hand them to the pipeline, map errors to exit codes."""

from __future__ import annotations

import functools
import inspect
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from . import interrupt  # first: Ctrl-C while the libraries below load exits quietly (130)

# isort: split
import typer

from . import __version__
from .config import ConfigError, load_config
from .data import InputError
from .doctor import doctor
from .errors import (
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    EnvironmentFailure,
    RunError,
    disk_failure,
    is_out_of_memory,
    worker_failure,
)
from .lrp import UnsupportedOperationError
from .models import ModelError
from .pipeline import run
from .render import atomic_write
from .snapshot import SnapshotError, Tolerances, check, format_table, junit_xml, record

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Layer-wise Relevance Propagation heatmaps for folders of images.",
)

Inputs = Annotated[
    list[str], typer.Argument(help="Image files, folders (recursive) or - for paths on stdin.")
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: configs/default.yaml).")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="efficientnet-lite0, a torchvision or timm name, timm:NAME, or package.module:factory."
    ),
]
WeightsOpt = Annotated[
    str | None, typer.Option(help="Local state dict for the model: .pth/.pt or .safetensors.")
]
CompositeOpt = Annotated[str | None, typer.Option(help="Rule preset, e.g. seed, epsilon-plus-flat.")]
TopkOpt = Annotated[float | None, typer.Option(help="Relevance-filter fraction in (0, 1]; 1 = off.")]
TargetOpt = Annotated[str | None, typer.Option(help="Class index, 'predicted' or 'softmax'.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str | None, typer.Option(help="fp32, bf16 or fp16.")]
ResolutionOpt = Annotated[int | None, typer.Option(help="Model input size in pixels (square).")]
ResizeOpt = Annotated[str | None, typer.Option(help="squash (whole photo) or crop (centre square).")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per batch.")]
WorkersOpt = Annotated[int | None, typer.Option(help="DataLoader worker processes (0 = decode in-process).")]
ColormapOpt = Annotated[str | None, typer.Option(help="Matplotlib colormap, or auto (afmhot / bwr).")]
OverlayFormatOpt = Annotated[str | None, typer.Option(help="Overlay files: jpg (quality 90) or png.")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Output folder.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lrp-heatmap {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Layer-wise Relevance Propagation heatmaps for folders of images."""


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    typer.echo(f"lrp-heatmap: error: {message}", err=True)
    return typer.Exit(code)


def environment_message(error: Exception) -> str:
    """One line for an error no check caught: the machine's (memory, disk) or an internal one."""
    if is_out_of_memory(error):
        return f"out of memory ({str(error).splitlines()[0][:200]}); lower --batch-size or --resolution"
    failure = worker_failure(error) or disk_failure(error, getattr(error, "filename", None) or "a file")
    if failure is not None:
        return str(failure)
    detail = (str(error).splitlines() or ["(no message)"])[0]
    return (
        f"internal error: {type(error).__name__}: {detail}; "
        "run again with --debug for the traceback and please report it"
    )


DebugOpt = Annotated[bool, typer.Option("--debug", help="On an error, also print the full traceback.")]


SaveRelevanceOpt = Annotated[
    bool | None, typer.Option("--save-relevance/--no-save-relevance", help="Also write NAME.relevance.npy.")
]
WinogradOpt = Annotated[
    bool | None,
    typer.Option("--winograd/--no-winograd", help="Winograd for wide 3x3 convolutions on the CPU."),
]
RenormalizeOpt = Annotated[
    bool | None,
    typer.Option("--renormalize/--no-renormalize", help="Rescale filtered relevance to its total."),
]
USAGE_ERRORS = (ConfigError, InputError, ModelError, RunError, SnapshotError, UnsupportedOperationError)
"""Errors of how the tool was called (exit code 2); EnvironmentFailure and anything else exit 3."""

CONFIG_OPTIONS: dict[str, Any] = {
    "model": ModelOpt,
    "weights": WeightsOpt,
    "composite": CompositeOpt,
    "topk": TopkOpt,
    "target": TargetOpt,
    "device": DeviceOpt,
    "precision": PrecisionOpt,
    "winograd": WinogradOpt,
    "resolution": ResolutionOpt,
    "resize": ResizeOpt,
    "batch_size": BatchOpt,
    "workers": WorkersOpt,
    "colormap": ColormapOpt,
    "overlay_format": OverlayFormatOpt,
    "output": OutputOpt,
    "save_relevance": SaveRelevanceOpt,
    "renormalize": RenormalizeOpt,
}
"""Options every command shares: each overrides the config key of the same name."""


def with_config_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` the shared config options; it receives them as one ``overrides`` dict."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "overrides"]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        for name, annotation in CONFIG_OPTIONS.items()
    ]
    debug_option = inspect.Parameter(
        "debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DebugOpt
    )

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        interrupt.disarm()  # from here on Ctrl-C is a KeyboardInterrupt that the command cleans up after
        debug = kwargs.pop("debug")
        given = {name: kwargs.pop(name) for name in CONFIG_OPTIONS}
        given = {key: value for key, value in given.items() if value is not None}
        if isinstance(given.get("target"), str) and given["target"].isdigit():
            given["target"] = int(given["target"])
        try:
            command(**kwargs, overrides=given)
        except typer.Exit:
            raise
        except KeyboardInterrupt:  # before the first image (model load, tracing): nothing written yet
            typer.echo("lrp-heatmap: interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as error:
            if debug:
                traceback.print_exc()
            if isinstance(error, USAGE_ERRORS):
                raise fail(str(error)) from None
            if isinstance(error, EnvironmentFailure):
                raise fail(str(error), EXIT_ENVIRONMENT) from None
            raise fail(environment_message(error), EXIT_ENVIRONMENT) from None

    wrapper.__signature__ = signature.replace(parameters=[*own, *shared, debug_option])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own} | CONFIG_OPTIONS | {"debug": DebugOpt}
    return wrapper


@app.command("run")
@with_config_options
def run_command(
    inputs: Inputs,
    config: ConfigOpt = None,
    resume: Annotated[bool, typer.Option(help="Skip inputs the manifest already records as done.")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print each manifest record on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Explain every image and write heatmaps, overlays and manifest.jsonl to the output folder."""
    settings = load_config(config, overrides)
    raise typer.Exit(run(settings, inputs, resume=resume, json_output=json_output, quiet=quiet))


@app.command("doctor")
@with_config_options
def doctor_command(
    model_name: Annotated[
        str | None, typer.Argument(metavar="MODEL", help="Model to audit (default: the config's model).")
    ] = None,
    config: ConfigOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the audit as JSON.")] = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """List the model's operations and rules, every operation without a rule, and where relevance is
    absorbed or created on a random image. Exit 0 when all is accounted for, 1 otherwise."""
    if model_name is not None:
        overrides = {**(overrides or {}), "model": model_name}
    code, report = doctor(load_config(config, overrides), json_output=json_output)
    typer.echo(report)
    raise typer.Exit(code)


snapshot_app = typer.Typer(
    no_args_is_help=True, help="Record heatmap snapshots and check for drift (for CI)."
)
app.add_typer(snapshot_app, name="snapshot")

MinPearsonOpt = Annotated[float | None, typer.Option(help="Fail below this Pearson r (default 0.98).")]
MaxDiffOpt = Annotated[float | None, typer.Option(help="Fail above this max |diff| / max |recorded| (0.5).")]
MaxMeanDiffOpt = Annotated[
    float | None, typer.Option(help="Fail above this mean |diff| / max |recorded| (0.03).")
]
MinIouOpt = Annotated[float | None, typer.Option(help="Fail below this IoU of the top-fraction masks (0.7).")]
MaskFractionOpt = Annotated[float | None, typer.Option(help="Fraction of pixels in the IoU masks (0.05).")]


@snapshot_app.command("record")
@with_config_options
def snapshot_record(
    inputs: Inputs,
    to: Annotated[Path, typer.Option("--to", help="Snapshot folder to write.")],
    config: ConfigOpt = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Store every image's relevance map (float16, compressed) and the metadata that produced it."""
    settings = load_config(config, overrides)
    code = record(settings, inputs, to)
    typer.echo(f"lrp-heatmap: snapshot written to {to}", err=True)
    raise typer.Exit(code)


@snapshot_app.command("check")
@with_config_options
def snapshot_check(
    inputs: Inputs,
    against: Annotated[Path, typer.Option("--against", help="Snapshot folder to compare with.")],
    config: ConfigOpt = None,
    min_pearson: MinPearsonOpt = None,
    max_diff: MaxDiffOpt = None,
    max_mean_diff: MaxMeanDiffOpt = None,
    min_iou: MinIouOpt = None,
    mask_fraction: MaskFractionOpt = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the comparison as JSON on stdout.")
    ] = False,
    junit: Annotated[Path | None, typer.Option(help="Also write a JUnit XML report to this file.")] = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Recompute the heatmaps and compare with a snapshot: exit 0 if all pass, 1 on any drift."""
    tolerance_options = {
        "min_pearson": min_pearson, "max_diff": max_diff, "max_mean_diff": max_mean_diff,
        "min_iou": min_iou, "mask_fraction": mask_fraction,
    }  # fmt: skip
    settings = load_config(config, {**(overrides or {}), **tolerance_options})
    diff_dir = Path(settings.output) / "snapshot-diff"
    report = check(settings, inputs, against, Tolerances(**settings.snapshot), diff_dir)
    typer.echo(format_table(report), err=True)
    if json_output:
        document = {
            "passed": report.passed,
            "changes": report.changes,
            "images": [asdict(c) for c in report.comparisons],
        }
        typer.echo(json.dumps(document, indent=2))
    if junit is not None:
        atomic_write(junit, junit_xml(report))
    raise typer.Exit(0 if report.passed else 1)


interrupt.disarm()  # importing the CLI leaves Ctrl-C alone; main() arms the early exit again


def main() -> None:
    """Console-script entry point."""
    interrupt.arm()  # until a command starts (see lrp_cli.interrupt)
    try:
        app(prog_name="lrp-heatmap", standalone_mode=True)
    except RuntimeError as error:  # torch reports a dead DataLoader worker from a signal handler, late
        failure = worker_failure(error)
        if failure is None:
            raise
        typer.echo(f"lrp-heatmap: error: {failure}", err=True)
        sys.exit(EXIT_ENVIRONMENT)


if __name__ == "__main__":
    sys.exit(main())
