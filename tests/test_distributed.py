"""torchrun and Ray Data over one output folder: every input explained exactly once, after a kill too.

Both runs are killed (SIGKILL, the whole process tree) part-way and resumed; the folder must then hold
exactly one record per input and the outputs of a single-process run. Every process computes with one
thread (torchrun's ranks are pinned to two cores, so each gets one; the Ray actors have one CPU each;
the reference sets it), because the thread count changes how oneDNN splits its sums: with the same
count the heatmaps are the same bytes, while a resumed share is batched differently, which changes the
relevance by float32 rounding only (measured <= 4e-7 of its largest value). So relevance is compared
to 1e-5 of its largest value and heatmap pixels to one level of 255.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrp_cli.config import load_config
from lrp_cli.distributed import Job, merge_rank_manifests, rank_manifest, worst
from lrp_cli.errors import RunError
from lrp_cli.lock import FolderLock
from lrp_cli.pipeline import run

IMAGES = 40
ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"resolution": 64, "workers": 0, "save_relevance": True, "panel": False, "report": False}
FLAGS = ["--resolution", "64", "--workers", "0", "--save-relevance", "--no-panel", "--no-report", "-q"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for number in range(IMAGES):
        Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(
            folder / f"img{number:02d}.png"
        )
    return folder


@pytest.fixture(scope="module")
def reference(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, one thread: the outputs every distributed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(load_config(None, {**SETTINGS, "output": str(out), "batch_size": 4}), [str(photos)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def records(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_bytes().splitlines()]


def assert_same_outputs(out: Path, reference: Path, photos: Path) -> None:
    """Exactly one error-free record per input, and each image's outputs those of the reference."""
    found = records(out / "manifest.jsonl")
    paths = [record["path"] for record in found]
    assert len(found) == IMAGES and sorted(paths) == sorted(str(p) for p in photos.glob("*.png"))
    assert all(record["error"] is None for record in found)
    assert not list(out.glob("manifest.rank*.jsonl"))
    for record in found:
        name = record["name"]
        relevance = np.load(out / f"{name}.relevance.npy")
        expected = np.load(reference / f"{name}.relevance.npy")
        assert np.abs(relevance - expected).max() <= 1e-5 * np.abs(expected).max(), name
        heatmap = np.asarray(Image.open(out / f"{name}.heatmap.png"), dtype=int)
        assert (
            np.abs(heatmap - np.asarray(Image.open(reference / f"{name}.heatmap.png"), dtype=int)).max() <= 1
        )


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (read from /proc before any of them is killed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue += children.get(current, [])
    return found


def wait_for(process: subprocess.Popen, count: Callable[[], int], at_least: int) -> None:
    deadline = time.monotonic() + 300
    while count() < at_least:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the process and every process below it, as a power loss would end them."""
    for pid in descendants(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def test_shards_cover_inputs_once() -> None:
    items = list(range(10))
    shards = [Job(rank, 4).shard(items) for rank in range(4)]
    assert shards == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]  # contiguous, no padding
    assert Job(0, 3).shard([1]) == [] and Job(2, 3).shard([1]) == [1]
    assert worst([0, 1, 130, 0]) == 130 and worst([1, 3, 2]) == 3 and worst([0, 141, 1]) == 141


def test_merge_is_safe_to_redo(tmp_path: Path) -> None:
    """A merge cut short anywhere (mid-append, or while removing the rank manifests) is finished by the
    next one without losing or doubling a record."""
    manifest, marker = tmp_path / "manifest.jsonl", tmp_path / ".lrp-heatmap.merge"
    merged = b'{"a": 1}\n{"b": 2}\n{"c": 3}\n'
    manifest.write_bytes(b'{"a": 1}\n')
    rank_manifest(tmp_path, 0).write_bytes(b'{"b": 2}\n')
    rank_manifest(tmp_path, 1).write_bytes(b'{"c": 3}\n{"d"')  # its last record cut short by the crash
    assert merge_rank_manifests(tmp_path) == 4
    assert manifest.read_bytes() == merged
    parts = {"size": 9, "parts": ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]}
    rank_manifest(tmp_path, 0).write_bytes(b'{"b": 2}\n')
    rank_manifest(tmp_path, 1).write_bytes(b'{"c": 3}\n')
    manifest.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c"')  # cut in the middle of the appends
    marker.write_text(json.dumps(parts))
    merge_rank_manifests(tmp_path)
    assert manifest.read_bytes() == merged
    rank_manifest(tmp_path, 1).write_bytes(b'{"c": 3}\n')  # cut after the appends, rank 0's file removed
    marker.write_text(json.dumps(parts))
    merge_rank_manifests(tmp_path)
    assert manifest.read_bytes() == merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]


def test_torchrun_kill_and_resume(photos: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "lrp_cli", "run", str(photos), "-o", str(out), *FLAGS]
    cores = sorted(os.sched_getaffinity(0))[:2]

    def start(*extra: str) -> subprocess.Popen:
        log = open(tmp_path / "log.txt", "ab")  # noqa: SIM115 -- the child owns it
        return subprocess.Popen(
            [*command, *extra],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            preexec_fn=lambda: os.sched_setaffinity(0, cores),
        )

    def written() -> int:
        return sum(len(path.read_bytes().splitlines()) for path in out.glob("manifest.rank*.jsonl"))

    first = start("--batch-size", "2")
    wait_for(first, written, 4)
    with pytest.raises(RunError, match=r"in use by another lrp-heatmap run \(torchrun job .* with 2 ranks"):
        FolderLock(out).acquire()  # one lock for the job's ranks, refused to anyone else
    kill_tree(first)
    assert 4 <= written() < IMAGES
    resumed = start("--batch-size", "4", "--resume")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()
    assert "merged the rank manifests of an unfinished torchrun job" in (tmp_path / "log.txt").read_text()
    assert_same_outputs(out, reference, photos)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance of two CPUs, on loopback (the tests' network guard allows nothing else)."""
    import logging

    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_ray_kill_and_resume(photos: Path, reference: Path, tmp_path: Path, ray_cluster: str) -> None:
    """A CLI driver on the cluster is killed part-way; this process resumes through the Python API."""
    out, config = tmp_path / "out", tmp_path / "ray.yaml"
    config.write_text(f"engine: ray\nray_address: {ray_cluster}\nray_actors: 2\n")
    log = tmp_path / "log.txt"
    command = [sys.executable, "-m", "lrp_cli", "run", str(photos), "-o", str(out), "-c", str(config)]
    with log.open("wb") as sink:
        first = subprocess.Popen(
            [*command, *FLAGS, "--batch-size", "2"],
            cwd=ROOT,
            stdout=sink,
            stderr=sink,
        )
    manifest = out / "manifest.jsonl"
    wait_for(first, lambda: len(manifest.read_bytes().splitlines()) if manifest.exists() else 0, 2)
    with pytest.raises(RunError, match=r"in use by another lrp-heatmap run \(Ray Data driver"):
        FolderLock(out).acquire()
    kill_tree(first)
    assert 2 <= len(records(manifest)) < IMAGES, log.read_text()
    settings = {**SETTINGS, "output": str(out), "batch_size": 4, "engine": "ray", "ray_actors": 2}
    assert run(load_config(None, settings), [str(photos)], resume=True) == 0
    assert_same_outputs(out, reference, photos)


def test_snapshot_check_under_torchrun(photos: Path, tmp_path: Path) -> None:
    """Each rank checks its share; rank 0 alone reports all of them."""
    from lrp_cli.snapshot import record

    folder = tmp_path / "few"
    folder.mkdir()
    for path in sorted(photos.glob("*.png"))[:6]:
        (folder / path.name).write_bytes(path.read_bytes())
    record(load_config(None, {"resolution": 64, "workers": 0}), [str(folder)], tmp_path / "snap")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "lrp_cli", "snapshot", "check", str(folder), "--against", str(tmp_path / "snap")]
    command += ["--resolution", "64", "--workers", "0", "-o", str(tmp_path / "out"), "--json"]
    checked = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    assert report["passed"] and sorted(image["name"] for image in report["images"]) == [
        f"img{number:02d}" for number in range(6)
    ]
    assert checked.stderr.count(" PASS") == 6  # one table, from rank 0
