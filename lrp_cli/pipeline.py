"""The batch job behind ``lrp-heatmap run``: discover, decode, explain, render, record.

Everything that can refuse the run (inputs, output folder, lock, model, rules, target) is checked before
the manifest is touched; afterwards every record is whole and every output file complete, however the
run ends (Ctrl-C, a closed stdout, a full disk, out of memory).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from .config import Config
from .data import ImageDataset, ImageItem, discover, make_loader
from .distributed import Job, RankShare, adopt_rank_manifests, run_job
from .errors import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED_INPUTS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EnvironmentFailure,
    RunError,
    is_out_of_memory,
    worker_failure,
)
from .lock import FolderLock
from .lrp import Explainer, retain_freed_memory
from .manifest import MANIFEST, ManifestState, ManifestWriter, read_manifest
from .models import LoadedModel, load_model
from .outputs import Prediction, check_inputs_kept, failure_record, render_outputs, take_over_folder
from .runinfo import SetupClock, resolution_notice, setup_text, summary_record


def _finished(record: dict[str, Any]) -> Future:
    """A record that needs no writing, queued among the rendering futures to keep the input order."""
    future: Future = Future()
    future.set_result(record)
    return future


class StdoutClosed(Exception):
    """The reader of ``--json`` records went away (``| head``)."""


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunError(
                f"device {requested!r} asked for, but CUDA is not available here; use --device cpu"
            )
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise RunError(f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device(requested)


DEFAULT_RESOLUTION = 224
"""Input size for models that do not say what they were trained at."""


def input_resolution(config: Config, loaded: LoadedModel) -> int:
    """The configured input size, or else the model's own (DEFAULT_RESOLUTION where it names none)."""
    if config.resolution is not None:
        return config.resolution
    return loaded.input_size[0] if loaded.input_size else DEFAULT_RESOLUTION


def image_dataset(config: Config, loaded: LoadedModel, items: Sequence[ImageItem]) -> ImageDataset:
    """``items`` decoded as the model expects them: its input size, normalisation and resampling."""
    return ImageDataset(
        items,
        input_resolution(config, loaded),
        config.resize,
        loaded.mean,
        loaded.std,
        config.max_pixels,
        loaded.interpolation or "bicubic",
    )


def prepare_engine(
    config: Config, loaded: LoadedModel, trial_batch: int = 1
) -> tuple[torch.device, Explainer]:
    """The configured device, with the model on it, and the engine as the config describes it
    (composite preset plus rule overrides), tried once on a blank batch so that a rule, a target or an
    operation the model cannot take stops the run here, before any file is written.

    A run makes the trial batch as large as its first batch will be: the one-off costs of that shape
    (kernel selection, cuDNN autotuning, first touch of its buffers) are then set-up, so each record's
    ``ms`` is the steady per-image time, at the price of one blank batch instead of one blank image."""
    resolution_notice(config, loaded.input_size, loaded.name)  # asked for a size the weights do not know
    config.resolution = input_resolution(config, loaded)  # manifests and snapshots record the size used
    device = resolve_device(config.device)
    retain_freed_memory()  # batch after batch reuses the same large buffers instead of page-faulting them
    loaded.module.to(device)
    from .patterns import load_patterns

    patterns = load_patterns(config, loaded)  # for patternnet/patternattribution, checked against the weights
    try:
        explainer = Explainer(
            loaded.module,
            config.composite,
            config.topk,
            rules=config.rules,
            patterns=patterns,
            renormalize=config.renormalize,
            precision=config.precision,  # type: ignore[arg-type]
            winograd=config.winograd,
            mean=loaded.mean,
            std=loaded.std,
        )
    except (ValueError, KeyError) as error:
        raise RunError(f"the rules do not fit model {loaded.name!r}: {error}") from None
    config.composite = explainer.composite.name  # "auto" resolved: manifests and snapshots name the preset
    for size in dict.fromkeys((trial_batch, 1)):  # a batch too large for memory is the run's to halve
        blank = torch.zeros(size, 3, config.resolution, config.resolution, device=device)
        try:
            explainer(blank, config.target)
            break
        except ValueError as error:  # e.g. a target class the model does not have
            raise RunError(f"cannot explain with target {config.target!r}: {error}") from None
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if size == 1:
                raise out_of_memory(config, device) from None
    return device, explainer


def out_of_memory(config: Config, device: torch.device) -> EnvironmentFailure:
    return EnvironmentFailure(
        f"out of memory explaining a single {config.resolution}x{config.resolution} image on {device}; "
        "lower --resolution, use a smaller model or a machine with more memory"
    )


class HalvingExplainer:
    """Explains a batch in chunks; on out of memory the chunk is halved (down to one image) and the
    smaller size kept for the batches that follow."""

    def __init__(self, explainer: Explainer, config: Config, device: torch.device, err: TextIO) -> None:
        self.explainer, self.config, self.device, self.err = explainer, config, device, err
        self.size = config.batch_size
        self.start_sums: list[float] = []  # of the last call, per image: the relevance it started from

    def __call__(self, pixels: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(relevance as float32 numpy, logits, explained class per image) for the whole batch."""
        parts: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []
        self.start_sums = []
        start = 0
        while start < len(pixels):
            chunk = pixels[start : start + self.size]
            try:
                result = self.explainer(chunk, self.config.target)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                if len(chunk) == 1:
                    raise out_of_memory(self.config, self.device) from None
                self.size = len(chunk) // 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.err.write(
                    f"lrp-heatmap: out of memory on a batch of {len(chunk)} images; "
                    f"retrying in batches of {self.size}\n"
                )
                continue
            parts.append((result.relevance.float().cpu().numpy(), result.logits.float(), result.targets))
            self.start_sums += result.start.double().sum(dim=1).tolist()
            start += len(chunk)
        if len(parts) == 1:
            return parts[0]
        return (
            np.concatenate([p[0] for p in parts]),
            torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]),
        )


def explained_batches(
    config: Config,
    items: Sequence[ImageItem],
    loaded: LoadedModel,
    explainer: Explainer,
    device: torch.device,
    err: TextIO | None = None,
) -> Iterable[tuple[list[Prediction], list[tuple[ImageItem, str]]]]:
    """Run the DataLoader and the engine; yield each batch's predictions and failures (entries that
    discovery already found unusable come first, as failures of an empty batch)."""
    unusable = [(item, item.error) for item in items if item.error is not None]
    if unusable:
        yield [], unusable  # type: ignore[misc]
    items = [item for item in items if item.error is None]
    if not items:
        return
    loader = make_loader(
        image_dataset(config, loaded, items),
        config.batch_size,
        config.workers,
        pin_memory=device.type == "cuda",
    )
    explain = HalvingExplainer(explainer, config, device, err or sys.stderr)
    for batch in _guard_workers(loader):
        failures = [(items[i], error) for i, error in batch["failures"]]
        predictions: list[Prediction] = []
        if batch["pixels"] is not None:
            started = time.perf_counter()
            relevance, logits, targets = explain(batch["pixels"].to(device, non_blocking=True))
            probabilities = logits.softmax(dim=1)
            top = probabilities.argmax(dim=1)
            elapsed = (time.perf_counter() - started) * 1000.0 / len(batch["indices"])
            for row, index in enumerate(batch["indices"]):
                explained = int(targets[row])
                shown = explained if explained >= 0 else int(top[row])  # a softmax start: the top class
                predictions.append(
                    Prediction(
                        items[index],
                        relevance[row],
                        batch["photos"][row].numpy(),
                        shown,
                        float(probabilities[row, shown]),
                        int(top[row]),
                        explained if explained >= 0 else "softmax",
                        elapsed,
                        explain.start_sums[row],
                    )
                )
        yield predictions, failures


def _guard_workers(loader: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """The loader's batches; a decoding worker that died (the system's out-of-memory killer, a signal)
    becomes an EnvironmentFailure with what to do."""
    try:
        yield from loader
    except (EOFError, ConnectionError) as error:  # the worker's end of the queue vanished with it
        raise worker_failure(RuntimeError(f"DataLoader worker exited unexpectedly ({error!r})")) from None
    except RuntimeError as error:
        raise worker_failure(error) or error from None


class Reporter:
    """Manifest lines (each written whole), optional JSON on stdout, errors on stderr."""

    def __init__(self, writer: ManifestWriter, json_out: TextIO | None, err: TextIO) -> None:
        self.writer, self.json_out, self.err = writer, json_out, err
        self.failed = 0
        self.succeeded = 0

    def record(self, record: dict) -> None:
        line = self.writer.append(record)
        if record["error"] is not None:
            self.failed += 1
            self.err.write(f"lrp-heatmap: skipped {record['path']}: {record['error']}\n")
        else:
            self.succeeded += 1
        if self.json_out is not None:
            try:
                self.json_out.write(line + "\n")
                self.json_out.flush()
            except BrokenPipeError:
                self.json_out = None
                raise StdoutClosed from None


def find_inputs(
    config: Config, inputs: Sequence[str], stdin: Iterable[str] | None, out_dir: Path
) -> list[ImageItem]:
    """The run's inputs in discovery order; RunError if an output would replace one of them."""
    from .video import RUN_EXTENSIONS  # video files go to lrp_cli.video

    items = discover(inputs, stdin, exclude=out_dir, extensions=RUN_EXTENSIONS)
    check_inputs_kept(items, out_dir, config)
    return items


def run(
    config: Config,
    inputs: Sequence[str],
    *,
    resume: bool = False,
    json_output: bool = False,
    quiet: bool = False,
    stdin: Iterable[str] | None = None,
) -> int:
    """The whole job; returns the exit code (0 all good, 1 some inputs failed, 130 interrupted, 141
    stdout closed). Usage problems raise RunError (exit 2), machine failures EnvironmentFailure (3)."""
    job = Job.from_env()
    if config.engine == "ray" or job.distributed:  # Ray Data actors, or one rank of a torchrun job
        from .ray_engine import run_ray

        start = run_ray if config.engine == "ray" else functools.partial(run_job, job)
        return start(config, inputs, resume=resume, json_output=json_output, quiet=quiet, stdin=stdin)
    out_dir = Path(os.path.abspath(config.output))
    items = find_inputs(config, inputs, stdin, out_dir)
    lock = FolderLock(out_dir).acquire()
    try:
        return _run_locked(config, items, lock, resume, json_output, quiet)
    finally:
        lock.release()


def _run_locked(
    config: Config,
    items: list[ImageItem],
    lock: FolderLock,
    resume: bool,
    json_output: bool,
    quiet: bool,
    rank: RankShare | None = None,
) -> int:
    err = sys.stderr
    out_dir = lock.folder
    take_over_folder(lock, err, clean=rank is None)  # a torchrun job's rank 0 cleaned for all ranks
    if rank is None:
        adopt_rank_manifests(out_dir, resume, err)  # what a crashed torchrun job left (lrp_cli.distributed)
    manifest = out_dir / MANIFEST
    state = rank.state if rank is not None else read_manifest(manifest) if resume else ManifestState()
    items = [item for item in items if str(item.path) not in state.done]
    from . import video

    items, videos = video.split_media(items, err)
    resolve_device(config.device)  # a missing GPU is reported before the model loads
    setup = SetupClock()
    loaded = load_model(config.model, config.weights, config.mean, config.std)
    if resolve_device(config.device).type == "cuda":  # one shape per batch: cuDNN times its kernels once
        torch.backends.cudnn.benchmark = True
    first_batch = max(1, min(config.batch_size, len(items)))
    device, explainer = prepare_engine(config, loaded, trial_batch=first_batch)  # so each ms is steady
    setup.stop()
    if state.torn_bytes:
        err.write(
            f"lrp-heatmap: {manifest} ended in an incomplete record ({state.torn_bytes} bytes, cut by a crash "
            "or a full disk); removed it, its image is done again\n"
        )
    for number in state.bad_lines:
        err.write(f"lrp-heatmap: {manifest} line {number} is not a manifest record; ignored\n")
    writer = (
        ManifestWriter(manifest, fresh=not resume, keep_bytes=state.whole_bytes if state.torn_bytes else None)
        if rank is None
        else rank.writer()
    )
    reporter = Reporter(writer, sys.stdout if json_output else None, err)
    bar = None
    if not (json_output or quiet) and err.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="img", file=err)
    pending: deque[Future] = deque()
    order = {id(item): number for number, item in enumerate(items)}
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lrp-writer")
    signed = explainer.composite.signed

    def drain(limit: int) -> None:
        while pending and (len(pending) > limit or pending[0].done()):
            reporter.record(pending.popleft().result())
            if bar is not None:
                bar.update(1)

    try:
        for predictions, failures in explained_batches(config, items, loaded, explainer, device, err):
            # records keep the input order: a file that failed to decode waits for its batch's earlier images
            entries: list[tuple[int, Any]] = [(order[id(item)], (item, error)) for item, error in failures]
            entries += [(order[id(prediction.item)], prediction) for prediction in predictions]
            for _, entry in sorted(entries, key=lambda pair: pair[0]):
                if isinstance(entry, Prediction):
                    pending.append(pool.submit(render_outputs, entry, config, signed, out_dir, loaded))
                else:
                    pending.append(_finished(failure_record(*entry)))
            drain(limit=4 * config.batch_size)
        drain(limit=0)
        frames = video.FrameExplainer(config, loaded, explainer, device, err)
        options = video.VideoOptions(progress=bar is not None)  # a frame bar per video after the images'
        video.explain_videos(videos, frames, out_dir, options, reporter.record, err)
    except KeyboardInterrupt:
        _finish(pending, drain)
        return interrupted(err, reporter.succeeded, "image")
    except StdoutClosed:
        _finish(pending, drain)
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except BaseException:
        with suppress(Exception):  # keep what is finished; the failure itself is what gets reported
            _finish(pending, drain)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
        if bar is not None:
            bar.close()
    from .report import read_records, report_wanted, write_report  # report.html (lrp_cli.report)

    if rank is None and report_wanted(config.report, manifest):  # a torchrun job's: after the merge
        write_report(out_dir, read_records(manifest))
    if json_output and rank is None:  # one last line, shaped unlike any image record (lrp_cli.runinfo)
        summary = summary_record(reporter.succeeded, reporter.failed, setup.ms, manifest)
        with suppress(BrokenPipeError):
            sys.stdout.write(json.dumps(summary) + "\n")
            sys.stdout.flush()
    if not quiet and not json_output:
        err.write(
            f"lrp-heatmap: {reporter.succeeded} explained, {reporter.failed} failed{setup_text(setup.ms)}; "
            f"manifest {manifest}\n"
        )
    return EXIT_FAILED_INPUTS if reporter.failed else EXIT_OK


def _finish(pending: deque[Future], drain: Callable[[int], None]) -> None:
    """Cancel the writes not yet started and record the ones already running or done."""
    for future in pending:
        future.cancel()
    finished = [f for f in pending if not f.cancelled()]
    pending.clear()
    pending.extend(finished)
    while pending:  # if stdout closes meanwhile, the rest still goes to the manifest
        with suppress(StdoutClosed):
            drain(0)


def interrupted(err: TextIO, succeeded: int, noun: str) -> int:
    """Say after Ctrl-C what is finished and how to go on; the exit code of an interrupted job."""
    err.write(
        f"lrp-heatmap: interrupted after {succeeded} {noun}(s); finished outputs are complete, "
        "run again with --resume to continue\n"
    )
    return EXIT_INTERRUPTED


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush at exit does not fail again."""
    try:
        descriptor = sys.stdout.fileno()
    except (OSError, ValueError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, descriptor)
    os.close(null)
