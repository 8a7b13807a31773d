"""One test per README promise, named after it, so a promise nobody checks shows as a missing test.

Runs go through the real command line in-process (Typer's CliRunner) on a tiny random model and small
generated photos; expected values are computed here from the photos, the model and the README's
description (the normalisation, the colour maps, the blend), not read back from the tool.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lrp_cli import interrupt
from lrp_cli.cli import app
from lrp_cli.data import decode
from lrp_cli.lrp import Composite, Epsilon, Explainer, Gamma, ZPlus, explain, winograd
from lrp_cli.runinfo import image_records

interrupt.disarm()  # importing the CLI arms its early Ctrl-C exit; pytest keeps its own handling

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32  # photos are generated at the model's resolution, so resizing is the identity
NETS = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, width=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def build():
    torch.manual_seed(0)
    return Tiny()


def other():
    torch.manual_seed(1)
    return Tiny()


def wide():  # 128 -> 256 channels on 32x32 maps: Winograd territory
    torch.manual_seed(0)
    return Tiny(width=128)


class Sorting(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.sort(self.conv(x).flatten(1), dim=1).values


def sorting():
    return Sorting()


def interrupted():
    raise KeyboardInterrupt
"""
MODEL = "promise_nets:build"
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # custom models' default normalisation


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """The module of test models, importable as ``promise_nets`` (in-process and in subprocesses)."""
    folder = tmp_path_factory.mktemp("nets")
    (folder / "promise_nets.py").write_text(NETS)
    sys.path.insert(0, str(folder))
    import promise_nets

    yield promise_nets
    sys.path.remove(str(folder))
    sys.modules.pop("promise_nets", None)


def _photo(seed: int, width: int = SIZE, height: int = SIZE) -> np.ndarray:
    """A smooth photo (gradients and a bright disc) that JPEG encodes faithfully."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width] / max(width, height)
    a, b, c = rng.uniform(0.2, 1.0, 3)
    centre = rng.uniform(0.3, 0.7, 2)
    disc = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) < 0.04
    channels = [a * rows + (1 - a) * cols, b * (1 - rows), c * cols * rows + 0.5 * disc]
    return (np.clip(np.stack(channels, axis=2), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for index, name in enumerate(["a", "b", "c"]):
        Image.fromarray(_photo(index)).save(folder / f"{name}.png")
    return folder


def invoke(*args: object):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def run(photos_or_files, out: Path, *options: object, code: int = 0):
    """``lrp-heatmap run`` on the test model with relevance saved; asserts the exit code."""
    inputs = photos_or_files if isinstance(photos_or_files, list) else [photos_or_files]
    result = invoke(
        "run", *inputs, "-o", out, "--model", MODEL, "--resolution", SIZE, "--workers", 0,
        "--save-relevance", *options,
    )  # fmt: skip
    assert result.exit_code == code, result.output
    return result


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def saved(out: Path, name: str) -> np.ndarray:
    return np.load(out / f"{name}.relevance.npy")


def model_input(paths: list[Path], mean=IMAGENET[0], std=IMAGENET[1]) -> torch.Tensor:
    """What the README says the model sees: RGB in [0, 1], normalised per channel."""
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).astype(np.float32) / 255.0
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).reshape(1, 3, 1, 1)) / torch.tensor(std).reshape(1, 3, 1, 1)


def close(actual: np.ndarray, expected, rtol: float = 1e-4) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


# --- exit codes -----------------------------------------------------------------------------------


def test_exit_2_for_an_unknown_model_name(photos, tmp_path):
    result = invoke("run", photos, "-o", tmp_path / "out", "--model", "resnet5o", "--workers", 0)
    assert result.exit_code == 2, result.output
    assert "resnet5o" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_exit_2_for_a_bad_weights_file(nets, photos, tmp_path):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    result = invoke(
        "run", photos, "-o", tmp_path / "out", "--model", MODEL, "--weights", garbage, "--workers", 0
    )
    assert result.exit_code == 2, result.output
    assert str(garbage) in result.stderr and "Traceback" not in result.output
    misfit = tmp_path / "misfit.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, misfit)
    result = invoke(
        "run", photos, "-o", tmp_path / "out", "--model", MODEL, "--weights", misfit, "--workers", 0
    )
    assert result.exit_code == 2, result.output
    assert str(misfit) in result.stderr
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_exit_2_for_an_unsupported_operation(nets, photos, tmp_path):
    result = invoke("run", photos, "-o", tmp_path / "out", "--model", "promise_nets:sorting", "--workers", 0)
    assert result.exit_code == 2, result.output
    assert "sort" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out" / "a.heatmap.png").exists()


def test_exit_130_before_the_first_image(nets, photos, tmp_path):
    """Ctrl-C while the model loads: exit 130, one line, nothing written."""
    out = tmp_path / "out"
    result = invoke("run", photos, "-o", out, "--model", "promise_nets:interrupted", "--workers", 0)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    assert not (out / "manifest.jsonl").exists() and not list(out.glob("*.png"))


# --- configuration keys through the pipeline -------------------------------------------------------


def test_key_weights_loads_the_given_state_dict(nets, photos, tmp_path):
    state = tmp_path / "other.pth"
    torch.save(nets.other().state_dict(), state)
    run(photos, tmp_path / "out", "--weights", state)
    x = model_input(sorted(photos.glob("*.png")))
    expected = explain(nets.other().eval(), x, composite="epsilon-plus-flat")
    default = explain(nets.build().eval(), x, composite="epsilon-plus-flat")
    for row, name in enumerate("abc"):
        close(saved(tmp_path / "out", name), expected[row])
        assert not np.allclose(saved(tmp_path / "out", name), default[row], rtol=1e-2)


def test_keys_mean_std_normalise_the_input(nets, photos, tmp_path):
    config = tmp_path / "norm.yaml"
    config.write_text("mean: [0.2, 0.3, 0.4]\nstd: [0.5, 0.25, 0.125]\n")
    run(photos, tmp_path / "out", "-c", config)
    model = nets.build().eval()
    x = model_input(sorted(photos.glob("*.png")), [0.2, 0.3, 0.4], [0.5, 0.25, 0.125])
    expected = explain(model, x, composite="epsilon-plus-flat")
    default = explain(model, model_input(sorted(photos.glob("*.png"))), composite="epsilon-plus-flat")
    for row, name in enumerate("abc"):
        close(saved(tmp_path / "out", name), expected[row])
        assert not np.allclose(saved(tmp_path / "out", name), default[row], rtol=1e-2)


def test_key_rules_overrides_the_preset(nets, photos, tmp_path):
    config = tmp_path / "rules.yaml"
    config.write_text(
        "composite: epsilon-plus-flat\nrules:\n  conv: {rule: gamma, gamma: 0.5}\n"
        '  "head": {rule: epsilon, epsilon: 0.25}\n  first: zplus\n'
    )
    run(photos, tmp_path / "out", "-c", config)
    composite = Composite(
        layer_map={"conv": Gamma(gamma=0.5), "linear": Epsilon()},
        first=ZPlus(),
        name_map=(("head", Epsilon(epsilon=0.25)),),
    )
    x = model_input(sorted(photos.glob("*.png")))
    expected = explain(nets.build().eval(), x, composite=composite)
    preset = explain(nets.build().eval(), x, composite="epsilon-plus-flat")
    for row, name in enumerate("abc"):
        close(saved(tmp_path / "out", name), expected[row])
        assert not np.allclose(saved(tmp_path / "out", name), preset[row], rtol=1e-2)


def test_key_renormalize_rescales_what_the_filter_keeps(nets, photos, tmp_path):
    run(photos, tmp_path / "out", "--topk", 0.3, "--renormalize")
    x = model_input(sorted(photos.glob("*.png")))
    model = nets.build().eval()
    expected = explain(model, x, composite="epsilon-plus-flat", topk=0.3, renormalize=True)
    plain = explain(model, x, composite="epsilon-plus-flat", topk=0.3)
    for row, name in enumerate("abc"):
        close(saved(tmp_path / "out", name), expected[row])
        assert not np.allclose(saved(tmp_path / "out", name), plain[row], rtol=1e-2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_key_precision_agrees_with_fp32_to_r_0_9999(nets, photos, tmp_path, precision):
    """README: heatmaps agree with fp32 to Pearson r >= 0.9999 per image (measured there with the seed
    composite); and they are computed in that precision (not identical to fp32, which is what ignoring
    the key would give). Measured here: r = 0.99996 (bf16), 0.999999 (fp16)."""
    run(photos, tmp_path / "full", "--composite", "seed")
    run(photos, tmp_path / "low", "--composite", "seed", "--precision", precision)
    for name in "abc":
        full, low = saved(tmp_path / "full", name).ravel(), saved(tmp_path / "low", name).ravel()
        assert np.corrcoef(full, low)[0, 1] >= 0.9999, name
        assert np.abs(full - low).max() > 1e-4 * np.abs(full).max(), name


def test_key_winograd_switches_wide_convolutions(nets, photos, tmp_path, monkeypatch):
    calls = []
    conv3x3 = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a, **k: calls.append(1) or conv3x3(*a, **k))
    run(photos, tmp_path / "fast", "--model", "promise_nets:wide")
    assert calls, "winograd: true must run the wide layer by Winograd"
    calls.clear()
    run(photos, tmp_path / "direct", "--model", "promise_nets:wide", "--no-winograd")
    assert not calls, "winograd: false must keep every convolution direct"
    for name in "abc":
        fast, direct = saved(tmp_path / "fast", name), saved(tmp_path / "direct", name)
        assert not np.array_equal(fast, direct)
        assert np.corrcoef(fast.ravel(), direct.ravel())[0, 1] > 0.99999


def test_key_resize_crop_explains_the_centred_square(nets, tmp_path):
    photo = _photo(7, width=48, height=SIZE)
    Image.fromarray(photo).save(tmp_path / "wide.png")
    out = tmp_path / "out"
    run(tmp_path / "wide.png", out, "--resize", "crop", "--overlay-format", "png")
    square = tmp_path / "square.png"
    Image.fromarray(photo[:, 8:40]).save(square)  # the centred 32x32 square of the 48x32 photo
    expected = explain(nets.build().eval(), model_input([square]), composite="epsilon-plus-flat")[0]
    close(saved(out, "wide"), expected)
    overlay = np.asarray(Image.open(out / "wide.overlay.png").convert("RGB"))
    assert overlay.shape == photo.shape
    np.testing.assert_array_equal(overlay[:, :8], photo[:, :8])  # borders: not explained, unchanged
    np.testing.assert_array_equal(overlay[:, 40:], photo[:, 40:])
    assert (overlay[:, 8:40] != photo[:, 8:40]).any()


def _colour(name: str, values: np.ndarray) -> np.ndarray:
    return matplotlib.colormaps[name](values)[..., :3] * 255.0


def _scaled(heat: np.ndarray, signed: bool) -> np.ndarray:
    """The README's scaling: by the 99.5th percentile of abs(R) (of R's positive part when unsigned)."""
    magnitude = np.abs(heat) if signed else np.clip(heat, 0, None)
    return np.clip(heat / np.percentile(magnitude, 99.5), -1.0 if signed else 0.0, 1.0)


def _grid_taps(heat: np.ndarray) -> np.ndarray:
    """README, "The dot grid": taps 1/4, 1/2, 1/4 along each axis, edge pixels repeated."""
    for axis in (0, 1):
        padded = np.pad(heat, [(1, 1) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        low, mid, high = (np.take(padded, range(k, k + heat.shape[axis]), axis=axis) for k in range(3))
        heat = 0.25 * low + 0.5 * mid + 0.25 * high
    return heat


def _blurred(heat: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian of ``sigma`` pixels cut at the map's edges (each pixel's weights summing to 1)."""
    out = np.zeros_like(heat)
    rows, cols = np.indices(heat.shape)
    for r in range(heat.shape[0]):
        for c in range(heat.shape[1]):
            weight = np.exp(-0.5 * ((rows - r) ** 2 + (cols - c) ** 2) / sigma**2)
            out[r, c] = (weight * heat).sum() / weight.sum()
    return out


@pytest.mark.parametrize(
    ("composite", "colormap", "expected_map", "signed"),
    [
        ("seed", "auto", "afmhot", False),
        ("epsilon-plus-flat", "auto", "bwr", True),
        ("epsilon-plus-flat", "viridis", "viridis", True),
    ],
)
def test_key_colormap_and_percentile_scaling(
    nets, photos, tmp_path, composite, colormap, expected_map, signed
):
    out = tmp_path / "out"
    run(photos, out, "--composite", composite, "--colormap", colormap)
    for name in "abc":
        heat = _grid_taps(saved(out, name).astype(np.float64).sum(axis=0))
        scaled = _scaled(heat, signed)
        expected = _colour(expected_map, (scaled + 1) / 2 if signed else scaled)
        pixels = np.asarray(Image.open(out / f"{name}.heatmap.png").convert("RGB"), dtype=np.float64)
        # 256 colour levels: half a level times the map's steepest channel, plus rounding (measured 3.1)
        assert np.abs(pixels - expected).max() <= 4.0, name
        assert (scaled >= 1.0).mean() <= 0.01  # the few extreme pixels saturate, not the map


def _blend(photo: np.ndarray, colours: np.ndarray, weight: np.ndarray) -> np.ndarray:
    w = weight[..., None] / 255.0
    return photo * (1 - w) + colours * w


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_key_overlay_alpha_sets_the_strongest_blend(nets, photos, tmp_path, alpha):
    config = tmp_path / "alpha.yaml"
    config.write_text(f"overlay_alpha: {alpha}\noverlay_format: png\ncomposite: seed\n")
    out = tmp_path / "out"
    run(photos, out, "-c", config)
    for name in "abc":
        photo = np.asarray(Image.open(photos / f"{name}.png").convert("RGB"), dtype=np.float64)
        # overlays: the grid taps, a Gaussian of 1% of the side, then the weight alpha * |R|^0.5
        shown = _blurred(_grid_taps(saved(out, name).astype(np.float64).sum(axis=0)), 0.01 * SIZE)
        scaled = _scaled(shown, signed=False)
        weight = np.floor(np.sqrt(scaled) * alpha * 255.0 + 0.5)
        expected = _blend(photo, _colour("afmhot", scaled), weight)
        overlay = np.asarray(Image.open(out / f"{name}.overlay.png").convert("RGB"), dtype=np.float64)
        assert np.abs(overlay - expected).max() <= 3.0, name
        if alpha == 0.0:
            np.testing.assert_array_equal(overlay, photo)
        else:  # where relevance saturates, the heatmap colour is blended in at exactly alpha
            top = scaled >= 1.0
            assert top.any()
            blended = photo[top] + alpha * (_colour("afmhot", scaled)[top] - photo[top])
            assert np.abs(overlay[top] - blended).max() <= 3.0


def test_overlay_is_a_whole_jpeg_at_quality_90(nets, photos, tmp_path):
    run(photos, tmp_path / "jpg", "--composite", "seed")
    run(photos, tmp_path / "png", "--composite", "seed", "--overlay-format", "png")
    for name in "abc":
        path = tmp_path / "jpg" / f"{name}.overlay.jpg"
        data = path.read_bytes()
        assert data[:2] == b"\xff\xd8" and data.endswith(b"\xff\xd9")  # whole: start and end markers
        with Image.open(path) as jpeg:
            jpeg.load()  # a full decode: raises on a truncated file
            tables = jpeg.quantization
            decoded = np.asarray(jpeg.convert("RGB"), dtype=np.float64)
        lossless = Image.open(tmp_path / "png" / f"{name}.overlay.png").convert("RGB")
        reference = io.BytesIO()
        lossless.save(reference, format="JPEG", quality=90)
        reference = Image.open(reference)
        assert tables == reference.quantization  # the quality-90 tables
        # the very blend of the lossless overlay, encoded at quality 90
        np.testing.assert_array_equal(decoded, np.asarray(reference.convert("RGB"), dtype=np.float64))
        photo = np.asarray(Image.open(photos / f"{name}.png").convert("RGB"), dtype=np.float64)
        blended = np.abs(np.asarray(lossless, dtype=np.float64) - photo).max(axis=2) > 30
        assert blended.any() and np.abs(decoded - photo).max(axis=2)[blended].mean() > 20


# --- the manifest ---------------------------------------------------------------------------------


def test_manifest_fields_name_ms_null_label_and_record_order(nets, photos, tmp_path):
    nested = tmp_path / "in"
    (nested / "x").mkdir(parents=True)
    (nested / "y").mkdir()
    for folder, name in [("x", "a"), ("y", "a"), ("x", "b")]:
        (nested / folder / f"{name}.png").write_bytes((photos / f"{name}.png").read_bytes())
    order = [nested / "y" / "a.png", nested / "x" / "b.png", nested / "x" / "a.png"]
    out = tmp_path / "out"
    started = time.perf_counter()
    run(order, out, "--batch-size", 2)
    wall_ms = (time.perf_counter() - started) * 1000
    records = manifest(out)
    assert [r["path"] for r in records] == [str(p.resolve()) for p in order]  # input order
    assert [r["name"] for r in records] == ["y/a", "x/b", "x/a"]  # output stems, relative
    for record in records:
        assert record["label"] is None  # a custom model has no class names
        assert 0 < record["ms"] < wall_ms
        assert Path(record["outputs"]["heatmap"]) == out / f"{record['name']}.heatmap.png"


def test_manifest_keeps_input_order_with_a_broken_file(nets, photos, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    order = [photos / "a.png", broken, photos / "b.png"]
    run(order, tmp_path / "out", "--batch-size", 3, code=1)
    assert [Path(r["path"]).name for r in manifest(tmp_path / "out")] == ["a.png", "broken.png", "b.png"]


def test_resume_redoes_an_input_whose_output_file_is_missing(nets, photos, tmp_path):
    out = tmp_path / "out"
    run(photos, out)
    (out / "b.heatmap.png").unlink()
    untouched = (out / "a.heatmap.png").stat().st_mtime_ns
    result = run(photos, out, "--resume", "--json")
    redone = [Path(r["path"]).name for r in image_records(result.stdout.splitlines())]
    assert redone == ["b.png"]
    assert (out / "b.heatmap.png").exists()
    assert (out / "a.heatmap.png").stat().st_mtime_ns == untouched


def _stderr_of_run(nets, photos: Path, out: Path, *options: str, terminal: bool) -> str:
    """Run the real CLI in a subprocess with stderr on a pseudo-terminal or a pipe."""
    environment = {**os.environ, "PYTHONPATH": str(Path(nets.__file__).parent), "LRP_HEATMAP_OFFLINE": "1"}
    args = [sys.executable, "-m", "lrp_cli", "run", str(photos), "-o", str(out), "--model", MODEL]
    args += ["--resolution", str(SIZE), "--workers", "0", *options]
    if not terminal:
        done = subprocess.run(args, capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=secondary, env=environment, cwd=ROOT)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert process.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_only_on_a_terminal(nets, photos, tmp_path):
    on_terminal = _stderr_of_run(nets, photos, tmp_path / "t", terminal=True)
    assert "3/3" in on_terminal and "img" in on_terminal  # tqdm's counter and unit
    piped = _stderr_of_run(nets, photos, tmp_path / "p", terminal=False)
    assert "3/3" not in piped and "3 explained" in piped


# --- snapshots ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recording(nets, photos, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("snapshot") / "snap"
    result = invoke(
        "snapshot", "record", photos, "--to", target, "--model", MODEL, "--resolution", SIZE, "--workers", 0
    )
    assert result.exit_code == 0, result.output
    return target


def test_snapshot_record_exits_1_when_an_input_fails(nets, photos, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes((photos / "a.png").read_bytes())
    (folder / "empty.png").write_bytes(b"")
    target = tmp_path / "snap"
    result = invoke(
        "snapshot", "record", folder, "--to", target, "--model", MODEL, "--resolution", SIZE, "--workers", 0
    )
    assert result.exit_code == 1, result.output
    assert "empty.png" in result.stderr
    assert sorted(json.loads((target / "snapshot.json").read_text())["images"]) == ["a"]


def test_snapshot_check_reports_a_changed_model(nets, photos, recording, tmp_path):
    result = invoke(
        "snapshot", "check", photos, "--against", recording, "--model", "promise_nets:other",
        "--resolution", SIZE, "--workers", 0, "-o", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert f"CHANGED: model changed: recorded '{MODEL}', now 'promise_nets:other'" in result.stderr


def _metrics(recorded: np.ndarray, current: np.ndarray, fraction: float) -> dict[str, float]:
    """The README's four metrics, computed here."""
    a, b = recorded.ravel().astype(np.float64), current.ravel().astype(np.float64)
    scale = np.abs(a).max()
    k = round(fraction * a.size)
    top_a, top_b = set(np.argsort(-np.abs(a))[:k]), set(np.argsort(-np.abs(b))[:k])
    return {
        "pearson": float(np.corrcoef(a, b)[0, 1]),
        "max_diff": float(np.abs(a - b).max() / scale),
        "mean_diff": float(np.abs(a - b).mean() / scale),
        "iou": len(top_a & top_b) / len(top_a | top_b),
    }


def _read_map(path: Path, scale: float) -> np.ndarray:
    with gzip.open(path) as zipped:
        return np.load(io.BytesIO(zipped.read())).astype(np.float32) * np.float32(scale)


@pytest.fixture(scope="module")
def drifted(recording, tmp_path_factory):
    """A copy of the recording whose map of ``b`` lost half its top 5% pixels (every other one by rank),
    and that drift's metrics."""
    folder = tmp_path_factory.mktemp("drifted") / "snap"
    folder.mkdir()
    for path in recording.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    meta = json.loads((recording / "snapshot.json").read_text())
    current = _read_map(recording / "b.relevance.npy.gz", meta["images"]["b"]["scale"])
    edited = current.copy().ravel()
    edited[np.argsort(-np.abs(edited))[: int(0.05 * edited.size) : 2]] = 0.0  # every other one
    edited = edited.reshape(current.shape)
    scale = float(np.abs(edited).max())
    raw = io.BytesIO()
    np.save(raw, (edited / scale).astype(np.float16))
    (folder / "b.relevance.npy.gz").write_bytes(gzip.compress(raw.getvalue()))
    meta["images"]["b"]["scale"] = scale
    (folder / "snapshot.json").write_text(json.dumps(meta))
    recorded = _read_map(folder / "b.relevance.npy.gz", scale)
    values = {fraction: _metrics(recorded, current, fraction) for fraction in (0.05, 0.5)}
    return folder, values


LENIENT = {"min-pearson": -1.0, "max-diff": 100.0, "max-mean-diff": 100.0, "min-iou": 0.0}
METRICS = {"min-pearson": "pearson", "max-diff": "max_diff", "max-mean-diff": "mean_diff", "min-iou": "iou"}
REASONS = {"min-pearson": "pearson", "max-diff": "max diff", "max-mean-diff": "mean diff", "min-iou": "IoU"}


def _check(photos: Path, snapshot: Path, out: Path, **tolerances: float):
    options = [item for key, value in {**LENIENT, **tolerances}.items() for item in (f"--{key}", value)]
    return invoke(
        "snapshot", "check", photos, "--against", snapshot, "--model", MODEL, "--resolution", SIZE,
        "--workers", 0, "-o", out, *options,
    )  # fmt: skip


@pytest.mark.parametrize("option", ["min-pearson", "max-diff", "max-mean-diff", "min-iou"])
def test_snapshot_check_tolerance_option(nets, photos, drifted, tmp_path, option):
    """Each option decides on its own metric: just on the lenient side of the drift's value it passes,
    just on the strict side it fails with that metric named."""
    snapshot, values = drifted
    value = values[0.05][METRICS[option]]
    lower_is_worse = option.startswith("min-")
    passing = value - 0.01 if lower_is_worse else value + 0.01
    failing = value + 0.01 if lower_is_worse else value - 0.01
    result = _check(photos, snapshot, tmp_path / "pass", **{option: passing})
    assert result.exit_code == 0, result.output
    result = _check(photos, snapshot, tmp_path / "fail", **{option: failing})
    assert result.exit_code == 1, result.output
    assert REASONS[option] in result.stderr and "2 passed, 1 failed" in result.stderr
    assert (tmp_path / "fail" / "snapshot-diff" / "b.diff.png").exists()


def test_snapshot_check_tolerance_option_mask_fraction(nets, photos, drifted, tmp_path):
    """The IoU's mask size: losing half the top 5% halves the 5% masks' overlap, barely moves the 50% ones."""
    snapshot, values = drifted
    threshold = (values[0.05]["iou"] + values[0.5]["iou"]) / 2
    assert values[0.05]["iou"] < threshold - 0.05 < threshold + 0.05 < values[0.5]["iou"]
    assert (
        _check(photos, snapshot, tmp_path / "a", **{"min-iou": threshold, "mask-fraction": 0.05}).exit_code
        == 1
    )
    result = _check(photos, snapshot, tmp_path / "b", **{"min-iou": threshold, "mask-fraction": 0.5})
    assert result.exit_code == 0, result.output


def test_snapshot_tolerances_from_the_config(nets, photos, drifted, tmp_path):
    snapshot, values = drifted
    config = tmp_path / "tolerances.yaml"
    config.write_text(
        f"snapshot: {{min_pearson: {values[0.05]['pearson'] + 0.01}, max_diff: 100, max_mean_diff: 100, "
        "min_iou: 0}\n"
    )
    result = invoke(
        "snapshot", "check", photos, "--against", snapshot, "--model", MODEL, "--resolution", SIZE,
        "--workers", 0, "-o", tmp_path, "-c", config,
    )  # fmt: skip
    assert result.exit_code == 1 and "pearson" in result.stderr, result.output


# --- decoding: every mode to upright 8-bit RGB ----------------------------------------------------

GRADIENT = np.arange(SIZE * SIZE * 3, dtype=np.uint32).reshape(SIZE, SIZE, 3) * 7 % 256


def test_grayscale_rgba_la_palette_16bit_cmyk_become_8bit_rgb(tmp_path):
    """Pixel values after conversion, worked out from each mode's definition."""
    rgb = GRADIENT.astype(np.uint8)
    gray = rgb[..., 0]
    alpha = (np.arange(SIZE * SIZE, dtype=np.uint32).reshape(SIZE, SIZE) * 5 % 256).astype(np.uint8)

    def over_white(c):
        return c.astype(np.float64) * alpha[..., None] / 255 + 255 * (1 - alpha[..., None] / 255)

    deep = (np.arange(SIZE * SIZE, dtype=np.uint32).reshape(SIZE, SIZE) * 61 % 65536).astype(np.uint16)
    palette = np.array([[10, 20, 30], [200, 100, 0], [0, 255, 128], [90, 90, 250]], dtype=np.uint8)
    indices = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 4).astype(np.uint8)
    cases = {
        "gray.png": (Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, axis=2)),
        "rgba.png": (Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), over_white(rgb)),
        "la.png": (
            Image.fromarray(np.dstack([gray, alpha]), "LA"),
            over_white(np.repeat(gray[..., None], 3, 2)),
        ),
        "deep16.png": (Image.fromarray(deep), np.repeat((deep / 65535 * 255)[..., None], 3, axis=2)),
        # K = 0: RGB = 255 - CMY under any CMYK conversion
        "cmyk.tif": (Image.fromarray(np.dstack([255 - rgb, np.zeros_like(gray)]), "CMYK"), rgb),
    }
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.ravel().tolist())
    cases["palette.png"] = (image, palette[indices])
    transparent = image.copy()
    transparent.info["transparency"] = 1  # index 1 transparent: composited on white
    expected = palette[indices].astype(np.float64)
    expected[indices == 1] = 255
    cases["palette-transparent.png"] = (transparent, expected)
    for name, (image, expected) in cases.items():
        path = tmp_path / name
        image.save(path, **({"transparency": 1} if "transparent" in name else {}))
        decoded = decode(path, 10**8)
        assert decoded.mode == "RGB", name
        pixels = np.asarray(decoded, dtype=np.float64)
        assert pixels.shape == (SIZE, SIZE, 3), name
        assert np.abs(pixels - expected).max() <= 1.0, name


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_exif_rotation_turns_the_photo_upright(tmp_path, suffix):
    """Orientation 6 means 'rotate 90 degrees clockwise to display': the stored left edge becomes the top
    and the stored top-left corner the top-right. A wrong-way or mirrored turn puts the marks elsewhere."""
    stored = np.zeros((48, 64, 3), np.uint8)  # 48 rows x 64 columns
    stored[:, :16] = (255, 0, 0)  # left edge red
    stored[:16, :16] = (0, 255, 0)  # top-left corner green
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated.{suffix}"
    image.save(path, exif=exif, **({"quality": 95} if suffix == "jpg" else {}))
    pixels = np.asarray(decode(path, 10**8), dtype=np.float64)
    expected = np.rot90(stored, k=-1).astype(np.float64)  # clockwise
    assert pixels.shape == expected.shape == (64, 48, 3)
    if suffix == "png":
        np.testing.assert_array_equal(pixels, expected)
    else:  # JPEG: the same picture up to its loss
        assert np.abs(pixels - expected).mean() < 3.0
    assert pixels[4, 40, 1] > 200 and pixels[4, 40, 0] < 60  # green at the top right
    assert pixels[4, 20, 0] > 200 and pixels[60, 20, 0] < 60  # red along the top only


# --- the Python API -------------------------------------------------------------------------------


def test_api_explainer_is_traced_once_and_reused_for_every_batch(nets, monkeypatch):
    from lrp_cli.lrp import engine

    traced = []
    build_program = engine.build_program
    monkeypatch.setattr(engine, "build_program", lambda model: traced.append(1) or build_program(model))
    model = nets.build().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, 16, 16, generator=g) for n in (4, 2, 4)]
    explainer = Explainer(model, "epsilon-plus-flat", mean=[0.5] * 3, std=[0.5] * 3)
    results = [explainer(batch, target=1) for batch in batches]
    assert len(traced) == 1
    for batch, result in zip(batches, results):  # each as a fresh explainer would have it
        fresh = explain(model, batch, composite="epsilon-plus-flat", target=1)
        torch.testing.assert_close(result.relevance, fresh, rtol=1e-6, atol=1e-9)


def test_api_channels_last():
    """Both memory layouts give the same relevance (float64: to rounding); channels_last runs the layers
    in that layout, and the result comes back in the ordinary one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = {
        layout: Explainer(model, "epsilon-plus-flat", channels_last=layout, trace=True)(x, target=2)
        for layout in (True, False)
    }
    torch.testing.assert_close(results[True].relevance, results[False].relevance, rtol=1e-12, atol=1e-15)
    assert results[True].relevance.is_contiguous()
    assert results[True].trace["2"].is_contiguous(memory_format=torch.channels_last)
    assert not results[False].trace["2"].is_contiguous(memory_format=torch.channels_last)


def test_api_trace_records_every_layer(nets):
    result = Explainer(nets.build().double().eval(), "epsilon-plus-flat", trace=True)(
        torch.rand(1, 3, 16, 16, dtype=torch.float64), target=0
    )
    assert result.trace["relu"].shape == (1, 8, 16, 16)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_api_retain_and_release_freed_memory():
    """retain: a freed 256 MiB buffer stays in the process for the next batch; release: it goes back."""
    from lrp_cli.lrp import release_freed_memory, retain_freed_memory

    if not retain_freed_memory():
        pytest.skip("not glibc: retain_freed_memory() changes nothing here")
    size = 256 << 20
    before = _resident_bytes()
    buffer = torch.ones(size // 4)
    del buffer
    kept = _resident_bytes() - before
    release_freed_memory()
    returned = _resident_bytes() - before
    assert kept > 0.9 * size, kept
    assert returned < 0.1 * size, returned
