"""Typer commands only: parse options, hand them to the pipeline, map errors to exit codes."""

from __future__ import annotations

import functools
import inspect
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from . import interrupt  # first: Ctrl-C while the libraries below load exits quietly (130)

# isort: split
import typer

from . import __version__
from .clihelp import Group, examples, is_usage_error
from .config import load_config
from .errors import (
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    EnvironmentFailure,
    disk_failure,
    is_out_of_memory,
    worker_failure,
)

# Nothing heavy at module level (torch, numpy, PIL, matplotlib): --help, --version and config errors
# answer at once. Each command imports its own module inside its function (tests/test_startup.py).

app = typer.Typer(
    cls=Group,
    add_completion=True,
    no_args_is_help=True,
    help="Layer-wise Relevance Propagation heatmaps for folders of images.",
)

Inputs = Annotated[
    list[str], typer.Argument(help="Image files, folders (recursive) or - for paths on stdin.")
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file; default: configs/default.yaml")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="efficientnet-lite0, a torchvision or timm name, timm:NAME, or package.module:factory.",
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(metavar="FILE", help="State dict (.pth/.pt/.safetensors) for the model; none: random."),
]
CompositeOpt = Annotated[
    str | None, typer.Option(metavar="NAME", help="Rule preset, e.g. seed, epsilon-plus-flat.")
]
TopkOpt = Annotated[
    float | None, typer.Option(metavar="FRACTION", help="Relevance-filter fraction in (0, 1]; 1 = off.")
]
TargetOpt = Annotated[
    str | None, typer.Option(metavar="CLASS", help="Class index, 'predicted' or 'softmax'.")
]
DeviceOpt = Annotated[str | None, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str | None, typer.Option(metavar="NAME", help="fp32, bf16 or fp16.")]
ResolutionOpt = Annotated[
    int | None, typer.Option(metavar="PIXELS", help="Model input size (square); default: the weights' own.")
]
ResizeOpt = Annotated[
    str | None, typer.Option(metavar="HOW", help="squash (whole photo) or crop (centre square).")
]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", "-b", metavar="N", help="Images per batch.")]
WorkersOpt = Annotated[
    int | None, typer.Option(metavar="N", help="DataLoader worker processes (0 = decode in-process).")
]
ColormapOpt = Annotated[
    str | None, typer.Option(metavar="NAME", help="Matplotlib colormap, or auto (afmhot / bwr).")
]
OverlayFormatOpt = Annotated[
    str | None, typer.Option(metavar="FORMAT", help="Overlay files: jpg (quality 90) or png.")
]
OverlayModeOpt = Annotated[str | None, typer.Option(help="Overlays: blend, mask or contour.")]
PanelOpt = Annotated[
    bool | None, typer.Option("--panel/--no-panel", help="Write NAME.panel.jpg (photo | heatmap | overlay).")
]
ReportOpt = Annotated[
    bool | None,
    typer.Option("--report/--no-report", help="Write report.html (default: for more than one image)."),
]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", metavar="PATH", help="Output folder.")]


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
    """Report ``message`` (one problem per line) on stderr; the caller raises the returned Exit."""
    for line in message.splitlines() or [""]:
        typer.echo(f"lrp-heatmap: error: {line}", err=True)
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
OverlayAlphaOpt = Annotated[
    float | None,
    typer.Option(metavar="ALPHA", help="Strongest blend of the heatmap over the photo, in [0, 1]."),
]
MeanOpt = Annotated[
    str | None,
    typer.Option(metavar="R,G,B", help="Input normalisation mean per channel (default: the weights')."),
]
StdOpt = Annotated[
    str | None,
    typer.Option(metavar="R,G,B", help="Input normalisation std per channel (default: the weights')."),
]
RulesOpt = Annotated[
    str | None,
    typer.Option(metavar="YAML", help="Rule overrides, replacing the config's: '{conv: gamma}'."),
]
PatternsOpt = Annotated[
    str | None,
    typer.Option(metavar="FILE", help="Patterns for patternnet/patternattribution (from `patterns fit`)."),
]
MaxPixelsOpt = Annotated[
    int | None, typer.Option(metavar="N", help="Refuse images with more pixels (decompression bombs).")
]

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
    "overlay_mode": OverlayModeOpt,
    "panel": PanelOpt,
    "report": ReportOpt,
    "output": OutputOpt,
    "save_relevance": SaveRelevanceOpt,
    "renormalize": RenormalizeOpt,
    "overlay_alpha": OverlayAlphaOpt,
    "mean": MeanOpt,
    "std": StdOpt,
    "rules": RulesOpt,
    "patterns": PatternsOpt,
    "max_pixels": MaxPixelsOpt,
}
"""Options every command shares: each overrides the config key of the same name."""
DOCTOR_OPTIONS = (  # what the audit of one random image depends on
    "model", "weights", "mean", "std", "composite", "rules", "target", "precision", "winograd", "resolution",
    "patterns",
)  # fmt: skip
NOT_FOR_SNAPSHOTS = (  # snapshots hold relevance maps: nothing about the files a run writes
    "colormap", "overlay_alpha", "overlay_format", "overlay_mode", "panel", "report", "save_relevance",
)  # fmt: skip


SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Any config key; the value is YAML, nested keys take dots (rules.first=zbox). Repeatable.",
    ),
]


def with_config_options(
    command: Callable[..., None] | None = None,
    *,
    only: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> Any:
    """Give ``command`` the shared config options (those of CONFIG_OPTIONS in ``only``, all by default,
    less ``exclude``), ``--set`` and ``--debug``; it receives the given ones as one ``overrides`` dict.
    Usable bare (``@with_config_options``) or restricted to the options that act on the command
    (``@with_config_options(exclude=("colormap",))``)."""
    if command is None:
        return functools.partial(with_config_options, only=only, exclude=exclude)
    listed = {
        name: annotation
        for name, annotation in CONFIG_OPTIONS.items()
        if (only is None or name in only) and name not in exclude
    }
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "overrides"]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        for name, annotation in listed.items()
    ]
    extra = {"set_values": SetOpt, "debug": DebugOpt}
    extra_parameters = [
        inspect.Parameter("set_values", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SetOpt),
        inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DebugOpt),
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        interrupt.disarm()  # from here on Ctrl-C is a KeyboardInterrupt that the command cleans up after
        debug = kwargs.pop("debug")
        sets = kwargs.pop("set_values") or ()
        given = {name: kwargs.pop(name) for name in listed}
        try:
            from .overrides import command_line_overrides

            command(**kwargs, overrides=command_line_overrides(given, sets))
        except typer.Exit:
            raise
        except KeyboardInterrupt:  # before the first image (model load, tracing): nothing written yet
            typer.echo("lrp-heatmap: interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as error:
            if debug:
                traceback.print_exc()
            if is_usage_error(error):  # how the tool was called: exit 2; the machine's or a bug: exit 3
                raise fail(str(error)) from None
            if isinstance(error, EnvironmentFailure):
                raise fail(str(error), EXIT_ENVIRONMENT) from None
            raise fail(environment_message(error), EXIT_ENVIRONMENT) from None

    wrapper.__signature__ = signature.replace(parameters=[*own, *shared, *extra_parameters])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own} | listed | extra
    return wrapper


@app.command(
    "run",
    epilog=examples(
        "lrp-heatmap run input/ --composite seed --topk 0.05 -o results/",
        "find shots -name '*.jpg' | lrp-heatmap run - --json > records.jsonl",
    ),
)
@with_config_options
def run_command(
    inputs: Inputs,
    config: ConfigOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip inputs the manifest already records as done.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print each manifest record on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    engine: Annotated[
        str | None, typer.Option(help="local, or ray (Ray Data actors, see ray_address).")
    ] = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Explain every image and write heatmaps, overlays and manifest.jsonl to the output folder."""
    overrides = {**(overrides or {}), "engine": engine}  # None keeps the config's
    settings = load_config(config, overrides)  # a config error answers before the engine loads
    from .pipeline import run

    raise typer.Exit(run(settings, inputs, resume=resume, json_output=json_output, quiet=quiet))


@app.command(
    "doctor",
    epilog=examples(
        "lrp-heatmap doctor efficientnet-lite0",
        "lrp-heatmap doctor timm:vit_tiny_patch16_224 --weights none --json > audit.json",
    ),
)
@with_config_options(only=DOCTOR_OPTIONS)
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
    settings = load_config(config, overrides)
    from .doctor import doctor

    code, report = doctor(settings, json_output=json_output)
    typer.echo(report)
    raise typer.Exit(code)


NOT_FOR_VIDEOS = ("overlay_format", "overlay_mode", "panel", "report", "save_relevance", "workers")
"""Frames are decoded by PyAV in the main process and drawn as blended overlays into an mp4."""


@app.command(
    "video",
    epilog=examples(
        "lrp-heatmap video clip.mp4 more/*.mov -o videos/",
        "lrp-heatmap video talks/ --fps 5 --heatmap-video --topk 0.05",
    ),
)
@with_config_options(exclude=NOT_FOR_VIDEOS)
def video_command(
    inputs: Annotated[
        list[str], typer.Argument(help="Video files, animated GIF/WebP, folders, or - for stdin.")
    ],
    config: ConfigOpt = None,
    every: Annotated[int | None, typer.Option(help="Explain every N-th frame only.")] = None,
    fps: Annotated[float | None, typer.Option(help="Explain about F frames per second only.")] = None,
    heatmap_video: Annotated[
        bool, typer.Option("--heatmap-video", help="Also write NAME.heatmap.mp4.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip videos the manifest already records as done.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print each manifest record on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Explain every frame of each video: NAME.overlay.mp4 at the source's size and rate, NAME.frames.jsonl."""
    settings = load_config(config, overrides)
    from .video import VideoOptions, run_videos

    options = VideoOptions(every=every, fps=fps, heatmap_video=heatmap_video)
    raise typer.Exit(
        run_videos(settings, inputs, options, resume=resume, json_output=json_output, quiet=quiet)
    )


@app.command(
    "occlude", epilog=examples("lrp-heatmap occlude input/cat.png --patch 32 --stride 16 -o occlusion/")
)
@with_config_options(exclude=(*NOT_FOR_VIDEOS, "overlay_alpha", "workers"))
def occlude_command(
    inputs: Inputs,
    config: ConfigOpt = None,
    patch: Annotated[int, typer.Option(help="Side of the occluding square, in model-input pixels.")] = 32,
    stride: Annotated[int, typer.Option(help="Step between occluding squares, in pixels.")] = 16,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Occlusion-sensitivity map next to the LRP map, and their correlation, per image (occlusion.jsonl)."""
    settings = load_config(config, overrides)
    from .occlude import run_occlusion

    raise typer.Exit(run_occlusion(settings, inputs, patch, stride, quiet=quiet))


@app.command(
    "evaluate",
    epilog=examples(
        "lrp-heatmap evaluate input/ --composite epsilon-plus-flat,seed --topk 1.0,0.05",
        "lrp-heatmap evaluate photos/ -c configs/default.yaml -c mine.yaml --renormalize both --json",
    ),
)
@with_config_options(
    exclude=("composite", "topk", "renormalize", "colormap", "overlay_format", "save_relevance")
)
def evaluate_command(
    inputs: Inputs,
    config: Annotated[
        list[Path] | None, typer.Option("--config", "-c", help="YAML config; repeat to compare several.")
    ] = None,
    composite: Annotated[str | None, typer.Option(help="Presets to compare: epsilon-plus-flat,seed.")] = None,
    topk: Annotated[str | None, typer.Option(help="Filter fractions to compare: 1.0,0.2,0.05.")] = None,
    renormalize: Annotated[str | None, typer.Option(help="true, false, or both (false,true).")] = None,
    patch_size: Annotated[int, typer.Option(min=1, help="Side of a perturbed patch (Quantus: 8).")] = 8,
    regions: Annotated[int, typer.Option(min=1, help="Patches replaced, one per step (Quantus: 100).")] = 100,
    baseline: Annotated[
        str, typer.Option(help="Replacement: black (input minimum), white, mean or a number.")
    ] = "black",
    eval_batch_size: Annotated[int, typer.Option(min=1, help="Perturbed images per forward pass.")] = 256,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Faithfulness of each setting's heatmaps by region perturbation (MoRF, LeRF, ABPC) with a random
    and a gradient x input reference: table on stderr, evaluation.json/.jsonl/.png/.svg in the output."""
    from .evaluate import run_evaluation

    options = {"composite": composite, "topk": topk, "renormalize": renormalize, "patch_size": patch_size,
               "regions": regions, "baseline": baseline, "eval_batch_size": eval_batch_size}  # fmt: skip
    raise typer.Exit(run_evaluation(inputs, config, overrides or {}, options, json_output=json_output))


HostOpt = Annotated[str, typer.Option(help="Address to listen on (loopback by default: this machine only).")]
PortOpt = Annotated[int, typer.Option(help="TCP port to listen on (0: any free port).")]
NOT_FOR_PAGES = ("batch_size", "workers", "overlay_format", "panel", "report", "output", "save_relevance")
"""serve and live explain one image at a time and write no files."""


@app.command(
    "serve", epilog=examples("lrp-heatmap serve", "lrp-heatmap serve --config configs/vgg16.yaml --port 8080")
)
@with_config_options(exclude=NOT_FOR_PAGES)
def serve_command(
    config: ConfigOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted request, in MiB.")] = 16.0,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Serve the interactive page: drop an image, place patches, switch composites, use the webcam."""
    from .serve import serve

    raise typer.Exit(serve(load_config(config, overrides), host, port, max_upload_mb))


@app.command(
    "live",
    epilog=examples("lrp-heatmap live --camera 0", "lrp-heatmap live --camera clip.mp4 --loop --topk 0.05"),
)
@with_config_options(exclude=NOT_FOR_PAGES)
def live_command(
    camera: Annotated[str, typer.Option(help="Camera index (0: /dev/video0) or a video file.")] = "0",
    config: ConfigOpt = None,
    window: Annotated[
        bool | None,
        typer.Option("--window/--no-window", help="Show a window (default: when a display exists)."),
    ] = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    loop: Annotated[bool, typer.Option(help="Play a video file again and again.")] = False,
    max_frames: Annotated[int | None, typer.Option(help="Stop after this many frames.")] = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Explain a camera's frames live, in a window or streamed to the page; prints the frames/s."""
    from .live import live

    settings = load_config(config, overrides)
    raise typer.Exit(
        live(settings, camera, window=window, host=host, port=port, loop=loop, max_frames=max_frames)
    )


TRAIN_SHARED = ("model", "weights", "device", "precision", "resolution", "resize", "batch_size", "workers")
DataDirArg = Annotated[
    str, typer.Argument(metavar="DATA_DIR", help="One sub-folder of images per class (and val/).")
]
PretrainedOpt = Annotated[
    bool | None, typer.Option("--pretrained/--from-scratch", help="Start from the model's weights or not.")
]
FreezeOpt = Annotated[
    bool | None, typer.Option("--freeze-backbone/--no-freeze-backbone", help="Train the new head only.")
]


@app.command(
    "train",
    epilog=examples(
        "lrp-heatmap train data/ --model resnet18 --epochs 5 -o runs/r18",
        "lrp-heatmap run photos/ --weights runs/r18/best.pt",
    ),
)
@with_config_options(only=(*TRAIN_SHARED, "output", "mean", "std", "max_pixels"))
def train_command(
    data_dir: DataDirArg,
    config: ConfigOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUTPUT/last.pt, as if never stopped.")
    ] = False,
    epochs: Annotated[int | None, typer.Option(help="Epochs to train (train.epochs).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (train.lr).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw, adam or sgd (train.optimizer).")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Held out without a val/ folder.")] = None,
    pretrained: PretrainedOpt = None,
    freeze_backbone: FreezeOpt = None,
    grad_clip: Annotated[float | None, typer.Option(help="Largest gradient norm (train.grad_clip).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of split, order, augmentation (train.seed).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages.")] = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Train or fine-tune a classifier on DATA_DIR/CLASS/ images (the config's train: section), with
    checkpoints, metrics and curves in --output; then explain it: run IMAGES --weights OUTPUT/best.pt."""
    from .training.loop import from_cli

    options = {
        "epochs": epochs, "lr": lr, "optimizer": optimizer, "val_fraction": val_fraction, "seed": seed,
        "pretrained": pretrained, "freeze_backbone": freeze_backbone, "grad_clip": grad_clip,
    }  # fmt: skip
    raise typer.Exit(from_cli(config, data_dir, overrides or {}, options, resume=resume, quiet=quiet))


config_app = typer.Typer(no_args_is_help=True, help="Show the configuration a command would run with.")
app.add_typer(config_app, name="config")


@config_app.command(
    "show",
    epilog=examples(
        "lrp-heatmap config show --config configs/vgg16.yaml --topk 0.1",
        "lrp-heatmap config show --set rules.conv.rule=gamma --set rules.conv.gamma=0.5",
    ),
)
@with_config_options
def config_show(
    config: ConfigOpt = None,
    json_output: Annotated[
        bool, typer.Option("--json", help='Print {"KEY": {"value": ..., "source": ...}} as JSON.')
    ] = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Print the effective config (defaults, then the config file, then the command line) with the
    source of each value; the output is itself a valid config file."""
    from .config import resolve_config
    from .configshow import show

    typer.echo(show(*resolve_config(config, overrides), json_output=json_output))


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


@snapshot_app.command(
    "record",
    epilog=examples("lrp-heatmap snapshot record input/ --to snapshots/"),
)
@with_config_options(exclude=NOT_FOR_SNAPSHOTS)
def snapshot_record(
    inputs: Inputs,
    to: Annotated[Path, typer.Option("--to", help="Snapshot folder to write.")],
    config: ConfigOpt = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Store every image's relevance map (float16, compressed) and the metadata that produced it."""
    settings = load_config(config, overrides)
    from .snapshot import record

    code = record(settings, inputs, to)
    typer.echo(f"lrp-heatmap: snapshot written to {to}", err=True)
    raise typer.Exit(code)


@snapshot_app.command(
    "check",
    epilog=examples(
        "lrp-heatmap snapshot check input/ --against snapshots/ --junit report.xml",
        "lrp-heatmap snapshot check input/ --against snapshots/ --update",
    ),
)
@with_config_options(exclude=NOT_FOR_SNAPSHOTS)
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
    update: Annotated[
        bool, typer.Option("--update", help="Rewrite drifted and added entries (only those); print each.")
    ] = False,
    allow_missing: Annotated[
        bool, typer.Option("--allow-missing", help="Recorded images absent from INPUTS warn, not fail.")
    ] = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Recompute the heatmaps and compare with a snapshot: exit 0 if all pass, 1 on any drift (also a
    recorded image missing from INPUTS, unless --allow-missing). With --update the snapshot is brought
    up to date instead and the exit code is 0."""
    tolerance_options = {
        "min_pearson": min_pearson, "max_diff": max_diff, "max_mean_diff": max_mean_diff,
        "min_iou": min_iou, "mask_fraction": mask_fraction,
    }  # fmt: skip
    settings = load_config(config, {**(overrides or {}), **tolerance_options})
    from .render import atomic_write
    from .snapshot import Tolerances, check, format_table, junit_xml

    diff_dir = Path(settings.output) / "snapshot-diff"
    tolerances = Tolerances(**settings.snapshot)
    if update:
        from .snapshotupdate import check_and_update

        report, changed = check_and_update(
            settings, inputs, against, tolerances, diff_dir, allow_missing=allow_missing
        )
    else:
        report = check(settings, inputs, against, tolerances, diff_dir, allow_missing=allow_missing)
    typer.echo(format_table(report), err=True)
    if update:
        for line in changed or ["snapshot up to date: nothing to rewrite"]:
            typer.echo(f"lrp-heatmap: snapshot {against}: {line}", err=True)
    if json_output:
        document = {
            "passed": report.passed,
            "changes": report.changes,
            "images": [asdict(c) for c in report.comparisons],
        }
        typer.echo(json.dumps(document, indent=2))
    if junit is not None:
        atomic_write(junit, junit_xml(report))
    raise typer.Exit(0 if report.passed or update else 1)


patterns_app = typer.Typer(
    no_args_is_help=True, help="Fit PatternNet/PatternAttribution signal estimators on your images."
)
app.add_typer(patterns_app, name="patterns")
PATTERN_FIT_OPTIONS = (  # what the model sees while its statistics are gathered
    "model", "weights", "mean", "std", "device", "resolution", "resize", "batch_size", "workers",
    "max_pixels",
)  # fmt: skip


@patterns_app.command(
    "fit",
    epilog=examples(
        "lrp-heatmap patterns fit photos/ --model vgg16 -o vgg16.patterns.pt",
        "lrp-heatmap run input/ --model vgg16 --composite patternattribution --patterns vgg16.patterns.pt",
    ),
)
@with_config_options(only=PATTERN_FIT_OPTIONS)
def patterns_fit(
    data_dir: Annotated[
        str, typer.Argument(metavar="DATA_DIR", help="Folder of images (searched recursively).")
    ],
    config: ConfigOpt = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="FILE", help="Patterns file to write.")
    ] = Path("patterns.pt"),
    limit: Annotated[int | None, typer.Option(metavar="N", help="Use the first N images only.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Estimate PatternNet's linear and positive signal estimators for every conv and linear layer
    over the images in DATA_DIR; write them, with the weights' hash, to -o FILE (default patterns.pt).
    Exit 1 when some images could not be read (each reported)."""
    settings = load_config(
        config, {key: value for key, value in (overrides or {}).items() if key != "output"}
    )
    from .patterns import fit_file

    raise typer.Exit(fit_file(settings, data_dir, output, limit=limit, quiet=quiet))


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
