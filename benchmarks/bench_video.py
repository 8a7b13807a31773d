"""Video throughput: frames per second end to end against the engine alone, at the same batch size.

A clip is generated here (``--width`` x ``--height``, ``--frames`` frames at 25 fps, H.264: a moving
square and a drifting gradient over a textured background). In one process, with one engine (the
embedded EfficientNet-Lite0, ``epsilon-plus-flat``, 224x224, batch ``--batch-size``, CPU):

- **engine only**: the clip's frames decoded, resized and normalised beforehand, then every batch
  through the engine (``HalvingExplainer``, as ``lrp-heatmap video`` calls it), relevance handed back as
  numpy;
- **end to end**: ``lrp_cli.video.explain_video`` on the file: decoding, resizing, normalising, the
  engine, the overlay at the source's size, H.264 encoding, the per-frame JSONL and the atomic renames
  (on the CPU the engine's batches and this work take turns, each with every core).

The two alternate over ``--rounds`` rounds after one warm-up each; figures are medians, and the ratio
is taken within each round (the machine's speed drifts over minutes) and its median reported. Besides
wall time, the process's CPU time (all threads) per frame is reported: on a machine loaded by other jobs
the scheduler shares the cores out per thread, so the end-to-end run (more threads) gets more of them and
the wall-time ratio flatters it; the CPU-time ratio (engine CPU over end-to-end CPU) is what the extra
work costs, and on a quiet machine the wall-time ratio comes close to it (a little below: the video work
between the engine's batches does not keep both cores quite as busy as the engine does).

    python benchmarks/bench_video.py --rounds 5    # output and notes: docs/benchmark-video-cpu.txt
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from lrp_cli.config import Config
from lrp_cli.data import ImageItem
from lrp_cli.frames import FrameExplainer
from lrp_cli.models import load_model
from lrp_cli.pipeline import prepare_engine
from lrp_cli.video import VideoOptions, explain_video


def make_clip(path: Path, width: int, height: int, frames: int) -> None:
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            shade = ((xs + ys + 4 * index) % 256 * 0.6).astype(np.uint8)
            frame = np.stack([shade, 255 - shade, np.full_like(shade, 90)], axis=-1) + texture
            left = (index * 9) % (width - height // 3)
            frame[height // 3 : 2 * height // 3, left : left + height // 3] = (250, 210, 30)
            picture = av.VideoFrame.from_ndarray(frame, "rgb24")
            picture.pts = index
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))


def engine_only(frames: FrameExplainer, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every thread of the process)."""
    started, cpu = time.perf_counter(), time.process_time()
    for pixels in batches:
        frames.engine(pixels)
    return time.perf_counter() - started, time.process_time() - cpu


def end_to_end(frames: FrameExplainer, item: ImageItem, out_dir: Path) -> tuple[float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    record = explain_video(item, frames, out_dir, VideoOptions(), io.StringIO())
    elapsed = time.perf_counter() - started, time.process_time() - cpu
    assert record["error"] is None, record["error"]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Config(device="cpu", batch_size=args.batch_size, workers=0)
    loaded = load_model(config.model)
    device, explainer = prepare_engine(config, loaded)
    frames = FrameExplainer(config, loaded, explainer, device, sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        clip = Path(folder) / "clip.mp4"
        make_clip(clip, args.width, args.height, args.frames)
        item = ImageItem(clip, Path("clip"))
        with av.open(str(clip)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
        pixels = frames.pixels(np.stack([frames.resized(f) for f in decoded]))
        batches = list(pixels.split(args.batch_size))
        engine_only(frames, batches[:1])
        end_to_end(frames, item, Path(folder) / "out")
        engine_times, e2e_times = [], []
        for _ in range(args.rounds):
            engine_times.append(engine_only(frames, batches))
            e2e_times.append(end_to_end(frames, item, Path(folder) / "out"))
    engine_rate = [args.frames / wall for wall, _ in engine_times]
    e2e_rate = [args.frames / wall for wall, _ in e2e_times]
    ratios = [e / g for e, g in zip(e2e_rate, engine_rate, strict=True)]
    engine_cpu = [cpu / args.frames * 1000 for _, cpu in engine_times]
    e2e_cpu = [cpu / args.frames * 1000 for _, cpu in e2e_times]
    cpu_ratios = [g / e for e, g in zip(e2e_cpu, engine_cpu, strict=True)]
    print(f"# python {' '.join(sys.argv)}")
    print(f"# bench_video: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, PyAV {av.__version__}")  # fmt: skip
    print(f"# clip {args.width}x{args.height}, {args.frames} frames, H.264; model {loaded.name} "
          f"({config.composite}) at {config.resolution}x{config.resolution}, batch {args.batch_size}, "
          f"{args.rounds} rounds")  # fmt: skip
    print(f"engine only   {statistics.median(engine_rate):7.2f} frames/s  (rounds: "
          f"{', '.join(f'{r:.2f}' for r in engine_rate)})")  # fmt: skip
    print(f"end to end    {statistics.median(e2e_rate):7.2f} frames/s  (rounds: "
          f"{', '.join(f'{r:.2f}' for r in e2e_rate)})")  # fmt: skip
    print(f"end to end / engine only: {statistics.median(ratios):.3f} (median of per-round ratios: "
          f"{', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip
    print(f"CPU time per frame, all threads: engine only {statistics.median(engine_cpu):.1f} ms, end to end "
          f"{statistics.median(e2e_cpu):.1f} ms")  # fmt: skip
    print(f"engine CPU / end-to-end CPU: {statistics.median(cpu_ratios):.3f} (median of per-round ratios: "
          f"{', '.join(f'{r:.3f}' for r in cpu_ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
