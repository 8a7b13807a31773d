"""Region perturbation: lrp-heatmap's batched metric against Quantus 0.6's RegionPerturbation.

The same work for both: the same images, maps (LRP maps of two settings from the engine), both orders
(MoRF and LeRF), the same patch size, regions and baseline, on the same model. Quantus runs one forward
pass per step over its batch of images; ours scores every perturbed image of every map and order in
batches of ``--eval-batch-size``. The two alternate over ``--rounds`` rounds in one process and the
medians are compared; each round also checks that the curves agree (largest difference).

    python benchmarks/bench_evaluate.py --output docs/benchmark-evaluate-cpu.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import quantus
import torch
from torch import nn

from lrp_cli.data import ImageDataset, discover
from lrp_cli.faithfulness import ORDERS, RegionPerturbation, region_perturbation
from lrp_cli.lrp import Explainer
from lrp_cli.models import load_model

ROOT = Path(__file__).resolve().parent.parent


def photos(resolution: int, mean: list[float], std: list[float]) -> torch.Tensor:
    items = discover([str(ROOT / "input")])
    dataset = ImageDataset(items, resolution, "squash", mean, std, 10**9)
    return torch.stack([dataset[i][1] for i in range(len(dataset))])


def quantus_run(
    model: nn.Module, x: np.ndarray, maps: np.ndarray, y: np.ndarray, settings: RegionPerturbation
):
    curves = {}
    for order in ORDERS:
        for index, attribution in enumerate(maps):
            metric = quantus.RegionPerturbation(
                patch_size=settings.patch_size, order=order, regions_evaluation=settings.regions,
                perturb_baseline=settings.baseline, disable_warnings=True,
            )  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = metric(model=model, x_batch=x, y_batch=y, a_batch=attribution[:, None], device="cpu")
            curves[order, index] = np.array(scores)
    return curves


def workload(name: str, model: nn.Module, x: torch.Tensor, maps: np.ndarray, args: argparse.Namespace) -> str:
    model.eval()
    with torch.inference_mode():
        y = model(x).argmax(dim=1).numpy()
    settings = RegionPerturbation(patch_size=8, regions=args.regions)
    ours_s, theirs_s, differences = [], [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        ours = region_perturbation(model, x, maps, y, settings, batch_size=args.eval_batch_size)
        ours_s.append(time.perf_counter() - started)
        model.to(memory_format=torch.contiguous_format)  # Quantus gets the model as the user made it
        started = time.perf_counter()
        theirs = quantus_run(model, x.numpy(), maps, y, settings)
        theirs_s.append(time.perf_counter() - started)
        differences.append(max(np.abs(ours.drops[o][i] - c).max() for (o, i), c in theirs.items()))
    ratio = statistics.median(theirs_s) / statistics.median(ours_s)
    steps = len(maps) * len(ORDERS) * settings.regions * len(x)
    return (
        f"{name}: {len(x)} images {tuple(x.shape[-2:])}, {len(maps)} maps x 2 orders x {settings.regions} "
        f"regions = {steps} perturbed images ({ours.forwards - len(x)} distinct)\n"
        f"  lrp-heatmap (batch {args.eval_batch_size}): median {statistics.median(ours_s):.2f} s "
        f"(rounds: {', '.join(f'{s:.2f}' for s in ours_s)})\n"
        f"  Quantus {quantus.__version__}:        median {statistics.median(theirs_s):.2f} s "
        f"(rounds: {', '.join(f'{s:.2f}' for s in theirs_s)})\n"
        f"  speed-up {ratio:.1f}x; largest curve difference {max(differences):.1e}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--regions", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    report = [
        f"bench_evaluate.py --rounds {args.rounds} --regions {args.regions} --resolution {args.resolution}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f} at the start",
        "",
    ]
    loaded = load_model("efficientnet-lite0")
    x = photos(args.resolution, loaded.mean, loaded.std)
    maps = np.stack([
        Explainer(loaded.module, composite, topk, mean=loaded.mean, std=loaded.std)(x).relevance.sum(1).numpy()
        for composite, topk in (("epsilon-plus-flat", 1.0), ("seed", 0.05))
    ])  # fmt: skip
    report.append(workload("efficientnet-lite0 (embedded), input/ photos", loaded.module, x, maps, args))
    small = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    x_small = torch.randn(16, 3, 64, 64)
    maps_small = np.random.default_rng(0).normal(size=(2, 16, 64, 64)).astype(np.float32)
    report.append(workload("small random CNN, random images and maps", small, x_small, maps_small, args))
    text = "\n".join(report)
    print(text)
    if args.output is not None:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
