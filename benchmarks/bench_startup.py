"""Start-up times of the command line, each in a fresh process, the cases interleaved over rounds;
medians. Writes docs/benchmark-startup-cpu.txt.

    python benchmarks/bench_startup.py [--rounds 7] [--output docs/benchmark-startup-cpu.txt]

Wall-clock times of whole processes (interpreter start included) for what must answer at once
(``--help``, ``--version``, a config error, ``doctor --help``, ``config show``), and, for the embedded
model, the phases of a run's set-up measured inside a fresh process: importing the libraries, loading
the model and tracing it (with the one-image trial that checks rules and target). CPU seconds are
given too: on a machine shared with other jobs they stay near what a quiet machine's wall time would
be for single-threaded work (``--threads 1`` keeps torch's thread pool from spinning while it waits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "lrp_cli"]
CASES = {
    "lrp-heatmap --help": [*CLI, "--help"],
    "lrp-heatmap --version": [*CLI, "--version"],
    "lrp-heatmap run x.png --topk 1.5 (config error)": [*CLI, "run", "x.png", "--topk", "1.5"],
    "lrp-heatmap doctor --help": [*CLI, "doctor", "--help"],
    "lrp-heatmap config show": [*CLI, "config", "show"],
}
PHASES = """
import json, time
clock = lambda: (time.perf_counter(), time.process_time())
started = clock()
import torch
if THREADS:
    torch.set_num_threads(THREADS)
from lrp_cli.config import load_config
from lrp_cli.models import load_model
from lrp_cli.pipeline import prepare_engine
imported = clock()
config = load_config(None, {"device": "cpu"})
loaded = load_model(config.model, config.weights, config.mean, config.std)
built = clock()
prepare_engine(config, loaded)
traced = clock()
span = lambda a, b: [b[0] - a[0], b[1] - a[1]]
print(json.dumps({"imports (torch, timm, torchvision, engine)": span(started, imported),
                  "model load": span(imported, built), "trace + trial image": span(built, traced),
                  "model load + trace": span(imported, traced)}))
"""


def measure(command: list[str]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds) of one fresh process. CPU time hardly grows when other jobs
    share the cores, so it stands in for the wall time of a quiet machine (for single-threaded work)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(process.pid, 0)
    process.returncode = 0
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def phases(threads: int) -> dict[str, list[float]]:
    code = f"THREADS = {threads}\n{PHASES}"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def row(name: str, values: list[tuple[float, float]]) -> str:
    walls = [elapsed for elapsed, _ in values]
    cpu = statistics.median(cpu for _, cpu in values)
    spread = f"({min(walls):.3f}-{max(walls):.3f})"
    return f"  {name:<52}{statistics.median(walls):8.3f} {spread:>15}{cpu:9.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmark-startup-cpu.txt")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads for the set-up phases (0: torch's default)"
    )
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in CASES}
    setup: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):  # interleaved: drift of the machine's speed hits every case alike
        for name, command in CASES.items():
            times[name].append(measure(command))
        for name, (elapsed, cpu) in phases(args.threads).items():
            setup.setdefault(name, []).append((elapsed, cpu))
    load = os.getloadavg()
    lines = [
        f"lrp-heatmap start-up, {args.rounds} rounds, fresh process per measurement, medians (min-max)",
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end",
        "",
        f"{'':<54}{'wall s':>8} {'(min-max)':>15}{'CPU s':>9}",
        "whole process (interpreter start included):",
        *(row(name, values) for name, values in times.items()),
        f"run set-up of the embedded model, inside a fresh process ({args.threads or 'default'} torch threads):",
        *(row(name, values) for name, values in setup.items()),
    ]
    text = "\n".join(lines) + "\n"
    args.output.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
