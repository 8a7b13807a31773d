"""Training throughput of ``lrp-heatmap train`` by precision: images per second of whole epochs (decoding,
augmentation, forward, backward, optimizer step) on generated shapes, a model from scratch (no download).

The precisions are interleaved over ``--rounds`` (machines drift over minutes) and a figure is the median
over rounds of each run's epochs after the first (cuDNN tuning, worker start-up). For the GPU figure
the issue asks for::

    python benchmarks/bench_train.py --device cuda --model resnet18 --resolution 224 --images 1536 \\
        --batch-size 128 --workers 8 --precisions fp32,bf16,fp16 --out docs/benchmark-train-cuda.txt
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lrp_cli.config import load_config
from lrp_cli.training.loop import train
from lrp_cli.training.shapes import CLASSES, write_shapes


def one_run(data: Path, out: Path, options: argparse.Namespace, precision: str) -> list[float]:
    config = load_config(
        None,
        {
            "model": options.model,
            "device": options.device,
            "resolution": options.resolution,
            "workers": options.workers,
            "train": {
                "output": str(out),
                "epochs": options.epochs,
                "batch_size": options.batch_size,
                "precision": precision,
                "pretrained": False,
                "val_fraction": 0.0,
            },
        },
    )
    assert train(config, data, quiet=True) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [record["images_per_second"] for record in records[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--images", type=int, default=1536, help="images in the generated data set")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is not counted")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    options = parser.parse_args()
    precisions = options.precisions.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        data = write_shapes(Path(scratch) / "data", options.images // len(CLASSES), size=options.resolution)
        speeds: dict[str, list[float]] = {p: [] for p in precisions}
        for round_number in range(options.rounds):
            for precision in precisions:
                began = time.perf_counter()
                epochs = one_run(data, Path(scratch) / f"run-{round_number}-{precision}", options, precision)
                speeds[precision].append(statistics.median(epochs))
                print(f"round {round_number + 1} {precision}: {epochs} images/s ({time.perf_counter() - began:.0f} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available() and options.device != "cpu"
        else platform.processor() or "cpu"
    )
    lines = [
        f"lrp-heatmap train throughput: {options.model} from scratch, {options.resolution}x{options.resolution}, "
        f"batch {options.batch_size}, {options.images} generated images, {options.workers} workers, on {device}; "
        f"torch {torch.__version__}; median over {options.rounds} interleaved rounds of epochs 2..{options.epochs}",
        f"{'precision':<10} {'images/s':>10} {'vs fp32':>8}",
    ]
    base = statistics.median(speeds["fp32"]) if "fp32" in speeds else None
    for precision, values in speeds.items():
        value = statistics.median(values)
        ratio = f"{value / base:.2f}x" if base else ""
        lines.append(f"{precision:<10} {value:>10.1f} {ratio:>8}")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if options.out:
        options.out.write_text(report)


if __name__ == "__main__":
    main()
