"""Which classifiers the engine explains: every torchvision classification model and the timm families
people use today, random-initialised (no weights needed), batch 2 at each model's own input size.

A model counts as explained when the engine's logits equal ``model(x)`` to 1e-4 relative and the input
relevance is finite. Each model runs in a fresh process with a time limit, so one slow or broken model
cannot take the sweep down.

    python benchmarks/bench_coverage.py                       # both sweeps -> docs/coverage-cpu.md
    python benchmarks/bench_coverage.py --only timm --limit 5  # a quick look
    python benchmarks/bench_coverage.py --records run1.log     # go on after an interrupted sweep
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TIMM_FAMILIES: dict[str, list[str]] = {
    "ViT": ["vit_tiny_patch16_224", "vit_small_patch16_224"],
    "DeiT": ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"],
    "BEiT": ["beit_base_patch16_224"],
    "EVA-02": ["eva02_tiny_patch14_224"],
    "Swin": ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"],
    "MaxViT": ["maxvit_tiny_tf_224"],
    "CoAtNet": ["coatnet_0_rw_224"],
    "LeViT": ["levit_128s"],
    "MobileViT": ["mobilevit_xxs", "mobilevitv2_050"],
    "TinyViT": ["tiny_vit_5m_224"],
    "EfficientFormer": ["efficientformer_l1", "efficientformerv2_s0"],
    "FastViT": ["fastvit_t8"],
    "ConvNeXt": ["convnext_atto", "convnextv2_atto"],
    "EdgeNeXt": ["edgenext_xx_small"],
    "PoolFormer/CAFormer": ["poolformer_s12", "caformer_s18", "convformer_s18"],
    "ResMLP/MLP-Mixer": ["resmlp_12_224", "mixer_s16_224"],
    "GhostNet": ["ghostnet_100"],
    "MixNet": ["mixnet_s"],
    "DPN": ["dpn68"],
    "HRNet": ["hrnet_w18_small"],
    "RepVGG/MobileOne": ["repvgg_a0", "mobileone_s0"],
    "NF-ResNet": ["nf_resnet26", "nfnet_f0"],
    "DenseNet": ["densenet121"],
    "MobileNetV3/V4": ["mobilenetv3_small_100", "mobilenetv4_conv_small"],
    "ResNet/RegNet/EfficientNet": ["resnet18", "regnety_002", "efficientnet_b0", "tf_efficientnet_lite0"],
}


def explain_one(name: str) -> dict:
    """Build, explain and check one model; return a JSON-able record."""
    import timm
    import torch
    import torchvision

    from lrp_cli.lrp import Explainer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    if name.startswith("timm:"):
        model = timm.create_model(name[5:], pretrained=False)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))[-2:]
    else:
        model = torchvision.models.get_model(name)
        size = (299, 299) if name == "inception_v3" else (224, 224)
    model.eval()
    x = torch.randn(2, 3, *size)
    start = time.perf_counter()
    explainer = Explainer(model)
    result = explainer(x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        reference = model(x)
    scale = reference.abs().max().clamp_min(1e-12)
    error = float((result.logits - reference).abs().max() / scale)
    finite = bool(torch.isfinite(result.relevance).all())
    return {
        "model": name,
        "ok": error <= 1e-4 and finite,
        "logit_error": error,
        "finite": finite,
        "composite": explainer.composite.name,
        "seconds": round(seconds, 1),
    }


def run(name: str, limit: float) -> dict:
    command = [sys.executable, __file__, "--one", name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"model": name, "ok": False, "reason": f"over {limit:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "ok": False, "reason": tail[:300]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--one", help="explain one model in this process and print its record")
    parser.add_argument("--only", choices=["torchvision", "timm"])
    parser.add_argument("--limit", type=int, default=0, help="at most this many models per sweep")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("docs/coverage-cpu.md"))
    parser.add_argument(
        "--records",
        type=Path,
        nargs="*",
        default=[],
        help="JSON lines of earlier runs: those models are not run again",
    )
    args = parser.parse_args()
    if args.one:
        try:
            print(json.dumps(explain_one(args.one)))
        except Exception as error:  # the record says why; the sweep goes on
            print(
                json.dumps(
                    {"model": args.one, "ok": False, "reason": f"{type(error).__name__}: {error}"[:300]}
                )
            )
        return

    import torchvision

    planned: dict[str, list[tuple[str, str]]] = {}
    if args.only in (None, "torchvision"):
        names = sorted(torchvision.models.list_models(module=torchvision.models))
        planned["torchvision"] = [("torchvision", n) for n in names]
    if args.only in (None, "timm"):
        planned["timm"] = [(family, f"timm:{n}") for family, ns in TIMM_FAMILIES.items() for n in ns]
    done = _load_records(args.records)
    sweeps: dict[str, list[dict]] = {}
    for sweep, models in planned.items():
        if args.limit:
            models = models[: args.limit]
        for family, name in models:
            record = done.get(name) or run(name, args.timeout)
            record["family"] = family
            sweeps.setdefault(sweep, []).append(record)
            if name not in done:
                print(json.dumps(record), flush=True)
    args.out.write_text(report(sweeps, args.timeout))
    print(f"wrote {args.out}")


def _load_records(paths: list[Path]) -> dict[str, dict]:
    """Records printed by earlier runs (JSON lines), by model: a long sweep can go on where it stopped."""
    records: dict[str, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                records[record["model"]] = record
    return records


def report(sweeps: dict[str, list[dict]], timeout: float) -> str:
    lines = ["# Model coverage (CPU, random initialisation, batch 2, composite `auto`)", ""]
    lines += [
        f"Command: `python benchmarks/bench_coverage.py`; each model in a fresh process, "
        f"{timeout:.0f} s limit.",
        "",
    ]
    for sweep, records in sweeps.items():
        passed = sum(r["ok"] for r in records)
        lines += [
            f"## {sweep}: {passed}/{len(records)} explained ({100 * passed / max(len(records), 1):.0f}%)",
            "",
        ]
        lines += [
            "| family | model | result | logits rel. error | composite | seconds |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in records:
            result = "ok" if r["ok"] else f"FAIL: {r.get('reason', 'logits differ or relevance not finite')}"
            error = f"{r['logit_error']:.1e}" if "logit_error" in r else ""
            lines.append(
                f"| {r['family']} | {r['model']} | {result} | {error} | {r.get('composite', '')} | {r.get('seconds', '')} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
