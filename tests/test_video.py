"""Video files and animated GIFs end to end: clips generated here with PyAV and Pillow go through
``lrp-heatmap video`` (and ``run``); outputs are decoded again and checked against the source and an
independent computation of each frame's class and relevance."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lrp_cli.cli import app
from lrp_cli.config import Config
from lrp_cli.frames import FrameExplainer
from lrp_cli.lrp import explain
from lrp_cli.media import open_clip, subsample
from lrp_cli.models import load_model
from lrp_cli.pipeline import prepare_engine
from lrp_cli.video import _run_frames

WIDTH, HEIGHT, FRAMES, RATE = 64, 48, 15, Fraction(12)
FAST = ("--resolution", "32", "--batch-size", "8")  # video decodes in-process: no --workers there


def square_frame(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A yellow square moving right over a blue background."""
    frame = np.full((height, width, 3), (40, 110, 190), np.uint8)
    left = (index * 3) % (width - 12)
    frame[height // 3 : height // 3 + 12, left : left + 12] = (250, 220, 20)
    return frame


def write_clip(path: Path, frames: int = FRAMES, *, audio: bool = True, video: bool = True) -> None:
    """H.264 (and AAC sound, so the test can see it dropped) in MP4, encoded with PyAV."""
    with av.open(str(path), "w") as container:
        if video:
            stream = container.add_stream("libx264", rate=RATE)
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        sound = container.add_stream("aac", rate=22050, layout="mono") if audio else None
        for index in range(frames if video else 0):
            picture = av.VideoFrame.from_ndarray(square_frame(index), "rgb24")
            picture.pts = index
            container.mux(stream.encode(picture))
        if sound is not None:
            tone = np.sin(np.arange(22050, dtype=np.float32) / 10.0)[None] * 0.1
            samples = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 22050, 0
            container.mux(sound.encode(samples))
            container.mux(sound.encode(None))
        if video:
            container.mux(stream.encode(None))


def read_video(path: Path) -> tuple[list[np.ndarray], Fraction, list[str]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, stream.average_rate, [s.type for s in container.streams]


def invoke(*args: str):
    result = CliRunner().invoke(app, [*args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_clip(root / "clip.mp4")
    data = (root / "clip.mp4").read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) // 2])  # truncated: moov (at the end) is gone
    (root / "noise.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    )
    write_clip(root / "sound.mp4", video=False)  # a sound track only
    frames = [Image.fromarray(square_frame(i, 40, 30)) for i in range(5)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(root / "anim.webp", save_all=True, append_images=frames[1:4], duration=[50, 100, 150, 100])
    return root


@pytest.fixture(scope="module")
def main_run(media, tmp_path_factory):
    """One run over a good clip, an animated GIF and three unusable files."""
    out = tmp_path_factory.mktemp("out")
    names = ["clip.mp4", "anim.gif", "anim.webp", "cut.mp4", "noise.mp4", "sound.mp4"]
    result = invoke("video", *(str(media / n) for n in names), "-o", str(out), "--heatmap-video", *FAST)
    return result, out


def test_clip_round_trips_with_frame_count_size_and_rate(main_run):
    _, out = main_run
    for kind in ("overlay", "heatmap"):
        frames, rate, streams = read_video(out / f"clip.{kind}.mp4")
        assert len(frames) == FRAMES and rate == RATE and streams == ["video"]  # sound dropped
        assert frames[0].shape == (HEIGHT, WIDTH, 3)
    overlay, _, _ = read_video(out / "clip.overlay.mp4")
    for index in (0, 7, 14):  # the overlay is the frame, tinted where relevance is: close to the source
        difference = np.abs(overlay[index].astype(int) - square_frame(index)).mean()
        assert 0.5 < difference < 60
    records = lines(out / "clip.frames.jsonl")
    assert [r["frame"] for r in records] == list(range(FRAMES))
    assert [r["time"] for r in records] == pytest.approx([i / 12 for i in range(FRAMES)], abs=1e-6)
    video = {Path(r["path"]).name: r for r in lines(out / "manifest.jsonl")}["clip.mp4"]
    assert video["kind"] == "video" and video["frames"] == FRAMES and video["fps"] == 12.0
    assert (video["width"], video["height"], video["error"]) == (WIDTH, HEIGHT, None)
    assert set(video["outputs"]) == {"overlay_video", "heatmap_video", "frames"}


def test_every_frame_is_explained_as_a_photo_would_be(main_run, media):
    """Each frame's class, probability and relevance sum, against the model and the engine called directly
    on the test's own decoding and resizing of the source."""
    _, out = main_run
    loaded = load_model("efficientnet-lite0", None, None, None)
    source, _, _ = read_video(media / "clip.mp4")
    rows = [0, 6, 14]
    pixels = []
    for frame in (source[row] for row in rows):
        small = Image.fromarray(frame).resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)
        pixels.append((torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)
    x = torch.stack(pixels)
    with torch.no_grad():
        probabilities = loaded.module(x).softmax(dim=1)
    relevance = explain(loaded.module, x, composite="epsilon-plus-flat").sum(dim=(1, 2, 3))
    records = lines(out / "clip.frames.jsonl")
    for row, record in enumerate(records[row] for row in rows):
        assert record["class_index"] == int(probabilities[row].argmax())
        assert record["probability"] == pytest.approx(float(probabilities[row].max()), abs=2e-5)
        assert record["relevance_sum"] == pytest.approx(float(relevance[row]), rel=1e-3, abs=1e-9)
        assert record["label"] == loaded.label(record["class_index"])


def test_animated_gif_and_webp_give_every_frame(main_run):
    _, out = main_run
    frames, rate, _ = read_video(out / "anim.gif.overlay.mp4")
    assert len(frames) == 5 and rate == 10 and frames[0].shape == (30, 40, 3)
    assert [r["frame"] for r in lines(out / "anim.gif.frames.jsonl")] == [0, 1, 2, 3, 4]
    frames, rate, _ = read_video(out / "anim.webp.overlay.mp4")
    assert len(frames) == 4 and rate == 10  # the mean of the frame durations
    assert [r["time"] for r in lines(out / "anim.webp.frames.jsonl")] == [0.0, 0.05, 0.15, 0.3]


def test_unreadable_files_are_skipped_with_their_reason(main_run, media):
    result, out = main_run
    assert result.exit_code == 1
    reasons = {
        "cut.mp4": "not a video file FFmpeg can read",
        "noise.mp4": "not a video file FFmpeg can read",
        "sound.mp4": "no video stream in the file (streams: audio)",
    }
    records = {Path(r["path"]).name: r for r in lines(out / "manifest.jsonl")}
    for name, reason in reasons.items():
        assert f"lrp-heatmap: skipped {media / name}: {reason}" in result.stderr
        assert reason in records[name]["error"]
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith(".lrp-heatmap"))
    assert written == [
        "anim.gif.frames.jsonl", "anim.gif.heatmap.mp4", "anim.gif.overlay.mp4",
        "anim.webp.frames.jsonl", "anim.webp.heatmap.mp4", "anim.webp.overlay.mp4",
        "clip.frames.jsonl", "clip.heatmap.mp4", "clip.overlay.mp4", "manifest.jsonl",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("every", "fps", "kept", "rate"),
    [
        (4, None, [0, 4, 8, 12], Fraction(3)),
        (None, 5, [0, 3, 5, 8, 10, 12], Fraction(5)),  # the first frame at or after 0, 0.2, 0.4 ... s
        (None, 2.5, [0, 5, 10], Fraction(5, 2)),
        (None, 30, list(range(FRAMES)), RATE),  # never more frames than the source has
        (1, None, list(range(FRAMES)), RATE),
    ],
)
def test_subsampling_picks_frames_by_index_or_time(every, fps, kept, rate):
    frames = ((i, i / 12, None) for i in range(FRAMES))
    chosen, written_rate = subsample(frames, RATE, every, fps)
    assert [i for i, _, _ in chosen] == kept and written_rate == rate


def test_every_and_fps_together_is_a_usage_error(media, tmp_path):
    result = invoke("video", str(media / "clip.mp4"), "-o", str(tmp_path), "--every", "2", "--fps", "3")
    assert result.exit_code == 2
    assert "--every and --fps both subsample: give one of them" in result.stderr


def test_every_and_resume_skip_finished_videos_and_redo_missing_ones(media, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a.mp4", "b.mp4"):
        os.link(media / "clip.mp4", clips / name)
    out = tmp_path / "out"
    assert invoke("video", str(clips), "-o", str(out), "--every", "5", *FAST).exit_code == 0
    kept = (out / "a.overlay.mp4").stat().st_mtime_ns
    (out / "b.overlay.mp4").unlink()
    result = invoke("video", str(clips), "-o", str(out), "--every", "5", "--resume", *FAST)
    assert result.exit_code == 0, result.stderr
    assert (out / "a.overlay.mp4").stat().st_mtime_ns == kept  # finished: not done again
    frames, rate, _ = read_video(out / "b.overlay.mp4")
    assert len(frames) == 3 and rate == RATE / 5  # --every 5: frames 0, 5 and 10, as long as the source
    assert [r["frame"] for r in lines(out / "b.frames.jsonl")] == [0, 5, 10]
    assert [Path(r["path"]).name for r in lines(out / "manifest.jsonl")] == ["a.mp4", "b.mp4", "b.mp4"]


def test_run_hands_videos_to_the_same_path_and_names_animated_gifs(media, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    os.link(media / "clip.mp4", folder / "clip.mp4")
    os.link(media / "anim.gif", folder / "anim.gif")
    out = tmp_path / "out"
    result = invoke("run", str(folder), "-o", str(out), "--workers", "0", *FAST)
    assert result.exit_code == 0, result.stderr
    assert f"{folder / 'anim.gif'} is animated: explained its first frame only" in result.stderr
    records = {Path(r["path"]).name: r for r in lines(out / "manifest.jsonl")}
    assert records["clip.mp4"]["kind"] == "video" and records["clip.mp4"]["frames"] == FRAMES
    assert set(records["anim.gif"]["outputs"]) >= {"heatmap", "overlay"}
    assert len(read_video(out / "clip.overlay.mp4")[0]) == FRAMES


def test_both_schedules_write_every_frame_once_in_order(media):
    """The CPU's schedule (engine and video work take turns) and an accelerator's (they overlap, a batch or
    two apart) hand ``write`` the same frames, in the source's order, each with its own picture and the
    same answers."""
    config = Config(device="cpu", resolution=32, batch_size=4, workers=0)
    loaded = load_model(config.model)
    device, engine = prepare_engine(config, loaded)
    explainer = FrameExplainer(config, loaded, engine, device)

    def schedule(overlap: bool) -> list[tuple[int, int, float, bool]]:
        rows = []

        def write(entry, result, pictures) -> None:
            own = np.array_equal(pictures[0], entry[2][:, ::-1])
            rows.append((entry[0], result.class_index, result.relevance_sum, own))

        clip = open_clip(media / "clip.mp4", config.max_pixels, threads=0 if overlap else 1)
        _run_frames(clip.frames, explainer, lambda frame, result: [frame[:, ::-1]], write, overlap)
        return rows

    taking_turns = schedule(False)
    assert [row[0] for row in taking_turns] == list(range(FRAMES))  # batches of 4, 4, 4 and 3
    assert all(row[3] for row in taking_turns)
    assert schedule(True) == taking_turns
