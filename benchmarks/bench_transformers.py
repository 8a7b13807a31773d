"""Transformer throughput: our engine next to LXT and Zennit on ViT-B/16 and Swin-T (random weights).

Each method runs in a fresh process (same seed, same inputs), methods interleaved over rounds because
this machine's speed drifts; each figure is the median over rounds of the median of the timed batches.

- ours: ``attnlrp`` and ``cp-lrp`` presets (epsilon on linear layers).
- LXT 2.1 (efficient mode, gradient x input with patched modules): its torchvision ViT map is CP-LRP;
  it has no map for torchvision's Swin.
- Zennit 0.5.1 ``EpsilonPlusFlat``: rules on linear/conv layers only; attention, softmax and layer norm
  pass plain gradients (Zennit has no transformer rules), so its maps are not AttnLRP maps.

    python benchmarks/bench_transformers.py                  # -> docs/benchmark-transformers-cpu.txt
    python benchmarks/bench_transformers.py --batch 2 --repeat 1 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = [
    ("vit_b_16", "ours-attnlrp"),
    ("vit_b_16", "ours-cp-lrp"),
    ("vit_b_16", "lxt-cp-lrp"),
    ("vit_b_16", "zennit-epsilon-plus-flat"),
    ("swin_t", "ours-attnlrp"),
    ("swin_t", "ours-cp-lrp"),
    ("swin_t", "zennit-epsilon-plus-flat"),
]


def measure(model_name: str, method: str, batch: int, repeat: int) -> dict:
    """Seconds per batch of one method, in this process (warm-up excluded)."""
    import torch

    torch.set_num_threads(2)
    if method.startswith("lxt"):
        from lxt.efficient import monkey_patch
        from lxt.efficient.models.vit_torch import cp_LRP
        from torchvision.models import vision_transformer

        monkey_patch(vision_transformer, cp_LRP)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name).eval()
    if hasattr(model, "heads"):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    if method.startswith("ours"):
        from lrp_cli.lrp import Explainer, retain_freed_memory

        retain_freed_memory()
        explainer = Explainer(model, method.removeprefix("ours-"))

        def run() -> torch.Tensor:
            return explainer(x).relevance

    elif method.startswith("lxt"):

        def run() -> torch.Tensor:
            inputs = x.clone().requires_grad_(True)
            logits = model(inputs)
            logits.max(dim=1).values.sum().backward()
            return inputs * inputs.grad

    else:
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat

        def run() -> torch.Tensor:
            with Gradient(model, EpsilonPlusFlat()) as attributor:
                logits = model(x)
                start = torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).float()
                _, relevance = attributor(x, start)
            return relevance

    run()  # warm-up: tracing, caches
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return {"model": model_name, "method": method, "seconds": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmark-transformers-cpu.txt"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.batch, args.repeat)))
        return
    results: dict[tuple[str, str], list[float]] = {}
    failures: dict[tuple[str, str], str] = {}
    for _ in range(args.rounds):
        for model_name, method in METHODS:
            command = [sys.executable, __file__, "--one", model_name, method, "--batch", str(args.batch)]
            command += ["--repeat", str(args.repeat)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
                failures[(model_name, method)] = reason
                print(f"{model_name} {method}: does not run: {reason}", flush=True)
                continue
            record = json.loads(lines[-1])
            results.setdefault((model_name, method), []).append(record["seconds"])
            print(json.dumps(record), flush=True)
    lines = [
        f"Transformers, CPU (2 threads), batch {args.batch} at 224x224, random weights; median of "
        f"{args.rounds} interleaved rounds x {args.repeat} batches, each method in a fresh process.",
        "Command: python benchmarks/bench_transformers.py",
        "",
        f"{'model':<10} {'method':<26} {'s/batch':>8} {'images/s':>9} {'vs ours-attnlrp':>16}",
    ]
    for model_name in dict.fromkeys(m for m, _ in METHODS):
        base = results.get((model_name, "ours-attnlrp"))
        for (name, method), seconds in results.items():
            if name != model_name:
                continue
            median = statistics.median(seconds)
            ratio = f"{statistics.median(base) / median:.2f}x" if base else ""
            lines.append(f"{name:<10} {method:<26} {median:8.2f} {args.batch / median:9.2f} {ratio:>16}")
        for (name, method), reason in failures.items():
            if name == model_name and (name, method) not in results:
                lines.append(f"{name:<10} {method:<26} does not run: {reason}")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
