"""``lrp-heatmap live``: a camera (or a video file) explained frame by frame, shown in a window when
there is a display, else served as an MJPEG stream on the page of ``lrp-heatmap serve``.

The engine explains the newest frame; a camera's frames that arrive meanwhile are dropped, so the
picture lags by one explanation at most. A video file is explained frame by frame.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image, ImageDraw

from .config import Config
from .data import InputError
from .errors import EXIT_ENVIRONMENT, EXIT_OK, EnvironmentFailure, RunError
from .render import image_bytes

WINDOW = "lrp-heatmap live"
REPORT_EVERY_S = 5.0


class Source:
    """Frames as RGB uint8 arrays (H, W, 3) from a camera or a video file, through PyAV."""

    def __init__(self, container: Any, name: str, camera: bool) -> None:
        self.container, self.name, self.camera = container, name, camera
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        self.stream = stream

    def frames(self) -> Iterator[np.ndarray]:
        try:
            for frame in self.container.decode(self.stream):
                yield frame.to_ndarray(format="rgb24")
        except Exception as error:  # a camera unplugged, a file cut short: the stream ends with a reason
            raise EnvironmentFailure(f"{self.name}: reading frames failed: {error}") from None

    def close(self) -> None:
        self.container.close()


def open_source(camera: str) -> Source:
    """A camera by index (``0``: ``/dev/video0`` through v4l2 on Linux, avfoundation on macOS) or a
    video file by path; a missing camera or an unreadable file raises InputError (exit 2)."""
    import av

    if camera.isdigit():
        if sys.platform.startswith("linux"):
            device, options = f"/dev/video{camera}", {"format": "v4l2"}
            if not os.path.exists(device):
                raise InputError(
                    f"no camera {camera}: {device} does not exist (no camera connected, or no access to it); "
                    "connect one, or pass a video file: --camera clip.mp4"
                )
        elif sys.platform == "darwin":
            device, options = camera, {"format": "avfoundation"}
        else:
            raise InputError(
                f"camera {camera}: cameras are opened through v4l2 (Linux) or avfoundation (macOS); "
                "on this system pass a video file: --camera clip.mp4"
            )
        try:
            container = av.open(device, **options)
        except (av.FFmpegError, OSError) as error:
            raise InputError(f"cannot open camera {camera} ({device}): {error}") from None
        name = device
    else:
        path = Path(camera)
        if not path.is_file():
            raise InputError(f"--camera {camera}: no such camera index or video file")
        try:
            container = av.open(str(path))
        except (av.FFmpegError, OSError) as error:
            raise InputError(f"cannot read video {camera}: {error}") from None
        name = str(path)
    if not container.streams.video:
        container.close()
        raise InputError(f"{name}: has no video stream")
    return Source(container, name, camera.isdigit())


def has_display() -> bool:
    """Whether a window could be shown: a desktop session on Linux, always on macOS and Windows."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def labelled_overlay(engine: Any, photo: Image.Image, explained: Any) -> Image.Image:
    """The overlay of one frame with the explained class and its probability written on it."""
    overlay = engine.pictures(photo, explained)[1]
    text = f"{engine.label(explained.class_index)} {explained.probability:.0%}"
    draw = ImageDraw.Draw(overlay)
    right, bottom = draw.textbbox((6, 4), text)[2:]
    draw.rectangle((2, 2, right + 4, bottom + 4), fill=(0, 0, 0))
    draw.text((6, 4), text, fill=(255, 255, 255))
    return overlay


class LiveStream:
    """Explains the source's frames in a thread; the newest overlay (JPEG) waits for the page."""

    def __init__(
        self, engine: Any, source: Source, *, loop: bool = False, max_frames: int | None = None, err: TextIO
    ) -> None:
        self.engine, self.source, self.loop, self.max_frames, self.err = engine, source, loop, max_frames, err
        self.composite, self.topk = engine.default
        self.frames = 0
        self.label: str | None = None
        self.probability: float | None = None
        self.error: Exception | None = None
        self.done = threading.Event()
        self._jpeg = b""
        self._changed = threading.Condition()
        self._started = time.perf_counter()
        self._ended: float | None = None
        self._thread = threading.Thread(target=self._run, name="lrp-live", daemon=True)

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def start(self) -> LiveStream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.done.set()
        self._thread.join(timeout=30)

    def elapsed(self) -> float:
        """Seconds from the first frame asked for to the last one explained (or to now)."""
        return (self._ended or time.perf_counter()) - self._started

    def fps(self) -> float:
        elapsed = self.elapsed()
        return self.frames / elapsed if elapsed > 0 else 0.0

    def status(self) -> dict[str, Any]:
        return {
            "source": self.source.name,
            "frames": self.frames,
            "fps": round(self.fps(), 2),
            "label": self.label,
            "probability": self.probability,
            "finished": self.finished,
        }

    def wait_frame(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        """The newest frame once it is newer than number ``after``; None after ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self.frames > after or self.finished, timeout)
            return (self.frames, self._jpeg) if self.frames > after else None

    def _incoming(self) -> Iterator[np.ndarray]:
        """The frames to explain: a file's in order (again and again with ``loop``); a camera's newest."""
        if not self.source.camera:
            while not self.done.is_set():
                yield from self.source.frames()
                if not self.loop:
                    return
                self.source.container.seek(0)
            return
        arrived, ended, lock = threading.Event(), threading.Event(), threading.Lock()
        newest: list[np.ndarray | None] = [None]

        def grab() -> None:
            try:
                for frame in self.source.frames():
                    with lock:
                        newest[0] = frame
                    arrived.set()
                    if self.done.is_set():
                        break
            except EnvironmentFailure as error:
                self.error = error
            ended.set()
            arrived.set()

        threading.Thread(target=grab, name="lrp-camera", daemon=True).start()
        while not self.done.is_set():
            arrived.wait(0.5)  # with a timeout: a stalled camera must not keep Ctrl-C waiting
            with lock:
                arrived.clear()
                frame, newest[0] = newest[0], None
            if frame is not None:
                yield frame
            elif ended.is_set():
                return

    def explain(self, frame: np.ndarray) -> Image.Image:
        photo = Image.fromarray(frame, "RGB")
        explained = self.engine.explain(photo, self.composite, self.topk)
        self.label = self.engine.label(explained.class_index)
        self.probability = round(explained.probability, 4)
        return labelled_overlay(self.engine, photo, explained)

    def _run(self) -> None:
        self._started = reported = time.perf_counter()
        try:
            for frame in self._incoming():
                jpeg = image_bytes(self.explain(frame), "jpg")
                with self._changed:
                    self._jpeg = jpeg
                    self.frames += 1
                    self._changed.notify_all()
                if time.perf_counter() - reported > REPORT_EVERY_S:
                    reported = time.perf_counter()
                    self.err.write(f"lrp-heatmap: live: {self.fps():.2f} frames/s, {self.label}\n")
                    self.err.flush()
                if self.done.is_set() or (self.max_frames is not None and self.frames >= self.max_frames):
                    break
        except Exception as error:
            self.error = error
        finally:
            self._ended = time.perf_counter()
            with self._changed:
                self.done.set()
                self._changed.notify_all()

    def summary(self) -> str:
        return f"lrp-heatmap: live: {self.frames} frames in {self.elapsed():.1f} s, {self.fps():.2f} frames/s achieved"


def show_window(stream: LiveStream) -> None:
    """Explain and show frames in an OpenCV window until the source ends, Esc/q, or the window closes."""
    import cv2

    cv2.namedWindow(WINDOW, cv2.WINDOW_AUTOSIZE)
    shown = 0
    try:
        while not stream.finished:
            frame = stream.wait_frame(shown, 0.05)
            if frame is not None:
                shown, jpeg = frame
                image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                cv2.imshow(WINDOW, image)
            key = cv2.waitKey(1) & 0xFF
            if key in (27, ord("q")) or cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) < 1:
                break
    finally:
        cv2.destroyAllWindows()


def live(
    config: Config,
    camera: str,
    *,
    window: bool | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    loop: bool = False,
    max_frames: int | None = None,
    err: TextIO | None = None,
) -> int:
    """The whole command; returns the exit code (0, or 3 when the source failed mid-stream)."""
    from .serve import address, listen, run_server
    from .serve.app import DEFAULT_MAX_UPLOAD
    from .serve.engine import Engine

    err = err or sys.stderr
    if max_frames is not None and max_frames < 1:
        raise RunError(f"--max-frames {max_frames} must be at least 1")
    if window and not has_display():
        raise RunError(
            "--window needs a display (DISPLAY or WAYLAND_DISPLAY is not set); leave it off to serve the stream"
        )
    source = open_source(camera)  # no camera: a clear message before the model loads
    sock = None if (window or (window is None and has_display())) else listen(host, port)
    try:
        stream = LiveStream(Engine(config), source, loop=loop, max_frames=max_frames, err=err)
        stream.start()
        try:
            if sock is None:
                err.write(f"lrp-heatmap: live: {source.name} in a window (Esc or q to stop)\n")
                import cv2

                try:
                    show_window(stream)
                except cv2.error as error:  # an OpenCV built without windows (opencv-python-headless)
                    if window:
                        raise RunError(f"cannot open a window: {str(error).splitlines()[0]}") from None
                    err.write(
                        f"lrp-heatmap: live: no window ({str(error).splitlines()[0]}); serving instead\n"
                    )
                    sock = listen(host, port)
            if sock is not None:
                err.write(f"lrp-heatmap: live: streaming {source.name} on {address(sock)} (Ctrl-C to stop)\n")
                err.flush()
                run_server(stream.engine, sock, DEFAULT_MAX_UPLOAD, live=stream)
        except KeyboardInterrupt:  # Ctrl-C is how a camera stream ends
            pass
        finally:
            stream.stop()
    finally:
        source.close()
        if sock is not None:
            sock.close()
    err.write(stream.summary() + "\n")
    if stream.error is not None:
        err.write(f"lrp-heatmap: error: {stream.error}\n")
        return EXIT_ENVIRONMENT
    return EXIT_OK
