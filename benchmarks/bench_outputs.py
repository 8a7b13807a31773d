"""What panels and report.html cost a whole run: ``lrp-heatmap run`` over generated photos, end to end.

Three variants of the same run, each in a fresh process, interleaved over ``--rounds`` rounds (this
machine's speed drifts over minutes), medians of the wall time:

- ``before``: the code of a git revision (``--baseline``, default HEAD), exported with ``git archive``
  into a temporary folder (the working tree is not touched): heatmap, overlay and manifest as before;
- ``--no-panel --no-report``: this tree with the new overlays and heatmaps only;
- ``default``: this tree as users run it, with NAME.panel.jpg for every photo and report.html.

    python benchmarks/bench_outputs.py                       # 100 photos, 3 rounds (about 3 minutes)
    python benchmarks/bench_outputs.py --photos 20 --rounds 1
    python benchmarks/bench_outputs.py --render-only         # CPU of the writer threads per photo

Rendering runs in the writer threads while the engine explains the next batch, so what counts is how
much of it the engine's time does not hide.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8
SIZES = [(640, 480), (480, 640), (800, 600), (512, 512), (1024, 683)]


def make_photos(folder: Path, count: int) -> None:
    """Smooth gradients, discs and a little noise, as JPEG at quality 90: photo-like to decode."""
    rng = np.random.default_rng(0)
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        rows, cols = np.mgrid[0:height, 0:width] / max(width, height)
        centre = rng.uniform(0.2, 0.8, 2)
        disc = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) < rng.uniform(0.01, 0.06)
        base = [rng.uniform(0.2, 1.0) * rows + rng.uniform(0, 0.5) * cols + 0.4 * disc for _ in range(3)]
        pixels = np.stack(base, axis=2) + rng.normal(0, 0.03, (height, width, 3))
        image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
        image.save(folder / f"photo{index:03d}.jpg", quality=90)


def export(revision: str, folder: Path) -> None:
    """The files of ``revision`` (``git archive``, read-only for the repository) into ``folder``."""
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")


def timed_run(
    code: Path, photos: Path, out: Path, options: list[str], args: argparse.Namespace
) -> tuple[tuple[float, float, float], list[str]]:
    """One ``lrp-heatmap run`` from the package in ``code`` in a fresh process: its wall seconds, the
    seconds its photos took at the pace after the first batch (start, model loading and tracing left
    out; report.html comes after them), the CPU seconds of the process and its decoding workers (less
    sensitive than wall time to other jobs on the machine); and the kinds of file it wrote. The outputs
    are removed after."""
    command = [sys.executable, "-m", "lrp_cli", "run", str(photos), "-o", str(out), "--json"]
    command += ["--composite", args.composite, "--topk", str(args.topk), "--workers", "2", *options]
    environment = {**os.environ, "PYTHONPATH": str(code), "LRP_HEATMAP_OFFLINE": "1"}
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=code, env=environment, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    # one record per photo as it is finished (a closing summary line, where there is one, has no "path")
    stamps = [time.perf_counter() for line in process.stdout if '"path"' in line]
    exit_code = process.wait()
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if exit_code != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {exit_code}")
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    steady = (stamps[-1] - stamps[BATCH - 1]) * len(stamps) / (len(stamps) - BATCH)
    written = sorted(p.name.split(".", 1)[1] for p in out.iterdir() if p.name.startswith("photo000."))
    written += ["report.html"] if (out / "report.html").exists() else []
    shutil.rmtree(out)
    return (elapsed, steady, cpu), written


def render_cpu(before: Path, repeats: int = 7) -> None:
    """Thread CPU milliseconds per 800x600 photo of what the writer threads do for one image: the code
    before (its ``lrp_cli/render.py`` loaded from ``before``) against now, without and with the panel;
    a relevance map of the embedded model for a photo of input/, medians over ``repeats`` rounds."""
    import importlib.util

    import torch

    from lrp_cli import render
    from lrp_cli.lrp import Explainer
    from lrp_cli.models import load_model
    from lrp_cli.panel import Caption, panel_image

    spec = importlib.util.spec_from_file_location("lrp_cli.render_before", before / "lrp_cli" / "render.py")
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    loaded = load_model("efficientnet-lite0", None, None, None)
    photo = np.asarray(Image.open(ROOT / "input" / "rocket.jpg").convert("RGB").resize((800, 600)))
    x = torch.from_numpy(np.asarray(Image.fromarray(photo).resize((224, 224))).copy()).permute(2, 0, 1)
    x = ((x.float() / 255 - 0.5) / 0.5)[None]
    relevance = Explainer(loaded.module.eval(), "epsilon-plus-flat")(x).relevance[0].numpy()
    caption = Caption("label", 1, 0.5, 1, 1, "label", "epsilon-plus-flat", 1.0, False)

    def before_change() -> None:
        heat = old.normalise(old.relevance_map(relevance), True)
        old.image_bytes(old.heatmap_image(heat, True))
        old.image_bytes(old.overlay_image(photo, heat, True, "squash", 0.6), "jpg")

    def now(panel: bool) -> None:
        shown = render.pictures(relevance, photo, True, "squash", 0.6)
        render.image_bytes(shown.heatmap)
        render.image_bytes(shown.overlay, "jpg")
        if panel:
            render.image_bytes(panel_image(photo, shown, caption), "jpg")

    cases = {
        "before": before_change,
        "now, --no-panel": lambda: now(False),
        "now, with the panel": lambda: now(True),
    }
    spent: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, work in cases.items():
            work()
            started = time.thread_time()
            for _ in range(10):
                work()
            spent[name].append((time.thread_time() - started) * 100.0)
    print("writer-thread CPU per 800x600 photo (heatmap PNG, overlay JPEG, panel JPEG), medians:")
    for name, values in spent.items():
        print(f"  {name:22s} {statistics.median(values):6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default="HEAD", help="git revision of the 'before' code")
    parser.add_argument("--composite", default="auto")
    parser.add_argument("--topk", type=float, default=1.0)
    parser.add_argument("--skip-no-panel", action="store_true", help="only 'before' and 'default'")
    parser.add_argument("--render-only", action="store_true", help="only the writer threads' CPU per photo")
    args = parser.parse_args()
    if args.render_only:
        with tempfile.TemporaryDirectory(prefix="lrp-bench-outputs-") as folder:
            export(args.baseline, Path(folder))
            render_cpu(Path(folder))
        return
    work = Path(tempfile.mkdtemp(prefix="lrp-bench-outputs-"))
    try:
        photos, before = work / "photos", work / "before"
        photos.mkdir()
        make_photos(photos, args.photos)
        export(args.baseline, before)
        variants = {
            f"before ({args.baseline})": (before, []),
            "--no-panel --no-report": (ROOT, ["--no-panel", "--no-report"]),
            "default (panels, report.html)": (ROOT, []),
        }
        if args.skip_no_panel:
            del variants["--no-panel --no-report"]
        times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        files: dict[str, list[str]] = {}
        for round_number in range(args.rounds):
            for name, (code, options) in variants.items():
                measured, files[name] = timed_run(code, photos, work / "out", options, args)
                times[name].append(measured)
                wall, steady, cpu = measured
                line = f"round {round_number + 1}: {name:30s} {wall:7.2f} s, photos {steady:7.2f} s, CPU {cpu:7.2f} s"
                print(line, file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, times, files)


def report(args: argparse.Namespace, times: dict[str, list[tuple[float, float, float]]], files: dict) -> None:
    print(
        f"lrp-heatmap run over {args.photos} generated JPEG photos (640x480 to 1024x683), embedded "
        f"EfficientNet-Lite0, --composite {args.composite} --topk {args.topk:g}, batch {BATCH}, 2 workers; "
        f"fresh process per run, {args.rounds} interleaved rounds, medians.\n'end to end': the whole "
        "process; 'photos': the photos at the pace after the first batch (no start, loading, tracing);\n"
        "'CPU': user + system seconds of the process and its decoding workers"
    )
    before = next(iter(times.values()))
    base = [statistics.median(column) for column in zip(*before, strict=True)]
    columns = f"{'end to end':>10s} {'ratio':>6s} {'photos':>8s} {'ratio':>6s} {'CPU':>8s} {'ratio':>6s}"
    print(f"{'variant':30s} {columns}  files per photo")
    for name, values in times.items():
        wall, steady, cpu = (statistics.median(column) for column in zip(*values, strict=True))
        print(
            f"{name:30s} {wall:9.2f}s {wall / base[0]:6.3f} {steady:7.2f}s {steady / base[1]:6.3f} "
            f"{cpu:7.2f}s {cpu / base[2]:6.3f}  {', '.join(files[name])}"
        )
        runs = ", ".join("/".join(f"{v:.1f}" for v in run) for run in values)
        ratios = ", ".join(f"{run[0] / old[0]:.3f}" for run, old in zip(values, before, strict=True))
        print(f"{'':30s} runs (end to end/photos/CPU s): {runs}; end-to-end ratio per round: {ratios}")


if __name__ == "__main__":
    main()
