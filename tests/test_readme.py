"""The README's code runs as written: every ```python block, every command of every ```bash block and
every ```yaml config, offline, in a scratch copy of the files the README refers to.

A block preceded by the line ``<!-- readme-test: skip (why) -->`` is not run (it needs the network, a
GPU, a camera or minutes); the reason is required. Commands run in README order in one scratch folder
(``input/``, ``configs/`` and ``docs/`` copied there), so a later command sees what an earlier one
wrote (``snapshot record`` before ``snapshot check``, a run before its ``--resume``); ``lrp-heatmap``
is this interpreter's, behind the suite's network guard.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import GUARD, ROOT

from lrp_cli.config import load_config

README = ROOT / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((?P<why>.+)\) -->")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\w*)\s*$")


def blocks(text: str) -> list[tuple[str, int, str, str | None]]:
    """(language, first line number, code, skip reason) for every fenced block."""
    found = []
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        if opening is None or not opening["lang"]:
            number += 1
            continue
        indent = len(opening["indent"])
        before = next((line.strip() for line in reversed(lines[:number]) if line.strip()), "")
        skip = SKIP.fullmatch(before)
        end = number + 1
        while not FENCE.match(lines[end]) or lines[end].strip() != "```":
            end += 1
        code = "\n".join(line[indent:] for line in lines[number + 1 : end])
        found.append((opening["lang"], number + 1, code, skip["why"] if skip else None))
        number = end + 1
    return found


def commands(code: str) -> list[str]:
    """The shell commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    found = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()  # a trailing "   # comment"
        if line and not line.startswith("#"):
            found.append(line)
    return found


BLOCKS = blocks(README.read_text(encoding="utf-8"))


def test_every_skip_marker_gives_a_reason_and_precedes_a_block():
    text = README.read_text(encoding="utf-8")
    markers = [line.strip() for line in text.splitlines() if line.strip().startswith("<!-- readme-test")]
    assert all(SKIP.fullmatch(marker) for marker in markers), markers
    assert len(markers) == sum(why is not None for *_, why in BLOCKS)
    assert [lang for lang, *_ in BLOCKS].count("bash") >= 5  # the parser found the README's blocks


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder with the README's files, and an environment whose ``lrp-heatmap`` is guarded."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("input", "configs", "docs"):
        shutil.copytree(ROOT / name, folder / name)
    binaries = tmp_path_factory.mktemp("bin")
    wrapper = binaries / "lrp-heatmap"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "$LRP_README_GUARD" "$@"\n')
    wrapper.chmod(0o755)
    environment = {
        **os.environ,
        "PATH": f"{binaries}{os.pathsep}{os.environ['PATH']}",
        "LRP_README_GUARD": GUARD,
        "LRP_HEATMAP_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    return folder, environment


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_bash_blocks_run_as_written(scratch):
    folder, environment = scratch
    costs = []  # (CPU seconds, wall seconds, command): printed with -s, to see what the README costs
    for lang, line, code, why in BLOCKS:
        if lang != "bash" or why is not None:
            continue
        for command in commands(code):
            cpu, started = children_cpu(), time.perf_counter()
            done = subprocess.run(
                ["bash", "-o", "pipefail", "-c", command],
                cwd=folder,
                env=environment,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, f"README line {line}: {command}\n{done.stderr[-2000:]}"
            costs.append((children_cpu() - cpu, time.perf_counter() - started, command))
    assert len(costs) >= 8
    for cpu, wall, command in sorted(costs, reverse=True):
        print(f"{cpu:6.1f} s CPU {wall:6.1f} s wall  {command[:90]}")
    # what the Quick start says the first command writes
    assert (folder / "output" / "cat.heatmap.png").is_file()
    assert (folder / "output" / "manifest.jsonl").is_file()


def test_python_blocks_run_as_written(scratch):
    folder, environment = scratch
    code = [(line, block) for lang, line, block, why in BLOCKS if lang == "python" and why is None]
    assert code
    # one interpreter for all blocks (each in a fresh namespace), so torch is imported once
    runner = GUARD.replace("from lrp_cli.cli import main\nmain()\n", "") + (
        "import sys\n"
        "for number, source in BLOCKS:\n"
        "    print(f'README line {number}', file=sys.stderr, flush=True)\n"
        "    exec(compile(source, f'README.md:{number}', 'exec'), {'__name__': '__readme__'})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", f"BLOCKS = {code!r}\n{runner}"],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_yaml_blocks_are_valid_configs(tmp_path):
    found = [(line, code) for lang, line, code, why in BLOCKS if lang == "yaml" and why is None]
    assert found
    for line, code in found:
        path = tmp_path / f"line{line}.yaml"
        path.write_text(code)
        load_config(path)  # raises ConfigError naming the key if the README shows a bad config
