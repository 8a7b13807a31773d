"""What the relevance filter (``--topk``) costs inside the engine, per model and per layer family.

For each model one explainer runs with ``topk 1.0`` (no filter) and one with ``topk 0.05``, in the
same process, alternating call by call over ``--rounds`` rounds (this machine's speed drifts by
10-20% over minutes, so both see the same drift), after one warm-up call each. Two figures:

- **added**: how much longer the filtered pass takes, t(0.05) / t(1.0) - 1 within each round (the
  two calls back to back, in alternating order), median over the rounds;
- **in the filter**: the time spent inside the engine's filter calls over the filtered pass's time,
  timed call by call (far less noisy than a difference of two passes), also split by the family of
  the layer the relevance enters (conv, linear, pool); median over the rounds.

Models: VGG16 and ResNet50 (torchvision, seeded random weights: nothing is downloaded) and the
embedded EfficientNet-Lite0, all with the ``seed`` composite, batch 8 at 224x224, 2 threads.

    python benchmarks/bench_filter.py | tee docs/benchmark-filter-cpu.txt
    python benchmarks/bench_filter.py --device cuda --precision bf16 --batch-size 64

On a GPU every call is bracketed by CUDA events (no synchronisation inside the pass) and each pass
by a synchronisation.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torchvision

from lrp_cli.lrp import Explainer, retain_freed_memory
from lrp_cli.lrp import engine as engine_module
from lrp_cli.lrp.ops.pooling import Pool
from lrp_cli.lrp.ops.weighted import Weighted

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "vgg16": lambda: torchvision.models.vgg16(),
    "resnet50": lambda: torchvision.models.resnet50(),
    "efficientnet-lite0": lambda: _embedded(),
}


def _embedded() -> torch.nn.Module:
    from lrp_cli.models import load_model

    return load_model("efficientnet-lite0").module


def family(step: Any) -> str:
    """conv, linear, pool (or the op's class for anything else the filter acts on)."""
    if isinstance(step.op, Weighted):
        return step.op.layer_type
    if isinstance(step.op, Pool):
        return "pool"
    return type(step.op).__name__.lower()


class FilterClock:
    """Times every ``filter_with_support`` call the engine makes and books it to the layer family of the
    step that called it (the engine's observer sees that step right after its filter call)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[Any] = []
        self.calls: list[tuple[str, Any]] = []
        self.inner = engine_module.filter_with_support

    def filter(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.inner(*args, **kwargs)
            end.record()
            self.pending.append((start, end))
        else:
            began = time.perf_counter()
            out = self.inner(*args, **kwargs)
            self.pending.append(time.perf_counter() - began)
        return out

    def observe(self, step: Any, incoming: Any, outgoing: Any) -> None:
        if self.pending:
            self.calls.append((family(step), self.pending.pop()))

    def take(self) -> dict[str, float]:
        """Seconds per family for the pass just run (after it has been synchronised)."""
        booked: dict[str, float] = defaultdict(float)
        for name, timing in self.calls:
            booked[name] += timing[0].elapsed_time(timing[1]) / 1000 if self.cuda else timing
        self.calls.clear()
        return dict(booked)


def timed(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = MODELS[name]().eval().to(device)
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device)
    options = {"precision": args.precision}
    plain = Explainer(model, "seed", 1.0, **options)
    filtered = Explainer(model, "seed", args.topk, **options)
    clock = FilterClock(device)
    filtered.observer = clock.observe
    engine_module.filter_with_support = clock.filter
    try:
        timed(lambda: plain(x), device)
        timed(lambda: filtered(x), device)
        clock.take()
        plain_times, filtered_times, shares = [], [], defaultdict(list)
        for round_ in range(args.rounds):
            if round_ % 2:  # alternate which goes first
                filtered_times.append(timed(lambda: filtered(x), device))
                plain_times.append(timed(lambda: plain(x), device))
            else:
                plain_times.append(timed(lambda: plain(x), device))
                filtered_times.append(timed(lambda: filtered(x), device))
            booked = clock.take()
            shares["all"].append(sum(booked.values()) / filtered_times[-1])
            for key in ("conv", "linear", "pool"):
                shares[key].append(booked.get(key, 0.0) / filtered_times[-1])
    finally:
        engine_module.filter_with_support = clock.inner
    return {
        "plain": statistics.median(plain_times),
        "filtered": statistics.median(filtered_times),
        "added": statistics.median(f / p - 1 for f, p in zip(filtered_times, plain_times)),
        **{key: statistics.median(values) for key, values in shares.items()},
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        return f"{names[0]} ({len(names)} cores)"
    except (OSError, IndexError):
        return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as lrp-heatmap runs
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(
        f"relevance filter cost: topk {args.topk} vs 1.0, seed composite, batch {args.batch_size} at "
        f"{args.resolution}x{args.resolution}, {args.precision}, {args.rounds} interleaved rounds, medians; "
        f"{where}, {args.threads} threads, torch {torch.__version__}"
    )
    print(
        f"{'model':20s} {'topk 1.0 s':>10s} {'topk ' + str(args.topk) + ' s':>11s} {'added':>7s} "
        f"{'in filter':>9s} {'conv':>6s} {'linear':>6s} {'pool':>6s}"
    )
    for name in args.models.split(","):
        r = measure(name, args, device)
        print(
            f"{name:20s} {r['plain']:10.3f} {r['filtered']:11.3f} {r['added']:7.1%} {r['all']:9.1%} "
            f"{r['conv']:6.1%} {r['linear']:6.1%} {r['pool']:6.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
