"""``lrp-heatmap live``: no camera is a clear exit 2; a video file stands in for a camera, streamed as
MJPEG to the page while the FPS is reported."""

from __future__ import annotations

import io
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lrp_cli.cli import app
from lrp_cli.live import open_source

WIDTH, HEIGHT, FRAMES, RATE = 64, 48, 8, 10


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A white square moving right over a dark gradient, made here with PyAV."""
    import av

    path = tmp_path_factory.mktemp("live") / "square.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for number in range(FRAMES):
            picture = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            picture[..., 2] = np.linspace(30, 120, WIDTH, dtype=np.uint8)
            picture[16:32, 4 + 6 * number : 20 + 6 * number] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_no_camera_is_exit_2() -> None:
    if not sys.platform.startswith("linux") or os.path.exists("/dev/video97"):
        pytest.skip("needs Linux without a camera 97")
    result = CliRunner().invoke(app, ["live", "--camera", "97"])
    assert result.exit_code == 2
    assert "no camera 97: /dev/video97 does not exist" in result.output
    assert "--camera clip.mp4" in result.output and "Traceback" not in result.output


def test_missing_or_bad_video_file_is_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["live", "--camera", str(tmp_path / "none.mp4")])
    assert result.exit_code == 2 and "no such camera index or video file" in result.output
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    result = CliRunner().invoke(app, ["live", "--camera", str(bad)])
    assert result.exit_code == 2 and f"cannot read video {bad}" in result.output


def test_video_file_frames(clip: Path) -> None:
    source = open_source(str(clip))
    try:
        frames = list(source.frames())
    finally:
        source.close()
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3) and not source.camera
    column = [int(np.argmax(f[24, :, 0] > 200)) for f in frames]  # the square's left edge moves right
    assert all(b > a for a, b in itertools.pairwise(column))


def mjpeg_frames(url: str, count: int) -> list[Image.Image]:
    """The first ``count`` JPEG parts of a multipart/x-mixed-replace stream."""
    images: list[Image.Image] = []
    buffer = b""
    with httpx.stream("GET", url, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("multipart/x-mixed-replace")
        for chunk in response.iter_bytes():
            buffer += chunk
            while match := re.search(
                rb"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: (\d+)\r\n\r\n", buffer
            ):
                start, length = match.end(), int(match.group(1))
                if len(buffer) < start + length:
                    break
                images.append(Image.open(io.BytesIO(buffer[start : start + length])))
                buffer = buffer[start + length :]
                if len(images) == count:
                    return images
    return images


def test_live_serves_the_stream_and_reports_fps(clip: Path) -> None:
    """Without a display, ``live`` streams the explained frames (at the source's size, class written on
    them) to the page, reports its state, and on Ctrl-C prints the achieved frames/s and exits 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    command = [sys.executable, "-m", "lrp_cli", "live", "--camera", str(clip), "--loop", "--port", "0"]
    command += ["--resolution", "48", "--device", "cpu"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    try:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "streaming" in line:
                break
        found = re.search(r"on (http://127\.0\.0\.1:\d+/)", "".join(lines))
        assert found, "".join(lines)
        url = found.group(1)
        frames = mjpeg_frames(url + "live.mjpeg", 3)
        assert len(frames) == 3 and all(f.size == (WIDTH, HEIGHT) for f in frames)
        status = httpx.get(url + "api/live").json()
        assert status["frames"] >= 3 and status["fps"] > 0 and isinstance(status["label"], str)
        assert httpx.get(url + "api/info").json()["live"] is True
        rest: list[str] = []
        reader = threading.Thread(target=lambda: rest.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        reader.join(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    summary = "".join(rest)
    found = re.search(r"live: (\d+) frames in [\d.]+ s, ([\d.]+) frames/s achieved", summary)
    assert found, summary
    assert int(found.group(1)) >= 3 and float(found.group(2)) > 0
    assert "Traceback" not in summary


def test_live_ends_with_the_file(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A video file without --loop, no display: ``--max-frames`` frames explained, then the command
    ends by itself (run in-process)."""
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    command = ["live", "--camera", str(clip), "--port", "0", "--resolution", "48", "--device", "cpu"]
    result = CliRunner().invoke(app, [*command, "--max-frames", "5"])
    assert result.exit_code == 0, result.output
    assert "streaming" in result.output
    assert re.search(r"live: 5 frames in [\d.]+ s, [\d.]+ frames/s achieved", result.output), result.output


class SlowEngine:
    """Stands in for the serve engine to time the stream's own logic: 0.1 s per frame, and it records
    which frames it was given (by where the square is)."""

    default = ("auto", 1.0)

    def __init__(self) -> None:
        self.seen: list[int] = []

    def explain(self, photo: Image.Image, composite: str, topk: float) -> SimpleNamespace:
        time.sleep(0.1)
        self.seen.append(int(np.argmax(np.asarray(photo)[24, :, 0] > 200)))
        return SimpleNamespace(class_index=0, probability=0.5)

    def label(self, index: int) -> str:
        return "square"

    def pictures(self, photo: Image.Image, explained: SimpleNamespace) -> tuple[Image.Image, Image.Image]:
        return photo, photo.copy()


def test_camera_frames_arriving_meanwhile_are_dropped(clip: Path) -> None:
    """A camera source (here the clip, decoded far faster than explained) gives the engine the newest
    frame each time: fewer frames than the clip has, the last one among them, then the stream ends."""
    import av

    from lrp_cli.live import LiveStream, Source

    engine = SlowEngine()
    source = Source(av.open(str(clip)), "fake camera", camera=True)
    stream = LiveStream(engine, source, err=io.StringIO()).start()
    try:
        assert stream.done.wait(30)
    finally:
        source.close()
    assert stream.error is None and 1 <= stream.frames < FRAMES and stream.frames == len(engine.seen)
    assert engine.seen[-1] == 4 + 6 * (FRAMES - 1)  # the clip's last frame was explained
    assert engine.seen == sorted(engine.seen)
    frame = stream.wait_frame(0, 0)
    assert frame is not None and Image.open(io.BytesIO(frame[1])).size == (WIDTH, HEIGHT)
