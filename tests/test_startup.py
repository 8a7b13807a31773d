"""Start-up stays instant: importing the command line, --help of every command, --version and a config
error load none of the heavy libraries (checked through sys.modules, which is deterministic, unlike a
time limit; benchmarks/bench_startup.py measures the times)."""

from __future__ import annotations

import json
import subprocess
import sys

from test_cli import ROOT

HEAVY = ("torch", "numpy", "PIL", "matplotlib", "torchvision", "timm", "cv2", "av", "ray", "uvicorn")

PROBE = """
import json, sys
from typer.testing import CliRunner
import lrp_cli.cli as cli
after_import = sorted(m for m in {heavy} if m in sys.modules)
results = {{}}
for args in {calls}:
    result = CliRunner().invoke(cli.app, args)
    results[" ".join(args)] = [result.exit_code, sorted(m for m in {heavy} if m in sys.modules)]
print(json.dumps({{"import": after_import, "calls": results}}))
"""


def commands() -> list[list[str]]:
    """Every command and sub-command of the app, as argument lists (``["snapshot", "check"]``)."""
    from typer.main import get_command

    from lrp_cli.cli import app

    found = []

    def walk(group, prefix):
        for name, command in getattr(group, "commands", {}).items():
            found.append([*prefix, name])
            walk(command, [*prefix, name])

    walk(get_command(app), [])
    return found


def probe(calls: list[list[str]]) -> dict:
    code = PROBE.format(heavy=repr(HEAVY), calls=repr(calls))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_cli_loads_no_heavy_library():
    assert probe([])["import"] == []


def test_help_version_and_config_errors_load_no_heavy_library():
    every = commands()
    assert ["run"] in every and ["config", "show"] in every and ["snapshot", "check"] in every
    calls = [["--help"], ["--version"], *([*c, "--help"] for c in every)]
    calls += [["run", "x.png", "--topk", "1.5"], ["config", "show", "--set", "modle=x"], ["config", "show"]]
    result = probe(calls)
    assert result["import"] == []
    for args, (code, loaded) in result["calls"].items():
        assert loaded == [], f"lrp-heatmap {args} imported {loaded}"
        assert code == (2 if "1.5" in args or "modle" in args else 0), args


def test_config_knows_the_engine_presets_without_importing_it():
    from lrp_cli.config import BUILTIN_COMPOSITES
    from lrp_cli.lrp import COMPOSITES

    assert list(BUILTIN_COMPOSITES) == sorted(COMPOSITES)
