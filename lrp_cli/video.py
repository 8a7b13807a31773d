"""Video files and animated GIF/WebP through the engine: decode, batch, explain, render, encode.

Decoding (``media``), the engine (``frames.FrameExplainer``), drawing and encoding run on four threads
(``_run_frames``): on the CPU the engine's batches alternate with the video work, elsewhere they overlap.
Video files ``run`` finds take the same path (``split_media``, ``explain_videos``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from .config import Config
from .data import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ImageItem, discover
from .errors import EXIT_BROKEN_PIPE, EXIT_FAILED_INPUTS, EXIT_OK, RunError, disk_failure
from .frames import FrameExplainer, FrameResult
from .lock import FolderLock
from .manifest import MANIFEST, ManifestWriter, add_paths, read_manifest
from .media import ANIMATED_EXTENSIONS, Clip, Encoder, VideoError, open_clip, subsample
from .models import load_model
from .outputs import failure_record, take_over_folder
from .pipeline import Reporter, StdoutClosed, _silence_stdout, interrupted, prepare_engine, resolve_device
from .render import atomic_write

RUN_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
"""What ``run`` finds in folders: images, and videos it hands to this module."""


@dataclass(frozen=True)
class VideoOptions:
    every: int | None = None  # keep every N-th frame
    fps: float | None = None  # or about this many frames per second
    heatmap_video: bool = False  # also write NAME.heatmap.mp4
    progress: bool = False  # a frame progress bar on stderr

    def __post_init__(self) -> None:
        if self.every is not None and self.fps is not None:
            raise RunError("--every and --fps both subsample: give one of them")
        if self.every is not None and self.every < 1:
            raise RunError(f"--every {self.every}: give a whole number of frames, 1 or more")
        if self.fps is not None and not self.fps > 0:
            raise RunError(f"--fps {self.fps}: give a positive frame rate")


def video_paths(out_dir: Path, item: ImageItem, options: VideoOptions) -> dict[str, Path]:
    stem = str(item.relative)
    paths = {"overlay_video": out_dir / f"{stem}.overlay.mp4", "frames": out_dir / f"{stem}.frames.jsonl"}
    if options.heatmap_video:
        paths["heatmap_video"] = out_dir / f"{stem}.heatmap.mp4"
    return paths


Frame = tuple[int, float, np.ndarray]  # index in the source, seconds from the first frame, RGB


def _run_frames(
    frames: Iterator[Frame],
    explainer: FrameExplainer,
    draw: Callable[[np.ndarray, FrameResult], list[np.ndarray]],
    write: Callable[[Frame, FrameResult, list[np.ndarray]], None],
    overlap: bool,
) -> None:
    """Decode (one task a batch), resize and draw (one task a frame) on two worker threads, explain on this
    one and ``write`` in order on a fourth. ``overlap``: keep the engine busy while a batch or two is
    decoded and drawn (an accelerator's engine leaves the CPU free); without it the engine's batches and
    the video work alternate, each with the whole CPU: torch's OpenMP threads spin at every barrier, so a
    thread that takes a core from them costs the engine more than its own time."""
    size = explainer.config.batch_size

    def prepare() -> tuple[list[Frame], list[Future]]:
        batch, resizing = [], []
        for entry in islice(frames, size):  # decoding is sequential; resizing is not
            batch.append(entry)
            resizing.append(workers.submit(explainer.resized, entry[2]))
        return batch, resizing

    def write_batch(batch: list[Frame], results: list[FrameResult], drawn: list[Future]) -> None:
        for entry, result, pictures in zip(batch, results, drawn):
            write(entry, result, pictures.result())

    workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lrp-video")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrp-video-encoder")
    written: deque[Future] = deque()
    try:
        upcoming = workers.submit(prepare)
        while True:
            batch, resizing = upcoming.result()
            if not batch:
                break
            resized = np.stack([future.result() for future in resizing])
            if overlap:
                upcoming = workers.submit(prepare)
            results = explainer.explain(resized)
            if not overlap:
                upcoming = workers.submit(prepare)
            drawn = [workers.submit(draw, frame, result) for (_, _, frame), result in zip(batch, results)]
            written.append(writer.submit(write_batch, batch, results, drawn))
            while written and (not overlap or len(written) > 2 or written[0].done()):
                written.popleft().result()
        while written:
            written.popleft().result()
    finally:
        writer.shutdown(cancel_futures=True)
        workers.shutdown(cancel_futures=True)


def explain_video(
    item: ImageItem, explainer: FrameExplainer, out_dir: Path, options: VideoOptions, err: TextIO
) -> dict[str, Any]:
    """Explain one video and write its files; returns its manifest record (a failure record for a file
    that is no readable video). A full disk raises EnvironmentFailure."""
    started = time.perf_counter()
    config = explainer.config
    paths = video_paths(out_dir, item, options)
    encoders: list[Encoder] = []
    try:
        overlap = explainer.device.type != "cpu"
        codec_threads = 0 if overlap else 1  # on the CPU the codecs work only in their turn (_run_frames)
        clip = open_clip(item.path, config.max_pixels, codec_threads)
        frames, rate = subsample(clip.frames, clip.rate, options.every, options.fps)
        size = (clip.width, clip.height)
        encoders.append(Encoder(paths["overlay_video"], *size, rate, codec_threads))
        if options.heatmap_video:
            encoders.append(Encoder(paths["heatmap_video"], *size, rate, codec_threads))
        lines: list[str] = []
        seen: list[tuple[int, float, int, int | str]] = []  # class, probability, predicted, target per frame
        bar = _bar(clip, options, item, err)

        def draw(frame: np.ndarray, result: FrameResult) -> list[np.ndarray]:
            overlay = explainer.overlay(frame, result)
            return [overlay, explainer.heatmap(result, size)] if options.heatmap_video else [overlay]

        def write(entry: Frame, result: FrameResult, pictures: list[np.ndarray]) -> None:
            for encoder, picture in zip(encoders, pictures):
                encoder.write(picture)
            lines.append(json.dumps(_frame_record(entry[0], entry[1], result), ensure_ascii=False))
            seen.append((result.class_index, result.probability, result.predicted_index, result.target))
            if bar is not None:
                bar.update(1)

        try:
            _run_frames(frames, explainer, draw, write, overlap)
        finally:
            clip.frames.close()
            if bar is not None:
                bar.close()
        for encoder in encoders:
            encoder.finish()
        atomic_write(paths["frames"], "".join(line + "\n" for line in lines).encode("utf-8"))
    except VideoError as error:
        return failure_record(item, str(error))
    except OSError as error:
        failure = disk_failure(error, f"the outputs of {item.path}")
        if failure is not None:
            raise failure from None
        return failure_record(item, f"could not write outputs: {error}")
    finally:
        for encoder in encoders:
            if Path(encoder.temporary).exists():
                encoder.discard()
    return _video_record(item, paths, explainer, seen, rate, clip, started)


def _bar(clip: Clip, options: VideoOptions, item: ImageItem, err: TextIO) -> Any:
    if not options.progress:
        return None
    from tqdm import tqdm

    total = clip.count
    if total is not None and options.every:
        total = -(-total // options.every)
    elif options.fps is not None:
        total = None
    return tqdm(total=total, unit="frame", desc=item.path.name, file=err)


def _frame_record(index: int, seconds: float, result: FrameResult) -> dict[str, Any]:
    return {
        "frame": index,
        "time": round(seconds, 6),
        "class_index": result.class_index,
        "label": result.label,
        "probability": round(result.probability, 6),
        "predicted_index": result.predicted_index,
        "target": result.target,
        "relevance_sum": result.relevance_sum,
    }


def _video_record(
    item: ImageItem,
    paths: dict[str, Path],
    explainer: FrameExplainer,
    seen: list[tuple[int, float, int, int | str]],
    rate: Fraction,
    clip: Clip,
    started: float,
) -> dict[str, Any]:
    """The manifest record of a video: the image record's fields (class: the one explained in most frames,
    probability: its mean over those frames; predicted: the most frequent top class) plus the video's own."""
    common = Counter(entry[0] for entry in seen).most_common(1)[0][0]
    predicted = Counter(entry[2] for entry in seen).most_common(1)[0][0]
    softmax = any(entry[3] == "softmax" for entry in seen)
    return add_paths({}, item.path, item.relative, paths) | {
        "kind": "video",
        "frames": len(seen),
        "fps": float(rate),
        "width": clip.width - clip.width % 2,
        "height": clip.height - clip.height % 2,
        "class_index": common,
        "label": explainer.loaded.label(common),
        "probability": round(float(np.mean([entry[1] for entry in seen if entry[0] == common])), 6),
        "predicted_index": predicted,
        "predicted_label": explainer.loaded.label(predicted),
        "target": "softmax" if softmax else common,
        "composite": explainer.config.composite,
        "relevance_sum": None,
        "ms": round((time.perf_counter() - started) * 1000.0, 2),
        "error": None,
    }


def explain_videos(
    items: Sequence[ImageItem],
    explainer: FrameExplainer,
    out_dir: Path,
    options: VideoOptions,
    record: Callable[[dict[str, Any]], None],
    err: TextIO,
) -> None:
    """Explain each video in turn and hand its manifest record to ``record``."""
    for item in items:
        record(
            failure_record(item, item.error)
            if item.error
            else explain_video(item, explainer, out_dir, options, err)
        )


def split_media(items: list[ImageItem], err: TextIO) -> tuple[list[ImageItem], list[ImageItem]]:
    """``run``'s inputs as (images, videos); an animated GIF/WebP stays an image, explained from its first
    frame, and one line on ``err`` says so."""
    images = [item for item in items if item.path.suffix.lower() not in VIDEO_EXTENSIONS]
    for item in images:
        if item.error is None and item.path.suffix.lower() in ANIMATED_EXTENSIONS and _animated(item.path):
            err.write(
                f"lrp-heatmap: {item.path} is animated: explained its first frame only "
                "(lrp-heatmap video explains every frame)\n"
            )
    return images, [item for item in items if item.path.suffix.lower() in VIDEO_EXTENSIONS]


def _animated(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            return bool(getattr(image, "is_animated", False))
    except (OSError, SyntaxError, ValueError):
        return False  # decoding reports what is wrong with it


def run_videos(
    config: Config,
    inputs: Sequence[str],
    options: VideoOptions,
    *,
    resume: bool = False,
    json_output: bool = False,
    quiet: bool = False,
) -> int:
    """``lrp-heatmap video``: every video (and GIF/WebP) among the inputs, one manifest record each."""
    out_dir = Path(os.path.abspath(config.output))
    items = discover(inputs, None, exclude=out_dir, extensions=VIDEO_EXTENSIONS | ANIMATED_EXTENSIONS)
    for item in items:
        for path in video_paths(out_dir, item, options).values():
            if path == item.path:
                raise RunError(
                    f"the output {path} would overwrite the input {item.path}; choose another --output"
                )
    lock = FolderLock(out_dir).acquire()
    err = sys.stderr
    try:
        take_over_folder(lock, err)
        manifest = out_dir / MANIFEST
        state = read_manifest(manifest) if resume else None
        todo = [item for item in items if state is None or str(item.path) not in state.done]
        resolve_device(config.device)
        loaded = load_model(config.model, config.weights, config.mean, config.std)
        device, explainer = prepare_engine(config, loaded)
        frames = FrameExplainer(config, loaded, explainer, device, err)
        options = VideoOptions(
            options.every, options.fps, options.heatmap_video, not (quiet or json_output) and err.isatty()
        )
        keep = state.whole_bytes if state is not None and state.torn_bytes else None
        writer = ManifestWriter(manifest, fresh=not resume, keep_bytes=keep)
        reporter = Reporter(writer, sys.stdout if json_output else None, err)
        try:
            explain_videos(todo, frames, out_dir, options, reporter.record, err)
        except KeyboardInterrupt:
            return interrupted(err, reporter.succeeded, "video")
        except StdoutClosed:
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        finally:
            writer.close()
    finally:
        lock.release()
    if not (quiet or json_output):
        err.write(
            f"lrp-heatmap: {reporter.succeeded} video(s) explained, {reporter.failed} failed; manifest {manifest}\n"
        )
    return EXIT_FAILED_INPUTS if reporter.failed else EXIT_OK
