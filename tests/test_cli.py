"""End to end through the real CLI (a subprocess, as users and CI call it) on generated and shipped images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lrp_cli.config import Config, ConfigError, load_config
from lrp_cli.data import crop_box, decode, discover
from lrp_cli.render import overlay_image
from lrp_cli.runinfo import image_records

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "input"
GUARD = (  # local (AF_UNIX) sockets stay allowed: DataLoader workers use them
    "import socket\n"
    "_connect = socket.socket.connect\n"
    "def _refuse(self, address):\n"
    "    if self.family != socket.AF_UNIX: raise RuntimeError(f'network access attempted: {address}')\n"
    "    return _connect(self, address)\n"
    "socket.socket.connect = _refuse\n"
    "from lrp_cli.cli import main\n"
    "main()\n"
)


def cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``lrp-heatmap`` in a fresh interpreter with network access disabled."""
    environment = {**os.environ, "LRP_HEATMAP_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", GUARD, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=600,
    )


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of awkward but valid images, plus broken ones and colliding names."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    (root / "a").mkdir()
    (root / "b").mkdir()
    Image.fromarray(rgb).save(root / "a" / "cat.png")
    Image.fromarray(rgb[::-1]).save(root / "b" / "cat.png")
    Image.fromarray(rgb).save(root / "b" / "cat.jpg", quality=90)
    Image.fromarray(rgb[..., 0]).save(root / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((60, 90), 128, np.uint8)])).save(root / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.gif")
    Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16)).save(root / "deep16.tif")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rgb).save(root / "photo.webp")
    Image.fromarray(rgb).save(root / "photo.bmp")
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated.save(root / "rotated.jpg", exif=exif)
    (root / ".hidden.png").write_bytes((root / "gray.png").read_bytes())
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broken")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "good.png")
    (root / "empty.png").write_bytes(b"")
    full = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "fake.jpg").write_text("this is text, not a JPEG")
    Image.new("L", (3000, 3000)).save(root / "bomb.png")
    return root


# --- decoding and discovery (in-process: fast and exact) -------------------------------------------


def test_every_mode_decodes_to_upright_rgb(images):
    for name in ["gray.png", "rgba.png", "palette.gif", "deep16.tif", "cmyk.jpg", "photo.webp", "photo.bmp"]:
        image = decode(images / name, 10**8)
        assert image.mode == "RGB", name
    assert decode(images / "rotated.jpg", 10**8).size == (60, 90)  # EXIF orientation applied
    rgba = np.asarray(decode(images / "rgba.png", 10**8), dtype=np.float64)
    original = np.asarray(Image.open(images / "a" / "cat.png"), dtype=np.float64)
    expected = original * 128 / 255 + 255 * (1 - 128 / 255)  # composited on white
    assert np.abs(rgba - expected).max() <= 1.0


def test_discovery_is_recursive_skips_hidden_and_keeps_names_apart(images):
    items = discover([str(images)])
    names = sorted(str(item.relative) for item in items)
    assert ".hidden" not in " ".join(names) and "notes" not in " ".join(names)
    assert {"a/cat", "b/cat.png", "b/cat.jpg", "photo.webp", "photo.bmp"} <= set(names)
    assert len(names) == len(set(names)) == 11


def test_missing_input_is_a_usage_error(tmp_path):
    result = cli("run", str(tmp_path / "nowhere"), "-o", str(tmp_path))
    assert result.returncode == 2 and "nowhere: no such file or folder" in result.stderr


# --- the run command --------------------------------------------------------------------------------


def test_run_writes_every_output_with_the_right_sizes(images, tmp_path):
    out = tmp_path / "out"
    result = cli(
        "run",
        str(images),
        "-o",
        str(out),
        "--workers",
        "2",
        "--batch-size",
        "5",
        "--resolution",
        "64",
        "--save-relevance",
        "--topk",
        "0.1",
    )
    assert result.returncode == 0, result.stderr
    records = manifest(out)
    assert len(records) == 11 and all(r["error"] is None for r in records)
    for record in records:
        source = Path(record["path"])
        heatmap = Image.open(record["outputs"]["heatmap"])
        overlay = Image.open(record["outputs"]["overlay"])
        width, height = decode(source, 10**8).size
        # at the photo's proportions: the shorter side keeps the model's 64 pixels, the longer stretches
        expected = (64, 64) if width == height else (
            (round(64 * width / height), 64) if width > height else (64, round(64 * height / width))
        )  # fmt: skip
        assert heatmap.size == expected and heatmap.format == "PNG"
        assert overlay.size == (width, height) and overlay.format == "JPEG"
        assert Image.open(record["outputs"]["panel"]).format == "JPEG"
        assert record["outputs"]["overlay"].endswith(".overlay.jpg")
        relevance = np.load(record["outputs"]["relevance"])
        assert relevance.shape == (3, 64, 64) and relevance.dtype == np.float32
        assert record["relevance_sum"] == pytest.approx(float(relevance.sum(dtype=np.float64)), rel=1e-5)
        assert 0 <= record["class_index"] < 1000 and isinstance(record["label"], str)
        assert record["target"] == record["class_index"]  # epsilon-plus-flat explains the predicted class
        assert (record["predicted_index"], record["predicted_label"]) == (
            record["class_index"],
            record["label"],
        )
        assert Path(record["path"]).is_absolute() and record["path_bytes"] is None
    assert (out / "a" / "cat.heatmap.png").exists() and (out / "b" / "cat.png.heatmap.png").exists()
    assert not list(out.rglob("*.tmp"))


def test_bad_files_are_reported_and_the_run_goes_on(broken, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "small.yaml"
    config.write_text("max_pixels: 1000000\n")  # the 3000x3000 file counts as a bomb
    result = cli(
        "run", str(broken), "-c", str(config), "-o", str(out), "--workers", "0", "--resolution", "32"
    )
    assert result.returncode == 1
    records = {Path(r["path"]).name: r for r in manifest(out)}
    assert records["good.png"]["error"] is None
    assert "empty" in records["empty.png"]["error"]
    assert "truncated" in records["truncated.png"]["error"] or "corrupt" in records["truncated.png"]["error"]
    assert "not an image" in records["fake.jpg"]["error"]
    assert "decompression bomb" in records["bomb.png"]["error"]
    for name in ["empty.png", "truncated.png", "fake.jpg", "bomb.png"]:
        assert f"skipped {broken / name}" in result.stderr
    assert (out / "good.heatmap.png").exists() and not (out / "fake.heatmap.png").exists()


def test_bomb_limit_comes_from_the_config(broken, tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("max_pixels: 10000000\nresolution: 32\nworkers: 0\n")
    out = tmp_path / "out"
    result = cli("run", str(broken / "bomb.png"), "-c", str(config), "-o", str(out))
    assert result.returncode == 0, result.stderr


def test_stdin_json_and_resume(images, tmp_path):
    out = tmp_path / "out"
    paths = [images / "gray.png", images / "photo.bmp"]
    first = cli(
        "run",
        "-",
        "-o",
        str(out),
        "--json",
        "--workers",
        "0",
        "--resolution",
        "32",
        stdin="\n".join(map(str, paths[:1])) + "\n",
    )
    assert first.returncode == 0, first.stderr
    printed = image_records(first.stdout.splitlines())
    assert [Path(r["path"]).name for r in printed] == ["gray.png"]
    # no progress bar or summary with --json (the warning: 32 px is not the weights' 224)
    assert [line for line in first.stderr.splitlines() if "warning:" not in line] == []
    before = (out / "gray.heatmap.png").stat().st_mtime_ns
    second = cli(
        "run",
        "-",
        "-o",
        str(out),
        "--json",
        "--resume",
        "--workers",
        "0",
        "--resolution",
        "32",
        stdin="\n".join(map(str, paths)) + "\n",
    )
    assert second.returncode == 0, second.stderr
    assert [Path(r["path"]).name for r in image_records(second.stdout.splitlines())] == ["photo.bmp"]
    assert (out / "gray.heatmap.png").stat().st_mtime_ns == before
    assert sorted(Path(r["path"]).name for r in manifest(out)) == ["gray.png", "photo.bmp"]


def test_embedded_model_sees_the_cat(tmp_path):
    out = tmp_path / "out"
    result = cli("run", str(SAMPLES / "cat.png"), "-o", str(out), "--workers", "0", "--json")
    assert result.returncode == 0, result.stderr
    (record,) = image_records(result.stdout.splitlines())
    assert 281 <= record["class_index"] <= 285, record  # ImageNet's domestic cats
    assert "cat" in record["label"]
    assert record["probability"] > 0.3


def test_shipped_photos_run_with_seed_composite(tmp_path):
    out = tmp_path / "out"
    result = cli(
        "run",
        str(SAMPLES),
        "-o",
        str(out),
        "--composite",
        "seed",
        "--topk",
        "0.05",
        "--overlay-format",
        "png",
    )
    assert result.returncode == 0, result.stderr
    records = manifest(out)
    assert len(records) == 4 and all(r["target"] == "softmax" for r in records)
    assert {Path(r["path"]).name for r in records} == {"cat.png", "coffee.png", "astronaut.png", "rocket.jpg"}
    assert all(Image.open(r["outputs"]["overlay"]).format == "PNG" for r in records)
    assert not list(out.glob("*.overlay.jpg"))


@pytest.mark.parametrize("policy", ["squash", "crop"])
def test_overlay_blends_only_where_there_is_relevance(policy):
    photo = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[12:20, 12:20] = 1.0  # one hot square in the middle of the explained area
    overlay = np.asarray(overlay_image(photo, heat, signed=False, policy=policy, alpha=0.6))
    assert overlay.shape == photo.shape
    changed = np.abs(overlay.astype(int) - photo).max(axis=2) > 0
    rows, cols = np.nonzero(changed)
    left, top, right, bottom = (0, 0, 90, 60) if policy == "squash" else crop_box(90, 60)
    scale_x, scale_y = (right - left) / 32, (bottom - top) / 32
    # only around the hot square, mapped onto the photo (one input pixel of bilinear spread)
    assert rows.min() >= top + 11 * scale_y and rows.max() <= top + 21 * scale_y
    assert cols.min() >= left + 11 * scale_x and cols.max() <= left + 21 * scale_x
    centre_row, centre_col = int(top + 16 * scale_y), int(left + 16 * scale_x)
    centre, source = (
        overlay[centre_row, centre_col].astype(float),
        photo[centre_row, centre_col].astype(float),
    )
    white = np.array([255.0, 255.0, 255.0])  # afmhot's top colour
    np.testing.assert_allclose(centre, source + 0.6 * (white - source), atol=2)


# --- usage and config errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topk", "0"], "'topk' = 0.0 is invalid; expected a value in (0.0, 1.0]"),
        (["--topk", "1.5"], "'topk' = 1.5"),
        (["--device", "cuda"], "CUDA is not available")
        if not torch.cuda.is_available()  # with CUDA: a device beyond the ones present
        else (["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device(s) present"),
        (["--composite", "nope"], "one of auto, alpha1-beta0"),
        (["--model", "vgg16"], "--weights FILE"),
        (["--model", "no.such.module:factory"], "cannot import"),
        (["--colormap", "virdis"], "did you mean 'viridis'"),
        (["--overlay-format", "gif"], "'overlay_format' = 'gif' is invalid; expected one of jpg, png"),
        (["--target", "5000"], "target class out of range 0..999"),
        (["--resolution", "8"], "'resolution' = 8 is invalid; expected a value in [16, 4096]"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(args, message, tmp_path):
    result = cli("run", str(SAMPLES / "cat.png"), "-o", str(tmp_path), "--workers", "0", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "cat.heatmap.png").exists()


def test_config_file_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("topk: 0.05\nbatchsize: 4\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown key 'batchsize' \(did you mean 'batch_size'\?\)"
    ):
        load_config(bad)
    bad.write_text("resolution: big\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: key 'resolution' = 'big' is invalid; expected an integer"
    ):
        load_config(bad)
    bad.write_text("rules: {conv: {rule: gamma, gamma: 0.5, gamme: 1}}\n")
    with pytest.raises(ConfigError, match=r"no parameter.*gamme"):
        load_config(bad)
    result = cli("run", str(SAMPLES / "cat.png"), "-c", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "cannot read config file" in result.stderr


def test_default_config_lists_every_key_with_its_default():
    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert data == Config().to_dict()
    seed = load_config(ROOT / "configs" / "vgg16.yaml")
    assert (seed.model, seed.composite, seed.topk) == ("vgg16", "seed", 0.05)


def test_entry_points_and_help():
    assert cli("--version").stdout.strip().startswith("lrp-heatmap ")
    assert "Explain every image" in cli("run", "--help").stdout
    module = subprocess.run(
        [sys.executable, "-m", "lrp_cli", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert module.returncode == 0 and "run" in module.stdout


def test_ctrl_c_keeps_finished_outputs_and_resume_completes(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-c",
        GUARD,
        "run",
        str(folder),
        "-o",
        str(out),
        "--workers",
        "0",
        "-b",
        "1",
        "--resolution",
        "64",
        "--quiet",
    ]
    process = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, "LRP_HEATMAP_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as in a terminal, even when the suite runs where SIGINT is ignored (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    manifest_file = out / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if manifest_file.exists() and len(manifest_file.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr
    finished = manifest(out)
    assert 3 <= len(finished) < 40
    for record in finished:  # every recorded output is a whole, readable PNG
        for path in record["outputs"].values():
            Image.open(path).verify()
    assert not list(out.rglob("*.tmp"))
    resumed = cli(
        "run", str(folder), "-o", str(out), "--workers", "0", "--resolution", "64", "--resume", "--json"
    )
    assert resumed.returncode == 0, resumed.stderr
    redone = [r["path"] for r in image_records(resumed.stdout.splitlines())]
    assert not {r["path"] for r in finished} & set(redone)
    assert sorted(r["path"] for r in manifest(out)) == sorted(str(p.resolve()) for p in folder.iterdir())
