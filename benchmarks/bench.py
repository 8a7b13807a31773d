"""Throughput of lrp-heatmap's engine against its peers on the same weights and inputs.

VGG16 has seeded random weights (nothing is downloaded); the embedded EfficientNet-Lite0 its real ones.
Every method runs alone in a fresh process (no heap, cache or thread-pool state carried over from
another method), with the allocator settings ``lrp-heatmap`` uses (``retain_freed_memory``); the
methods are interleaved over ``--rounds`` passes, so a machine whose speed drifts over minutes treats
them alike. A figure is the median over every round's ``--repeats`` timed runs, each round after
``--warmups`` untimed calls (the heap takes a few calls to reach its steady size); peak memory is the
resident-set growth from after the model is built to the end (warm-up included, so rule weights and
Winograd filters count), sampled every 5 ms.

    python benchmarks/bench.py                 # everything (about 15 minutes on 2 CPU cores)
    python benchmarks/bench.py --skip-e2e      # engines only

Peers: a plain forward pass (the reference: LRP needs about three forward-equivalents, so forward/3 is
the bound for direct convolutions; Winograd's fewer multiplications let the engine pass it), Zennit's z+,
the seed implementation's ``LRPModel`` (its algorithm rebuilt here from the blog post, see
:func:`seed_lrpmodel`) and Captum's LRP (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import copy
import json
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


def seed_lrpmodel(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The seed implementation's ``LRPModel`` algorithm for VGG, rebuilt from its blog post.

    The layers run in order (features, average pool, flatten, classifier) and every activation is kept,
    the image itself replaced by ones; then, from the softmax output back to the input, each layer's
    relevance is split by the gradient trick on a copy of the layer: weights clamped to their positive
    part and biases zeroed (z+, as new ``Parameter`` s, so autograd also computes their gradients, as in
    the seed), ``z = layer(a) + eps``, ``s = r / z``, ``(z * s).sum().backward()``, ``r = a * a.grad``.
    Max pools propagate as average pools of the same window, the other pools through themselves;
    activations and dropout pass relevance through unchanged.
    """
    eps = 1.0e-5
    layers = [*model.features, model.avgpool, torch.nn.Flatten(1), *model.classifier]
    relevance_layers: list[torch.nn.Module | None] = []
    for layer in layers:
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            copied = copy.deepcopy(layer)
            copied.weight = torch.nn.Parameter(layer.weight.clamp(min=0.0))
            copied.bias = torch.nn.Parameter(torch.zeros_like(layer.bias))
            relevance_layers.append(copied)
        elif isinstance(layer, torch.nn.MaxPool2d):
            relevance_layers.append(torch.nn.AvgPool2d(layer.kernel_size, layer.stride))
        elif isinstance(layer, (torch.nn.AdaptiveAvgPool2d, torch.nn.AvgPool2d)):
            relevance_layers.append(layer)
        else:  # ReLU, Dropout, Flatten: relevance passes as it is (reshaped for Flatten)
            relevance_layers.append(None)

    def run() -> torch.Tensor:
        with torch.no_grad():
            activations = [x]
            for layer in layers:
                activations.append(layer(activations[-1]))
            activations[0] = torch.ones_like(x)
        relevance = torch.softmax(activations[-1], dim=-1)
        for layer, a in zip(reversed(relevance_layers), reversed(activations[:-1])):
            if layer is None:
                relevance = relevance.reshape(a.shape)
                continue
            a = a.detach().requires_grad_(True)
            z = layer(a) + eps
            s = (relevance / z).data
            (z * s).sum().backward()
            relevance = (a * a.grad).data
        return relevance

    return run


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def _vgg(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.vgg16().eval(), torch.randn(
        args.batch_size, 3, args.resolution, args.resolution
    )


def _lite0(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    from lrp_cli.models import load_model

    torch.manual_seed(0)
    return load_model("efficientnet-lite0").module, torch.randn(args.batch_size, 3, 224, 224)


def _forward(model: torch.nn.Module, x: torch.Tensor, channels_last: bool) -> Callable[[], object]:
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def _explainer(
    model: torch.nn.Module, x: torch.Tensor, *args: object, **options: object
) -> Callable[[], object]:
    explainer = Explainer(model, *args, **options)  # type: ignore[arg-type]
    return lambda: explainer(x)


# name: (label, model builder, method builder). Each runs alone in a fresh process.
METHODS: dict[str, tuple[str, Callable, Callable]] = {
    "forward": ("forward (reference)", _vgg, lambda m, x: _forward(m, x, False)),
    "forward_cl": ("forward, channels_last", _vgg, lambda m, x: _forward(m, x, True)),
    "ours": ("lrp-heatmap seed, topk 1.0", _vgg, lambda m, x: _explainer(m, x, "seed", 1.0)),
    "ours_topk": ("lrp-heatmap seed, topk 0.05", _vgg, lambda m, x: _explainer(m, x, "seed", 0.05)),
    "ours_direct": (
        "lrp-heatmap seed, direct convolutions",
        _vgg,
        lambda m, x: _explainer(m, x, "seed", 1.0, winograd=False),
    ),
    "ours_cold": (
        "lrp-heatmap seed, traced every call",
        _vgg,
        lambda m, x: lambda: Explainer(m, "seed", 1.0)(x),
    ),
    "zennit": ("Zennit 0.5.1 z+", _vgg, zennit_zplus),
    "seed_lrp": ("seed implementation's LRPModel (rebuilt)", _vgg, seed_lrpmodel),
    "captum": ("Captum 0.9 LRP", _vgg, captum_lrp),
    "bf16": ("lrp-heatmap seed, bf16", _vgg, lambda m, x: _explainer(m, x, "seed", 1.0, precision="bf16")),
    "lite_forward": ("forward", _lite0, lambda m, x: _forward(m, x, False)),
    "lite_ours": (
        "lrp-heatmap epsilon-plus-flat",
        _lite0,
        lambda m, x: _explainer(m, x, "epsilon-plus-flat"),
    ),
    "lite_seed": ("lrp-heatmap seed, topk 0.05", _lite0, lambda m, x: _explainer(m, x, "seed", 0.05)),
    "lite_zennit": ("Zennit z+ (no canonizer)", _lite0, zennit_zplus),
}


def agreement(args: argparse.Namespace, options: dict[str, object]) -> list[float]:
    """Pearson r per image between seed heatmaps with ``options`` and the fp32 direct-convolution ones."""
    model, x = _vgg(args)
    reference = Explainer(model, "seed", winograd=False)(x).relevance
    other = Explainer(model, "seed", **options)(x).relevance  # type: ignore[arg-type]
    return [pearson(a, b) for a, b in zip(reference, other)]


def child(args: argparse.Namespace) -> None:
    """Time one method in this (fresh) process and print its figures as one JSON line."""
    if not args.glibc_defaults:
        retain_freed_memory()  # as lrp-heatmap does; every method runs under the same allocator settings
    torch.set_num_threads(args.threads)
    _, build_model, build_method = METHODS[args.method]
    model, x = build_model(args)
    times = []
    with PeakMemory() as memory:
        fn = build_method(model, x)
        for _ in range(args.warmups):  # what a method builds on its first call counts towards its peak;
            fn()  # later calls still grow the heap to its steady size (page faults) before it settles
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    print(json.dumps({"times": times, "peak": memory.peak / 2**20}))


def measure_all(args: argparse.Namespace, names: list[str]) -> dict[str, tuple[float, float]]:
    """images/s (median over every round's repeats) and peak MiB per method; rounds interleave the
    methods so that a machine whose speed drifts over minutes treats them alike."""
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, float] = {name: 0.0 for name in names}
    for _ in range(args.rounds):
        for name in names:
            command = [sys.executable, __file__, "--method", name, "--repeats", str(args.repeats)]
            command += ["--warmups", str(args.warmups)]
            command += ["--batch-size", str(args.batch_size), "--resolution", str(args.resolution)]
            command += ["--threads", str(args.threads)] + (
                ["--glibc-defaults"] if args.glibc_defaults else []
            )
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            times[name] += figures["times"]
            peaks[name] = max(peaks[name], figures["peak"])
    return {name: (args.batch_size / statistics.median(times[name]), peaks[name]) for name in names}


def engines(args: argparse.Namespace) -> dict[str, float]:
    names = ["forward", "forward_cl", "ours", "ours_topk", "ours_direct", "ours_cold"]
    names += ["zennit", "seed_lrp", "captum"]  # the peers
    names += ["bf16"] if args.bf16 else []
    print(f"VGG16 {args.resolution}x{args.resolution}, batch {args.batch_size}, {args.threads} threads")
    figures = measure_all(args, names)
    for name in names:
        rate, peak = figures[name]
        print(f"  {METHODS[name][0]:<42} {rate:7.2f} img/s  peak +{peak:6.0f} MiB")
    rate = {name: figures[name][0] for name in names}
    forward = max(rate["forward"], rate["forward_cl"])
    ours, zennit = rate["ours"], rate["zennit"]
    print()
    print(
        f"  ours / Zennit z+          {ours / zennit:5.2f}x   (topk 0.05: {rate['ours_topk'] / zennit:5.2f}x)"
    )
    print(f"  ours / seed's LRPModel    {ours / rate['seed_lrp']:5.2f}x")
    print(f"  ours / Captum LRP         {ours / rate['captum']:5.2f}x")
    print(f"  ours / (forward / 3)      {ours / (forward / 3):5.2f}")
    print(f"  topk 0.05 cost over 1.0   {(ours / rate['ours_topk'] - 1) * 100:+5.1f} %")
    winograd_r = agreement(args, {})
    print(
        f"  Winograd over direct      {ours / rate['ours_direct']:5.2f}x, heatmaps Pearson r min {min(winograd_r):.6f}"
    )
    if args.bf16:
        rs = agreement(args, {"precision": "bf16"})
        print(f"  bf16 / Zennit z+          {rate['bf16'] / zennit:5.2f}x")
        print(
            f"  bf16 vs fp32 heatmaps: Pearson r per image min {min(rs):.4f}, mean {statistics.mean(rs):.4f}"
        )
    print()
    return rate


def embedded(args: argparse.Namespace) -> float:
    names = ["lite_forward", "lite_ours", "lite_seed", "lite_zennit"]
    print(f"EfficientNet-Lite0 (embedded) 224x224, batch {args.batch_size}")
    figures = measure_all(args, names)
    for name in names:
        rate, peak = figures[name]
        print(f"  {METHODS[name][0]:<42} {rate:7.2f} img/s  peak +{peak:6.0f} MiB")
    forward, ours, zennit = (figures[name][0] for name in ("lite_forward", "lite_ours", "lite_zennit"))
    print(f"  ours / (forward / 3)  {ours / (forward / 3):5.2f};  ours / Zennit {ours / zennit:5.2f}x\n")
    return ours


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
    parser.add_argument("--rounds", type=int, default=2, help="interleaved passes over all methods")
    parser.add_argument("--warmups", type=int, default=3, help="untimed calls before the timed ones")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--bf16", action="store_true", help="also time bf16 (slow on CPUs without AMX/AVX512-BF16)"
    )
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="run every method with glibc's default allocator settings instead of lrp-heatmap's",
    )
    parser.add_argument("--method", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        child(args)
        return
    print(f"torch {torch.__version__}, {sys.platform}, CUDA available: {torch.cuda.is_available()}\n")
    figures = engines(args)
    engine_rate = embedded(args)
    if not args.skip_e2e:
        end_to_end(args, "efficientnet-lite0", "epsilon-plus-flat", engine_rate)
        # VGG16 with seeded random weights via its factory: nothing to download
        end_to_end(args, "torchvision.models:vgg16", "seed", figures["ours"])


if __name__ == "__main__":
    main()
