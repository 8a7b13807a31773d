"""Reading and writing video: PyAV (FFmpeg) for video files, Pillow for animated GIF/WebP (it composes
their frames and knows their durations), H.264 in MP4 written atomically. No engine here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from .data import _to_rgb
from .render import TEMP_SUFFIX

ANIMATED_EXTENSIONS = {".gif", ".webp"}
"""Decoded frame by frame with Pillow by ``lrp-heatmap video``; ``run`` explains their first frame."""
ENCODER_OPTIONS = {"preset": "ultrafast", "crf": "20"}
"""libx264: 'ultrafast' encodes a 640x360 frame in ~2.5 ms of CPU (a fortieth of the engine's time on the
embedded model; 'veryfast' takes 6.4 ms for files half the size), at a near-transparent quality."""
MIN_FRAME_MS = 20  # GIF frames of 0 or 10 ms are shown for 100 ms by browsers; so do we


class VideoError(ValueError):
    """A file that is no readable video (corrupt, truncated, no video stream, unknown codec)."""


@dataclass
class Clip:
    """An opened video: its frames (index, seconds from the start, uint8 H x W x 3) and their shape and rate."""

    width: int
    height: int
    rate: Fraction
    count: int | None  # frames in the file, where the container says
    frames: Generator[tuple[int, float, np.ndarray], None, None]  # close() releases the file early


def open_clip(path: Path, max_pixels: int, threads: int = 0) -> Clip:
    """Open a video (PyAV) or an animated GIF/WebP (Pillow); VideoError says why a file cannot be read.
    ``threads``: the decoder's threads (0: FFmpeg's choice, frame-parallel where the codec allows)."""
    if path.is_dir():
        raise VideoError("is a folder, not a video file")
    try:
        if path.stat().st_size == 0:
            raise VideoError("empty file")
    except OSError as error:
        raise VideoError(f"cannot read file: {error.strerror}") from None
    clip = _pillow_clip(path) if path.suffix.lower() in ANIMATED_EXTENSIONS else _av_clip(path, threads)
    if clip.width * clip.height > max_pixels:
        raise VideoError(f"{clip.width}x{clip.height} frames are over the max_pixels limit of {max_pixels}")
    return clip


def _av_clip(path: Path, threads: int) -> Clip:
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise VideoError(f"not a video file FFmpeg can read ({error.strerror or error})") from None
    except OSError as error:
        raise VideoError(f"cannot read file: {error.strerror}") from None
    streams = container.streams.video
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise VideoError(f"no video stream in the file (streams: {', '.join(kinds)})")
    stream = streams[0]
    context = stream.codec_context
    if context is None or not context.width or not context.height:
        container.close()
        raise VideoError(
            f"unsupported video stream (codec {stream.codec.name if stream.codec else 'unknown'})"
        )
    if threads:
        context.thread_count = threads
    else:
        stream.thread_type = "AUTO"  # frame-parallel decoding where the codec allows it
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    width, height = context.width, context.height

    def frames() -> Generator[tuple[int, float, np.ndarray], None, None]:
        index, start = 0, None
        try:
            for frame in container.decode(stream):
                seconds = float(frame.time) if frame.time is not None else index / float(rate)
                start = seconds if start is None else start
                yield index, seconds - start, frame.to_ndarray(width=width, height=height, format="rgb24")
                index += 1
        except av.error.FFmpegError as error:
            raise VideoError(f"corrupt video stream at frame {index} ({error.strerror or error})") from None
        finally:
            container.close()
        if index == 0:
            raise VideoError("the video stream holds no decodable frame")

    return Clip(width, height, Fraction(rate), stream.frames or None, frames())


def _pillow_clip(path: Path) -> Clip:
    try:
        image = Image.open(path)
        count = getattr(image, "n_frames", 1)
        durations = []
        for index in range(count):  # durations first: the output's rate is their mean
            image.seek(index)
            image.load()  # WebP sets a frame's duration when it is loaded, GIF when it is sought
            durations.append(max(int(image.info.get("duration") or 0), 0))
    except (OSError, SyntaxError, EOFError, Image.UnidentifiedImageError) as error:
        raise VideoError(f"not an image Pillow can read ({error})") from None
    durations = [d if d >= MIN_FRAME_MS else 100 for d in durations]
    rate = Fraction(1000 * count, sum(durations)).limit_denominator(1000)

    def frames() -> Generator[tuple[int, float, np.ndarray], None, None]:
        elapsed = 0
        with image:
            for index, duration in enumerate(durations):
                try:
                    image.seek(index)
                    rgb = np.asarray(_to_rgb(image.copy()))
                except (OSError, SyntaxError, EOFError) as error:
                    raise VideoError(f"corrupt frame {index} ({error})") from None
                yield index, elapsed / 1000.0, rgb
                elapsed += duration

    return Clip(image.width, image.height, rate, count, frames())


def subsample(
    frames: Iterable[tuple[int, float, np.ndarray]], rate: Fraction, every: int | None, fps: float | None
) -> tuple[Iterator[tuple[int, float, np.ndarray]], Fraction]:
    """Keep every ``every``-th frame, or the first frame of each 1/``fps`` interval (never more than the
    source has); returns the kept frames and the output rate that preserves the clip's duration."""
    if every is not None and every > 1:
        return ((i, t, f) for i, t, f in frames if i % every == 0), rate / every
    if fps is not None and fps < rate:
        step = Fraction(fps).limit_denominator(1000)

        def timed() -> Iterator[tuple[int, float, np.ndarray]]:
            last = -1
            for index, seconds, frame in frames:
                slot = int(seconds * float(step) + 1e-6)
                if slot > last:
                    last = slot
                    yield index, seconds, frame

        return timed(), step
    return iter(frames), rate


class Encoder:
    """H.264 in MP4 to a hidden temporary file, renamed into place by :meth:`finish` (whole or absent).
    4:2:0 chroma needs even sizes: an odd width or height loses its last column or row. ``threads``: libx264's
    (0: its choice, frames encoded in the background; 1: each frame encoded within :meth:`write`)."""

    def __init__(self, path: Path, width: int, height: int, rate: Fraction, threads: int = 0) -> None:
        import av

        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, self.temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX
        )
        os.close(handle)
        self.width, self.height = width - width % 2, height - height % 2
        self.container = av.open(self.temporary, "w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=rate, options=ENCODER_OPTIONS)
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, "yuv420p"
        if threads:
            self.stream.codec_context.thread_count = threads
        self.count = 0

    def write(self, rgb: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[: self.height, : self.width]), "rgb24")
        frame.pts = self.count
        self.count += 1
        self.container.mux(self.stream.encode(frame))

    def finish(self) -> None:
        self.container.mux(self.stream.encode(None))
        self.container.close()
        os.chmod(self.temporary, 0o644)
        os.replace(self.temporary, self.path)

    def discard(self) -> None:
        with suppress(Exception):
            self.container.close()
        Path(self.temporary).unlink(missing_ok=True)
