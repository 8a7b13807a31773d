"""Cost of PatternNet's fitting and of the pattern composites, against a plain forward pass and the
default LRP composite, on the embedded EfficientNet-Lite0 (random images, so only the timing means
anything). The methods alternate over ``--rounds`` rounds in one process; figures are medians.

    python benchmarks/bench_patterns.py --batch-size 4 --rounds 3 > docs/benchmark-patterns-cpu.txt
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lrp_cli.lrp import Explainer, retain_freed_memory
from lrp_cli.lrp.patterns import PatternFitter
from lrp_cli.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    retain_freed_memory()
    torch.manual_seed(0)
    model = load_model("efficientnet-lite0").module
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution)
    fitter = PatternFitter(model)
    fitter.update(x)  # warm-up, and patterns to explain with
    patterns = fitter.patterns()
    explainers = {
        "patternnet": Explainer(model, "patternnet", patterns=patterns),
        "patternattribution": Explainer(model, "patternattribution", patterns=patterns),
        "epsilon-plus-flat": Explainer(model, "epsilon-plus-flat"),
    }
    for explainer in explainers.values():
        explainer(x)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    methods = {"forward": forward, "patterns fit (one batch)": lambda: fitter.update(x)}
    methods |= {name: (lambda e=e: e(x)) for name, e in explainers.items()}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            started = time.perf_counter()
            method()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["forward"])
    print(
        f"EfficientNet-Lite0, batch {args.batch_size} at {args.resolution}x{args.resolution}, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:26s} {args.batch_size / median:8.2f} images/s  {median / base:5.1f}x the forward pass")


if __name__ == "__main__":
    main()
