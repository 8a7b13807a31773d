"""Hostile folders, jobs and disks: every case ends in a clear state, nothing lost or overwritten.

Process-level behaviour (locks held by another process, SIGKILL, Ctrl-C, a closed stdout, a killed
worker) runs the real CLI in subprocesses; the rest goes through the Typer app in-process, on a tiny
random model at 16-32 pixels, to keep the suite fast.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_cli import GUARD, ROOT
from typer.testing import CliRunner

from lrp_cli import pipeline
from lrp_cli.cli import app
from lrp_cli.data import OUTPUT_SUFFIXES, decode, discover, name_key, prepare, unique_stems
from lrp_cli.lock import LOCK_NAME, FolderLock
from lrp_cli.models import LoadedModel
from lrp_cli.runinfo import image_records
from lrp_cli.snapshot import CheckReport, Comparison, format_table

TINY = (
    "import torch\n"
    "def build():\n"
    "    torch.manual_seed(0)\n"
    "    return torch.nn.Sequential(\n"
    "        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),\n"
    "        torch.nn.Flatten(), torch.nn.Linear(4, 10),\n"
    "    )\n"
)
FAST = ("--model", "tiny_model:build", "--resolution", "16", "--workers", "0")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Iterator[Path]:
    """A ``tiny_model:build`` factory (10 classes), importable here and in subprocesses."""
    folder = tmp_path_factory.mktemp("model")
    (folder / "tiny_model.py").write_text(TINY)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("tiny_model", None)


def invoke(*args: str, input: bytes | str | None = None) -> Any:
    """The CLI in-process (Typer's runner): exit code, stdout and stderr, no interpreter start-up."""
    return CliRunner().invoke(app, list(args), input=input)


def spawn(model_dir: Path, *args: str, **popen: Any) -> subprocess.Popen:
    """The real CLI in a fresh interpreter, network disabled, the tiny model importable."""
    env = {**os.environ, "LRP_HEATMAP_OFFLINE": "1", "PYTHONPATH": str(model_dir)}
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([sys.executable, "-c", GUARD, *args], cwd=ROOT, env=env, **popen)


def images(folder: Path, names: list[str], size: int = 24, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (size, size + 6, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, format="JPEG" if name.endswith(".jpg") else "PNG")
    return folder


def lines(out: Path) -> list[dict]:
    """Every manifest line as a record; fails on any line that is not whole JSON."""
    return [json.loads(line) for line in (out / "manifest.jsonl").read_bytes().decode().splitlines()]


def wait_for_records(out: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    manifest = out / "manifest.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before {count} records: {process.poll()}")


def assert_consistent(out: Path) -> list[dict]:
    """Whole lines only, every recorded output a complete image, no temporary file left."""
    records = lines(out)
    for record in records:
        for path in record["outputs"].values():
            if path.endswith(".npy"):
                assert np.load(path).shape[0] == 3
            else:
                Image.open(path).verify()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    return records


# --- names: unique for every input set ---------------------------------------------------------------

PARTS = st.sampled_from(["cat", "CAT", "Cat", "caf\u00e9", "cafe\u0301", "cat.png", "x.heatmap.png", "a"])
EXTENSIONS = st.sampled_from([".png", ".PNG", ".png.png", ".jpg", ".heatmap.png", ".overlay.jpg"])
RELATIVE = st.builds(
    lambda folder, stem, extension: PurePath(*folder, stem + extension),
    st.lists(PARTS, max_size=2),
    PARTS,
    EXTENSIONS,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(RELATIVE, min_size=1, max_size=12, unique=True))
def test_output_names_are_unique_for_any_input_set(relatives):
    names = unique_stems(relatives)
    assert len(names) == len(relatives)
    files = [name_key(f"{name}{suffix}") for name in names for suffix in OUTPUT_SUFFIXES]
    assert len(set(files)) == len(files)  # distinct even on case-insensitive, normalising file systems
    folders = {name_key(str(p)) for name in names for p in name.parents}
    assert not folders & set(files)  # no output file where another output needs a folder
    for relative, name in zip(relatives, names):  # every name still says which input it came from
        assert str(name).startswith(str(relative.with_suffix("")))
    assert unique_stems(relatives) == names  # deterministic, so --resume finds the same names


def test_colliding_names_each_get_their_own_outputs(model_dir, tmp_path):
    folder = images(tmp_path / "in", ["cat.png", "cat.png.png", "CAT.png", "cat.jpg"])
    out = tmp_path / "out"
    result = invoke("run", str(folder), "-o", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert "4 explained, 0 failed" in result.stderr
    records = assert_consistent(out)
    heatmaps = [r["outputs"]["heatmap"] for r in records]
    assert len({name_key(h) for h in heatmaps}) == 4
    assert {r["name"] for r in records} == {"CAT.png", "cat.jpg", "cat.png~2", "cat.png.png"}


# --- inputs never overwritten, outputs never re-ingested ----------------------------------------------


def test_output_folder_equal_to_the_input_folder_is_refused(model_dir, tmp_path):
    folder = images(tmp_path / "in", ["photo.png", "photo.overlay.jpg"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = invoke("run", str(folder), "-o", str(folder), *FAST)
    assert result.exit_code == 2
    assert "also the output folder" in result.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_an_explicit_input_inside_the_output_folder_is_never_overwritten(model_dir, tmp_path):
    out = tmp_path / "out"
    images(out, ["photo.png", "photo.heatmap.png"])
    before = (out / "photo.heatmap.png").read_bytes()
    result = invoke("run", str(out / "photo.png"), str(out / "photo.heatmap.png"), "-o", str(out), *FAST)
    assert result.exit_code == 2
    assert f"would overwrite the input {out / 'photo.heatmap.png'}" in result.stderr
    assert (out / "photo.heatmap.png").read_bytes() == before


def test_output_folder_inside_the_input_folder_is_not_searched(model_dir, tmp_path):
    folder = images(tmp_path / "in", ["a.png", "b.png"])
    for _ in range(2):
        result = invoke("run", str(folder), "-o", str(folder / "results"), *FAST, "--json")
        assert result.exit_code == 0, result.output
        assert sorted(r["name"] for r in image_records(result.stdout.splitlines())) == ["a", "b"]


# --- the manifest: portable paths, validated before it is touched, whole lines ----------------------


def test_manifest_paths_are_absolute_and_resume_works_from_another_folder(model_dir, tmp_path, monkeypatch):
    folder = images(tmp_path / "in", ["a.png", "b.png"])
    monkeypatch.chdir(tmp_path)
    assert invoke("run", "in", "-o", "out", *FAST).exit_code == 0
    records = lines(tmp_path / "out")
    assert {r["path"] for r in records} == {str(folder / "a.png"), str(folder / "b.png")}
    assert all(Path(p).is_absolute() for r in records for p in r["outputs"].values())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("run", "../in", "-o", "../out", "--resume", "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert image_records(result.stdout.splitlines()) == []  # nothing redone
    assert len(lines(tmp_path / "out")) == 2


@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        (["--target", "10"], None, "target class out of range 0..9"),
        ([], "rules: {conv: {rule: gamma, gamma: x}}\n", "parameter 'gamma' = 'x'; expected a finite number"),
        ([], "topk: .nan\n", "key 'topk' = nan is invalid"),
        ([], b"model: caf\xe9\n", "not UTF-8 text (byte 10"),
        (
            [],
            "rules: {first: zbox, conv: {rule: zplus, zero_bias: 1}}\n",
            "'zero_bias' = 1; expected true or false",
        ),
    ],
)
def test_invalid_settings_leave_an_existing_manifest_untouched(model_dir, tmp_path, args, config, message):
    folder = images(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    assert invoke("run", str(folder), "-o", str(out), *FAST).exit_code == 0
    before = (out / "manifest.jsonl").read_bytes()
    if config is not None:
        path = tmp_path / "bad.yaml"
        path.write_bytes(config if isinstance(config, bytes) else config.encode())
        args = [*args, "-c", str(path)]
    result = invoke("run", str(folder), "-o", str(out), *FAST, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert (out / "manifest.jsonl").read_bytes() == before


def test_unusable_output_folder_is_reported_before_the_model_loads(tmp_path):
    folder = images(tmp_path / "in", ["a.png"])
    (tmp_path / "file").write_text("not a folder")
    # the model does not exist: the output folder's message must come first
    result = invoke("run", str(folder), "-o", str(tmp_path / "file"), "--model", "no_such_module:build")
    assert result.exit_code == 2
    assert f"output folder {tmp_path / 'file'} is a file" in result.stderr
    result = invoke(
        "run", str(folder), "-o", str(tmp_path / "file" / "sub"), "--model", "no_such_module:build"
    )
    assert result.exit_code == 2
    assert "cannot write to output folder" in result.stderr and "Not a directory" in result.stderr


def test_torn_and_damaged_manifest_lines_are_repaired_and_reported(model_dir, tmp_path):
    folder = images(tmp_path / "in", ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    assert invoke("run", str(folder / "a.png"), str(folder / "b.png"), "-o", str(out), *FAST).exit_code == 0
    manifest = out / "manifest.jsonl"
    good = manifest.read_bytes().splitlines(keepends=True)
    manifest.write_bytes(good[0] + b"123\n" + b"\xff\xfe not text\n" + good[1][:40])  # b's record cut short
    result = invoke("run", str(folder), "-o", str(out), "--resume", "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert "ended in an incomplete record (40 bytes" in result.stderr
    assert "line 2 is not a manifest record" in result.stderr and "line 3 is not" in result.stderr
    assert sorted(r["name"] for r in image_records(result.stdout.splitlines())) == ["b", "c"]
    data = manifest.read_bytes().splitlines()
    assert data[:3] == [good[0].rstrip(b"\n"), b"123", b"\xff\xfe not text"]  # damaged lines kept as found
    assert sorted(json.loads(line)["name"] for line in [data[0], *data[3:]]) == ["a", "b", "c"]


def test_file_names_that_are_not_utf8_are_stored_losslessly_and_resume(model_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.fsencode(str(folder)) + b"/caf\xe9.png"
    Image.new("RGB", (20, 20), "red").save(os.fsdecode(raw), format="PNG")
    out = tmp_path / "out"
    result = invoke("run", str(folder), "-o", str(out), *FAST)
    assert result.exit_code == 0, result.output
    (record,) = lines(out)  # valid UTF-8 JSON
    assert record["path"].endswith("caf\ufffd.png")
    assert base64.b64decode(record["path_bytes"]) == raw
    assert os.path.exists(os.fsencode(out) + b"/caf\xe9.heatmap.png")
    assert base64.b64decode(record["outputs_bytes"]["heatmap"]) == os.fsencode(out) + b"/caf\xe9.heatmap.png"
    again = invoke("run", "-", "-o", str(out), "--resume", "--json", *FAST, input=raw + b"\n")
    assert again.exit_code == 0, again.output
    assert image_records(again.stdout.splitlines()) == []  # recognised as done, from the raw bytes on stdin


def test_target_sets_label_and_probability_of_that_class(model_dir, tmp_path, monkeypatch):
    import tiny_model

    folder = images(tmp_path / "in", ["a.png", "b.png"])
    model = tiny_model.build().eval()
    labels = [f"class {i}" for i in range(10)]
    loaded = LoadedModel(model, "tiny", [0.5] * 3, [0.25] * 3, labels, "0" * 16)
    monkeypatch.setattr(pipeline, "load_model", lambda *args: loaded)
    result = invoke("run", str(folder), "-o", str(tmp_path / "out"), "--target", "3", "--json", *FAST[2:])
    assert result.exit_code == 0, result.output
    for record in image_records(result.stdout.splitlines()):
        photo = np.asarray(prepare(decode(Path(record["path"]), 10**6), 16, "squash"))
        x = (torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.25
        with torch.no_grad():
            probabilities = model(x[None]).softmax(dim=1)[0]
        assert (record["class_index"], record["target"], record["label"]) == (3, 3, "class 3")
        assert record["probability"] == pytest.approx(float(probabilities[3]), abs=1e-5)
        top = int(probabilities.argmax())
        assert (record["predicted_index"], record["predicted_label"]) == (top, f"class {top}")


# --- environment failures: exit code 3, one line, traceback only with --debug -----------------------


def test_out_of_memory_halves_the_batch_down_to_one(model_dir, tmp_path, monkeypatch):
    folder = images(tmp_path / "in", [f"i{i}.png" for i in range(6)])
    plain = invoke("run", str(folder), "-o", str(tmp_path / "plain"), "-b", "8", "--json", *FAST)
    explain = pipeline.Explainer.__call__

    def limited(self, inputs, target=None):
        if len(inputs) > 2:
            raise torch.OutOfMemoryError(f"fake: no memory for {len(inputs)} images")
        return explain(self, inputs, target)

    monkeypatch.setattr(pipeline.Explainer, "__call__", limited)
    result = invoke("run", str(folder), "-o", str(tmp_path / "out"), "-b", "8", "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert "out of memory on a batch of 6 images; retrying in batches of 3" in result.stderr
    assert "out of memory on a batch of 3 images; retrying in batches of 1" in result.stderr
    expected = {r["name"]: r["relevance_sum"] for r in image_records(plain.stdout.splitlines())}
    got = {r["name"]: r["relevance_sum"] for r in image_records(result.stdout.splitlines())}
    assert got.keys() == expected.keys() and len(got) == 6
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-7)

    monkeypatch.setattr(pipeline.Explainer, "__call__", lambda *args: (_ for _ in ()).throw(MemoryError()))
    result = invoke("run", str(folder), "-o", str(tmp_path / "none"), *FAST)
    assert result.exit_code == 3
    assert "out of memory explaining a single 16x16 image" in result.stderr
    assert "Traceback" not in result.output


def test_internal_errors_exit_3_with_one_line_and_a_traceback_only_with_debug(
    model_dir, tmp_path, monkeypatch
):
    folder = images(tmp_path / "in", ["a.png"])

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(pipeline, "render_outputs", broken)
    result = invoke("run", str(folder), "-o", str(tmp_path / "out"), *FAST)
    assert result.exit_code == 3
    assert result.stderr.splitlines() == [
        "lrp-heatmap: error: internal error: ZeroDivisionError: boom; run again with --debug for the "
        "traceback and please report it"
    ]
    debug = invoke("run", str(folder), "-o", str(tmp_path / "out"), *FAST, "--debug")
    assert debug.exit_code == 3 and "Traceback" in debug.stderr and "ZeroDivisionError: boom" in debug.stderr


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small RAM file system (disk full, read-only), where this machine lets us mount one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_exits_3_keeps_the_manifest_whole_and_resume_completes(model_dir, tmp_path):
    folder = images(tmp_path / "in", [f"i{i:02d}.png" for i in range(12)], size=96)
    with tmpfs(tmp_path / "disk", "size=96k") as disk:
        out = disk / "out"
        args = (
            "run",
            str(folder),
            "-o",
            str(out),
            "-b",
            "2",
            "--save-relevance",
            *FAST[:2],
            "--workers",
            "0",
        )
        result = invoke(*args, "--resolution", "32")
        assert result.exit_code == 3, result.output
        assert "No space left on device" in result.stderr and "--resume" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
        finished = assert_consistent(out) if (out / "manifest.jsonl").exists() else []
        assert len(finished) < 12
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        resumed = invoke(*args, "--resolution", "32", "--resume")
        assert resumed.exit_code == 0, resumed.output
        records = assert_consistent(out)
        assert sorted(r["name"] for r in records) == [f"i{i:02d}" for i in range(12)]


def test_read_only_output_folder_is_a_usage_error(model_dir, tmp_path):
    folder = images(tmp_path / "in", ["a.png"])
    with tmpfs(tmp_path / "ro", "ro,size=64k") as disk:
        result = invoke("run", str(folder), "-o", str(disk / "out"), *FAST)
        assert result.exit_code == 2
        assert f"cannot write to output folder {disk / 'out'}: Read-only file system" in result.stderr


# --- unprivileged cases: as user nobody (root reads everything) --------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder other users can reach (pytest's own tmp folders are private to their owner)."""
    folder = Path(tempfile.mkdtemp(prefix="lrp-reliability-"))
    folder.chmod(0o777)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(folder)


def unprivileged(function: Callable[[], Any]) -> tuple[str, Any]:
    """Run ``function`` as user nobody in a forked child (as is, when not root): ('ok', result) or
    ('error', 'Type: message')."""
    if os.geteuid() != 0:
        try:
            return "ok", function()
        except Exception as error:
            return "error", f"{type(error).__name__}: {error}"
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's result comes back through the pipe
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            payload = pickle.dumps(("ok", function()))
        except BaseException as error:
            payload = pickle.dumps(("error", f"{type(error).__name__}: {error}"))
        os.write(write, payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(child, 0)
    return pickle.loads(data)


def test_unreadable_folders_and_files_are_reported_as_what_they_are(shared_dir):
    folder = images(shared_dir / "in", ["a.png", "locked/b.png", "c.png"])
    (folder / "locked").chmod(0o000)
    (folder / "c.png").chmod(0o000)
    for path in (shared_dir, folder):
        path.chmod(0o755)
    status, items = unprivileged(lambda: discover([str(folder)]))
    assert status == "ok", items
    found = {str(item.relative): item.error for item in items}
    assert found == {"a": None, "locked": "cannot read folder: Permission denied", "c": None}
    status, reason = unprivileged(lambda: decode(folder / "c.png", 10**6))
    assert (status, reason) == ("error", "ValueError: cannot read file: Permission denied")


def test_output_folder_without_write_permission_is_a_usage_error(shared_dir):
    out = shared_dir / "out"
    out.mkdir(mode=0o555)
    out.chmod(0o555)
    status, reason = unprivileged(lambda: FolderLock(out).acquire())
    assert status == "error"
    assert (
        reason == f"RunError: cannot write to output folder {out}: Permission denied; choose another --output"
    )


# --- discovery: links, stdin --------------------------------------------------------------------------


def test_symlink_loops_and_dangling_links_are_reported_without_moving_other_outputs(model_dir, tmp_path):
    folder = images(tmp_path / "in", ["a.png", "sub/b.png"])
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "dangling.png").symlink_to(tmp_path / "far" / "away" / "gone.png")
    (folder / "sub" / "again").symlink_to(folder, target_is_directory=True)  # a folder loop: not followed
    (folder / "link.png").symlink_to(folder / "a.png")
    out = tmp_path / "out"
    result = invoke("run", str(folder), "-o", str(out), *FAST)
    assert result.exit_code == 1, result.output
    assert f"skipped {folder / 'loop.png'}: symbolic link loop" in result.stderr
    assert f"skipped {folder / 'dangling.png'}: broken symbolic link to {tmp_path}/far/away/gone.png" in (
        result.stderr
    )
    explained = {r["name"]: r for r in lines(out) if r["error"] is None}
    assert sorted(explained) == ["a", "link", "sub/b"]
    assert explained["link"]["path"] == str(folder / "link.png")  # named by the link, not its target
    assert (out / "a.heatmap.png").exists() and (out / "sub" / "b.heatmap.png").exists()


def test_stdin_keeps_names_exactly_and_reports_folders_and_missing_files(model_dir, tmp_path, monkeypatch):
    folder = images(tmp_path / "in", [" lead.png", "plain.png"])
    (folder / "sub").mkdir()
    monkeypatch.chdir(folder)
    stdin = " lead.png\nplain.png\r\nsub\nmissing.png\n\n"
    result = invoke("run", "-", "-o", str(tmp_path / "out"), *FAST, input=stdin)
    assert result.exit_code == 1, result.output
    records = {r["name"]: r["error"] for r in lines(tmp_path / "out")}
    assert records == {
        " lead": None,
        "plain": None,
        "sub": "is a folder, not an image file (give folders as arguments, not on stdin)",
        "missing": "no such file",
    }


def test_max_pixels_above_pillows_own_limit_takes_effect(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would refuse this image outright
    assert decode(path, max_pixels=20_000).size == (100, 100)
    with pytest.raises(ValueError, match="decompression bomb refused: 100x100 = 10000 pixels"):
        decode(path, max_pixels=5_000)


# --- snapshots -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"format": 1, "model": "m", "weights_sha256": "x", "settings": {}, "images": {"\xff": 1}}',
            "corrupt",
        ),
        (b'{"format": 1, "model": "m", "weights_sha256": "x", "settings": null, "images": {}}', "'settings'"),
        (b'{"format": 1, "model": "m", "weights_sha256": "x", "settings": {}, "images": {"a": "x"}}', "'a'"),
        (b"[1, 2]", "not a snapshot file"),
    ],
)
def test_corrupt_snapshot_metadata_is_a_usage_error(tmp_path, content, message):
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "snapshot.json").write_bytes(content)
    images(tmp_path / "in", ["a.png"])
    result = invoke("snapshot", "check", str(tmp_path / "in"), "--against", str(tmp_path / "snap"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_snapshot_summary_fails_on_changed_weights_and_points_only_at_written_diffs(model_dir, tmp_path):
    import tiny_model

    folder = images(tmp_path / "in", ["a.png", "b.png"])
    weights = [str(tmp_path / "w0.pt"), str(tmp_path / "w1.pt")]
    torch.save(tiny_model.build().state_dict(), weights[0])
    torch.save(_perturbed(tiny_model.build()), weights[1])
    snap = tmp_path / "snap"
    assert (
        invoke("snapshot", "record", str(folder), "--to", str(snap), "--weights", weights[0], *FAST).exit_code
        == 0
    )
    out = tmp_path / "out"
    result = invoke(
        "snapshot",
        "check",
        str(folder),
        "--against",
        str(snap),
        "--weights",
        weights[1],
        "-o",
        str(out),
        *FAST,
    )
    assert result.exit_code == 1
    assert "CHANGED: weights changed" in result.stderr
    assert "FAILED: the model or its settings changed since the recording (2 change(s)" in result.stderr
    shape = invoke(
        "snapshot", "check", str(folder), "--against", str(snap), "-o", str(out), "--weights", weights[0],
        "--model", "tiny_model:build", "--workers", "0", "--resolution", "24",
    )  # fmt: skip
    assert shape.exit_code == 1
    assert "FAIL (drift: shape (24, 24) differs from recorded (16, 16))" in shape.stderr
    assert "diff images" not in shape.stderr and not (out / "snapshot-diff").exists()


def _perturbed(model: torch.nn.Module) -> dict:
    with torch.no_grad():
        model[4].weight.mul_(1.001)  # a change far below the heatmap tolerances
    return model.state_dict()


def test_summary_line_never_reads_as_a_pass_when_settings_changed():
    report = CheckReport([Comparison("a", "pass")], ["weights changed: recorded x, now y"])
    assert format_table(report).splitlines()[-1] == (
        "FAILED: the model or its settings changed since the recording (1 change(s), listed above); "
        "heatmaps: 1 passed, 0 failed"
    )


# --- processes: locks, SIGKILL, Ctrl-C, closed stdout, killed workers ---------------------------------


def test_one_run_per_output_folder_and_a_killed_runs_lock_is_taken_over(model_dir, tmp_path):
    folder = tmp_path / "in"
    images(folder, ["seed.png"])
    for i in range(150):  # many inputs, one file: a run that lasts long enough to be caught and killed
        (folder / f"i{i:03d}.png").symlink_to(folder / "seed.png")
    out = tmp_path / "out"
    victim = spawn(model_dir, "run", str(folder), "-o", str(out), "-b", "1", *FAST)
    wait_for_records(out, 3, victim)
    busy = invoke("run", str(folder), "-o", str(out), "--resume", *FAST)  # a second run meanwhile
    assert busy.exit_code == 2, busy.output
    assert f"is in use by another lrp-heatmap run (PID {victim.pid} on host" in busy.stderr
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == victim.pid  # left behind by the kill
    (out / ".i000.heatmap.png.k1ll3d00.lrp.tmp").write_bytes(b"half a PNG")  # a write the kill cut short
    (out / ".notes.tmp").write_text("the user's own file")
    resumed = invoke("run", str(folder), "-o", str(out), "--resume", *FAST)
    assert resumed.exit_code == 0, resumed.output
    assert f"took over the lock of a run that ended without releasing it (PID {victim.pid}" in resumed.stderr
    assert re.search(r"removed \d+ unfinished temporary file\(s\) left by a killed run", resumed.stderr)
    assert (out / ".notes.tmp").exists() and not (out / LOCK_NAME).exists()
    (out / ".notes.tmp").unlink()
    records = assert_consistent(out)
    assert sorted(r["name"] for r in records) == sorted(p.stem for p in folder.iterdir())


def test_a_lock_held_by_another_process_refuses_the_run(model_dir, tmp_path):
    folder = images(tmp_path / "in", ["a.png"])
    held = FolderLock(tmp_path / "out").acquire()
    try:
        result = invoke("run", str(folder), "-o", str(tmp_path / "out"), *FAST)
    finally:
        held.release()
    assert result.exit_code == 2
    assert f"(PID {os.getpid()} on host " in result.stderr and "choose another --output" in result.stderr
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_closed_stdout_ends_quietly_with_consistent_outputs(model_dir, tmp_path):
    folder = tmp_path / "in"
    images(folder, ["seed.png"])
    for i in range(80):
        (folder / f"i{i:02d}.png").symlink_to(folder / "seed.png")
    out = tmp_path / "out"
    process = spawn(model_dir, "run", str(folder), "-o", str(out), "-b", "1", "--json", *FAST)
    first = json.loads(process.stdout.readline())  # like `| head -1`
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.wait(timeout=300)
    assert (process.returncode, stderr) == (141, "")
    records = assert_consistent(out)
    assert records[0] == first and 1 <= len(records) < 81


def test_ctrl_c_while_starting_exits_130_without_a_traceback(model_dir, tmp_path):
    folder = images(tmp_path / "in", ["a.png"])
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731 (a shell's background job ignores it)
    runs = [
        spawn(
            model_dir, "run", str(folder), "-o", str(tmp_path / f"out{i}"), *FAST, preexec_fn=default_sigint
        )
        for i in range(2)
    ]
    for process, delay in zip(runs, (0.5, 1.0)):
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
    for process in runs:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 130, stderr
        assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr
        assert stderr.decode().strip().splitlines()[-1].startswith("lrp-heatmap: interrupted")


def test_a_killed_decoding_worker_exits_3_with_its_reason(model_dir, tmp_path):
    folder = tmp_path / "in"
    images(folder, ["seed.png"], size=64)
    for i in range(150):
        (folder / f"i{i:03d}.png").symlink_to(folder / "seed.png")
    out = tmp_path / "out"
    process = spawn(model_dir, "run", str(folder), "-o", str(out), "-b", "1", *FAST[:4], "--workers", "1")
    wait_for_records(out, 1, process)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert children, "no DataLoader worker found"
    os.kill(int(children[0]), signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stderr
    message = stderr.decode().strip().splitlines()[-1]
    assert message.startswith("lrp-heatmap: error: a DataLoader worker process died")
    assert "--resume" in message and b"Traceback" not in stderr
    assert_consistent(out)
