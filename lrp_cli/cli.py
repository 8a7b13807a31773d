"""Typer commands only: parse options, hand them to the pipeline, map errors to exit codes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .config import ConfigError, load_config
from .data import InputError
from .lrp import UnsupportedOperationError
from .models import ModelError
from .pipeline import EXIT_USAGE, RunError, run

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
    str | None, typer.Option(help="efficientnet-lite0, a torchvision name, or package.module:factory.")
]
WeightsOpt = Annotated[str | None, typer.Option(help="Local checkpoint (state dict) for the model.")]
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


def fail(message: str) -> typer.Exit:
    typer.echo(f"lrp-heatmap: error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def overrides(**options: Any) -> dict[str, Any]:
    """Command-line options that were given, as config keys (a numeric --target becomes an int)."""
    given = {key: value for key, value in options.items() if value is not None}
    if isinstance(given.get("target"), str) and given["target"].isdigit():
        given["target"] = int(given["target"])
    return given


@app.command("run")
def run_command(
    inputs: Inputs,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    composite: CompositeOpt = None,
    topk: TopkOpt = None,
    target: TargetOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    resolution: ResolutionOpt = None,
    resize: ResizeOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    colormap: ColormapOpt = None,
    output: OutputOpt = None,
    save_relevance: Annotated[
        bool | None,
        typer.Option("--save-relevance/--no-save-relevance", help="Also write NAME.relevance.npy."),
    ] = None,
    renormalize: Annotated[
        bool | None,
        typer.Option("--renormalize/--no-renormalize", help="Rescale filtered relevance to its total."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Skip inputs the manifest already records as done.")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print each manifest record on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Explain every image and write heatmaps, overlays and manifest.jsonl to the output folder."""
    try:
        settings = load_config(
            config,
            overrides(
                model=model,
                weights=weights,
                composite=composite,
                topk=topk,
                target=target,
                device=device,
                precision=precision,
                resolution=resolution,
                resize=resize,
                batch_size=batch_size,
                workers=workers,
                colormap=colormap,
                output=output,
                save_relevance=save_relevance,
                renormalize=renormalize,
            ),
        )
        code = run(settings, inputs, resume=resume, json_output=json_output, quiet=quiet)
    except (ConfigError, InputError, ModelError, RunError, UnsupportedOperationError) as error:
        raise fail(str(error)) from None
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="lrp-heatmap")


if __name__ == "__main__":
    sys.exit(main())
