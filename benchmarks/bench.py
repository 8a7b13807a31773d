"""Throughput of lrp-heatmap's engine against its peers, all measured in this one process.

Same model weights (seeded random init for VGG16, so nothing is downloaded; the embedded
EfficientNet-Lite0 weights) and the same inputs for every method. Each figure is the median of
``--repeats`` timed runs after one warm-up; peak memory is the resident-set growth from just before
the warm-up (after handing the heap's free memory back to the kernel), sampled every 5 ms. The process
keeps freed memory for reuse as ``lrp-heatmap`` does (``retain_freed_memory``), for every method alike.

    python benchmarks/bench.py                 # everything (about 10 minutes on 2 CPU cores)
    python benchmarks/bench.py --skip-e2e      # engines only

Peers: a plain forward pass (the reference: LRP needs about three forward-equivalents, so forward/3 is
the bound for direct convolutions; Winograd's fewer multiplications let the engine pass it), Zennit's z+
and Captum's LRP (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from lrp_cli.lrp import Explainer, release_freed_memory, retain_freed_memory

ROOT = Path(__file__).resolve().parent.parent


class PeakMemory:
    """Peak resident-set size above the starting level, read from /proc while the block runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def __enter__(self) -> PeakMemory:
        release_freed_memory()  # what earlier methods left in the heap must not hide this one's growth
        self.base = self.rss()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss() - self.base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median seconds after one warm-up call, peak MiB): the peak counts from before the warm-up, so
    whatever a method builds on its first call (rule weights, Winograd filters) is included."""
    times = []
    with PeakMemory() as memory:
        fn()
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times), memory.peak / 2**20


def zennit_zplus(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    from zennit.attribution import Gradient
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.rules import ZPlus
    from zennit.types import Convolution

    composite = LayerMapComposite(
        layer_map=[*layer_map_base(), (Convolution, ZPlus()), (torch.nn.Linear, ZPlus())]
    )
    grad = torch.eye(1000)[[0] * x.shape[0]]

    def run() -> torch.Tensor:
        with Gradient(model=model, composite=composite) as attributor:
            return attributor(x, grad)[1]

    return run


def captum_lrp(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    from captum.attr import LRP

    own = copy.deepcopy(model)  # Captum attaches rules to the model it is given
    for module in own.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    lrp = LRP(own)
    return lambda: lrp.attribute(x, target=0)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def engines(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16().eval()
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution)
    n = args.batch_size
    rows: list[tuple[str, float, float]] = []

    def measure(name: str, fn: Callable[[], object]) -> float:
        seconds, peak = timed(fn, args.repeats)
        rows.append((name, n / seconds, peak))
        print(f"  {name:<42} {n / seconds:7.2f} img/s  peak +{peak:7.0f} MiB", flush=True)
        return n / seconds

    print(f"VGG16 {args.resolution}x{args.resolution}, batch {n}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        forward = measure("forward (reference)", lambda: vgg(x))
        cl_model = copy.deepcopy(vgg).to(memory_format=torch.channels_last)
        cl_x = x.contiguous(memory_format=torch.channels_last)
        forward_cl = measure("forward, channels_last", lambda: cl_model(cl_x))
    best_forward = max(forward, forward_cl)
    ours = measure("lrp-heatmap seed, topk 1.0", lambda: Explainer(vgg, "seed", 1.0)(x))
    seed = Explainer(vgg, "seed", 1.0)
    ours_reused = measure("lrp-heatmap seed, topk 1.0 (reused)", lambda: seed(x))
    filtered = Explainer(vgg, "seed", 0.05)
    ours_topk = measure("lrp-heatmap seed, topk 0.05 (reused)", lambda: filtered(x))
    direct = Explainer(vgg, "seed", 1.0, winograd=False)
    ours_direct = measure("lrp-heatmap seed, direct convs (reused)", lambda: direct(x))
    winograd_r = min(pearson(a, b) for a, b in zip(seed(x).relevance, direct(x).relevance))
    zplus = Explainer(vgg, "zplus", 1.0)
    measure("lrp-heatmap zplus (reused)", lambda: zplus(x))
    zennit = measure("Zennit z+", zennit_zplus(vgg, x))
    captum = measure("Captum LRP", captum_lrp(vgg, x))
    figures = {
        "forward": best_forward,
        "ours": ours_reused,
        "ours_topk": ours_topk,
        "zennit": zennit,
        "captum": captum,
        "ours_with_tracing": ours,
        "ours_direct": ours_direct,
    }
    if args.bf16:
        low = Explainer(vgg, "seed", 1.0, precision="bf16")
        figures["bf16"] = measure("lrp-heatmap seed, bf16 (reused)", lambda: low(x))
        full, half = seed(x).relevance, low(x).relevance
        rs = [pearson(a, b) for a, b in zip(full, half)]
        figures["bf16_min_r"] = min(rs)
        print(
            f"  bf16 vs fp32 heatmaps: Pearson r per image min {min(rs):.4f}, mean {statistics.mean(rs):.4f}"
        )
    print()
    print(
        f"  ours / Zennit z+          {ours_reused / zennit:5.2f}x   (topk 0.05: {ours_topk / zennit:5.2f}x)"
    )
    print(f"  ours / Captum LRP         {ours_reused / captum:5.2f}x")
    print(f"  ours / (forward / 3)      {ours_reused / (best_forward / 3):5.2f}")
    print(f"  topk 0.05 cost over 1.0   {(ours_reused / ours_topk - 1) * 100:+5.1f} %")
    print(
        f"  Winograd over direct      {ours_reused / ours_direct:5.2f}x, heatmaps Pearson r min {winograd_r:.6f}"
    )
    if args.bf16:
        print(f"  bf16 / Zennit z+          {figures['bf16'] / zennit:5.2f}x")
    print()
    return figures


def embedded(args: argparse.Namespace) -> float:
    from lrp_cli.models import load_model

    loaded = load_model("efficientnet-lite0")
    model = loaded.module
    x = torch.randn(args.batch_size, 3, 224, 224)
    n = args.batch_size
    print(f"EfficientNet-Lite0 (embedded) 224x224, batch {n}")
    with torch.no_grad():
        forward, _ = timed(lambda: model(x), args.repeats)
    explainer = Explainer(model, "epsilon-plus-flat", 1.0)
    ours, peak = timed(lambda: explainer(x), args.repeats)
    seed = Explainer(model, "seed", 0.05)
    ours_seed, _ = timed(lambda: seed(x), args.repeats)
    zennit, _ = timed(zennit_zplus(model, x), args.repeats)
    print(f"  forward                                  {n / forward:7.2f} img/s")
    print(f"  lrp-heatmap epsilon-plus-flat            {n / ours:7.2f} img/s  peak +{peak:5.0f} MiB")
    print(f"  lrp-heatmap seed, topk 0.05              {n / ours_seed:7.2f} img/s")
    print(f"  Zennit z+ (no canonizer)                 {n / zennit:7.2f} img/s")
    print(
        f"  ours / (forward / 3) {(n / ours) / (n / forward / 3):5.2f};  ours / Zennit {zennit / ours:5.2f}x\n"
    )
    return n / ours


def end_to_end(args: argparse.Namespace, model: str, composite: str, engine_rate: float) -> None:
    """``lrp-heatmap run`` over 64 photos (decode, resize, LRP, colormap, image writes) vs the engine alone.

    Run as users run it, in a fresh process; each manifest record is timestamped as it streams out
    (``--json``). Steady state: the images after the first batch over the time they took, which shows
    whether decoding and writing keep up with the engine; the total includes interpreter start, model
    loading and tracing.
    """
    photos = [p for p in sorted((ROOT / "input").glob("*.*")) if p.suffix.lower() in {".png", ".jpg"}]
    folder = Path(tempfile.mkdtemp(prefix="lrp-bench-"))
    try:
        for i in range(64):
            source = photos[i % len(photos)]
            shutil.copy(source, folder / f"photo{i:02d}{source.suffix}")
        command = [
            sys.executable,
            "-m",
            "lrp_cli",
            "run",
            str(folder),
            "--json",
            "--output",
            str(folder / "out"),
        ]
        command += ["--model", model, "--composite", composite, "--batch-size", str(args.batch_size)]
        command += ["--workers", "2"]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert process.stdout is not None
        stamps = [time.perf_counter() for _ in process.stdout]
        code = process.wait()
        total = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    first = args.batch_size
    steady = (len(stamps) - first) / (stamps[-1] - stamps[first - 1])
    print(f"lrp-heatmap run, 64 photos, {model}, {composite}, batch {args.batch_size} (exit {code})")
    print(f"  steady state {steady:6.2f} img/s = {steady / engine_rate:4.2f} of the engine alone")
    print(f"  cold total   {64 / total:6.2f} img/s (interpreter start, model loading, tracing included)\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--bf16", action="store_true", help="also time bf16 (slow on CPUs without AMX/AVX512-BF16)"
    )
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    retain_freed_memory()  # as lrp-heatmap does; every method below runs under the same allocator settings
    print(f"torch {torch.__version__}, {sys.platform}, CUDA available: {torch.cuda.is_available()}\n")
    figures = engines(args)
    engine_rate = embedded(args)
    if not args.skip_e2e:
        end_to_end(args, "efficientnet-lite0", "epsilon-plus-flat", engine_rate)
        # VGG16 with seeded random weights via its factory: nothing to download
        end_to_end(args, "torchvision.models:vgg16", "seed", figures["ours"])


if __name__ == "__main__":
    main()
