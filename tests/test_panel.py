"""Pictures people look at (lrp_cli.render, lrp_cli.panel): heatmaps at the photo's proportions, the grid
taps against the dot grid of stride-2 first layers, overlay modes, the panel and the CLI keys.

Expected values are computed here from the README's description (taps, blend weights, sizes), not read
back from the tool; the dot grid is produced by the engine's own flat rule on a stride-2 convolution.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from lrp_cli import interrupt
from lrp_cli.cli import app
from lrp_cli.lrp import explain
from lrp_cli.panel import TILE_HEIGHT, Caption, caption_lines, font, panel_image
from lrp_cli.render import aspect_size, colorize, overlay_image, pictures, smooth

interrupt.disarm()

NETS = """
import torch
from torch import nn


class Strided(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv1(x)).mean(dim=(2, 3)))


def build():
    torch.manual_seed(0)
    return Strided()
"""


def _parity_means(heat: np.ndarray) -> np.ndarray:
    """Mean |R| of the four (row, column) parity classes, relative to the largest."""
    means = np.array([np.abs(heat[i::2, j::2]).mean() for i in (0, 1) for j in (0, 1)])
    return means / means.max()


def test_the_dot_grid_is_the_stride_2_coverage_and_the_grid_taps_remove_it():
    """A 3x3 stride-2 first layer covers (even, even) pixels by 4 windows, (even, odd) by 2 and (odd, odd)
    by 1: the flat rule, which spreads each window's relevance evenly, leaves exactly that grid."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.rand(1, 3, 33, 33, dtype=torch.float64)
    model = model.double().eval()
    model(x)  # materialise the lazy layer
    with torch.no_grad():  # positive head, no bias: every window's relevance is positive (no cancelling)
        model[3].weight.abs_()
        model[3].bias.zero_()
    raw = explain(model, x, composite="epsilon-plus-flat", target=0)[0].sum(0).numpy()
    inner = raw[1:-1, 1:-1]  # the border windows are cut by the padding
    # rows/cols 1, 3, ... of the photo are window centres only; 2, 4, ... are shared by two windows
    np.testing.assert_allclose(np.sort(_parity_means(inner)), [0.25, 0.5, 0.5, 1.0], rtol=0.15)
    shown = smooth(raw)[2:-2, 2:-2]
    np.testing.assert_allclose(_parity_means(shown), 1.0, rtol=0.06)  # from 4:1 to within the noise
    assert np.isclose(smooth(raw).sum(), raw.sum(), rtol=0.05)  # the taps move relevance, barely lose it


def test_grid_taps_keep_constant_and_smooth_maps():
    flat = np.full((7, 9), 2.5)
    np.testing.assert_allclose(smooth(flat), flat, rtol=1e-6)  # float32 maps
    np.testing.assert_allclose(smooth(flat, sigma=1.5), flat, rtol=1e-6)
    ramp = np.add.outer(np.arange(10.0), np.arange(12.0))
    np.testing.assert_allclose(smooth(ramp)[1:-1, 1:-1], ramp[1:-1, 1:-1], rtol=1e-6)  # linear: unchanged


@pytest.mark.parametrize(
    ("photo", "policy", "expected"),
    [((48, 32), "squash", (48, 32)), ((32, 80), "squash", (32, 80)), ((48, 32), "crop", (32, 32))],
)
def test_heatmap_has_the_photos_proportions(photo, policy, expected):
    """squash: the shorter side keeps the map's size, the longer stretches back; crop: the square."""
    assert aspect_size((32, 32), photo, policy) == expected
    rgb = np.zeros((photo[1], photo[0], 3), np.uint8)
    shown = pictures(np.random.default_rng(0).random((3, 32, 32)), rgb, False, policy, 0.6)
    assert shown.heatmap.size == expected
    assert shown.overlay.size == photo


def _sparse_map(seed: int = 0, fraction: float = 0.05) -> np.ndarray:
    """A top-k-like map: a few percent of pixels relevant, in a blob, the rest zero."""
    rng = np.random.default_rng(seed)
    heat = np.zeros((64, 64))
    rows, cols = np.indices(heat.shape)
    blob = (rows - 20) ** 2 + (cols - 40) ** 2 < 14**2
    keep = blob & (rng.random(heat.shape) < fraction * 64 * 64 / blob.sum())
    heat[keep] = rng.random(keep.sum())
    return heat


def test_blend_weight_is_alpha_times_the_square_root():
    photo = np.full((64, 64, 3), 100, np.uint8)
    values = np.linspace(0.0, 1.0, 64)[None, :].repeat(64, axis=0)
    overlay = np.asarray(overlay_image(photo, values, False, "squash", 0.8), dtype=np.float64)
    colours = matplotlib.colormaps["afmhot"](values)[..., :3] * 255.0
    weight = np.floor(np.sqrt(values) * 0.8 * 255 + 0.5)[..., None] / 255
    np.testing.assert_allclose(overlay, 100 * (1 - weight) + colours * weight, atol=3)


def test_sparse_unsigned_overlay_reads_at_a_glance():
    """The seed's top-k 0.05 case: the blurred, square-root-weighted overlay visibly changes the blob's
    region (the issue's "almost invisible, pale mesh" was a tenth of it), and nothing outside."""
    heat = _sparse_map()
    photo = np.full((128, 128, 3), 128, np.uint8)
    shown = pictures(heat[None], photo, False, "squash", 0.6)
    changed = np.abs(np.asarray(shown.overlay, dtype=np.int16) - photo).max(axis=2) > 25
    rows, cols = np.indices((128, 128))
    blob = (rows - 40) ** 2 + (cols - 80) ** 2 < 24**2  # the map's blob, at twice the size
    assert changed[blob].mean() > 0.6
    near = (rows - 40) ** 2 + (cols - 80) ** 2 < 34**2  # the blob and the blur's reach (3 map pixels)
    assert not changed[~near].any()
    # before: the map unblurred, weight alpha * |R| (linear), at the photo's size
    old = np.clip(heat / np.percentile(heat, 99.5), 0, 1).repeat(2, axis=0).repeat(2, axis=1)
    blend = 128 + 0.6 * old[..., None] * (matplotlib.colormaps["afmhot"](old)[..., :3] * 255 - 128)
    assert (np.abs(blend - 128).max(axis=2) > 25)[blob].mean() < 0.3 * changed[blob].mean()


def test_mask_and_contour_modes():
    photo = np.random.default_rng(1).integers(40, 216, (64, 64, 3), dtype=np.uint8)
    values = np.zeros((64, 64))
    values[16:48, 16:48] = 1.0
    mask = np.asarray(overlay_image(photo, values, False, "squash", 1.0, mode="mask"), dtype=np.float64)
    np.testing.assert_allclose(mask[24:40, 24:40], photo[24:40, 24:40], atol=1)  # relevant: unchanged
    np.testing.assert_allclose(mask[:8, :8], photo[:8, :8] * 0.2, atol=1.5)  # none: dimmed to 20%
    contour = np.asarray(overlay_image(photo, values, False, "squash", 1.0, mode="contour"))
    changed = (contour != photo).any(axis=2)
    assert changed[16:48, 16:48].any() and not changed[:12].any() and not changed[24:40, 24:40].any()
    line = colorize(np.array([0.5 + 0.5 * 0.75]), False)[0]  # the outermost line: the 75% level, drawn last
    assert (contour[changed] == line).all(axis=1).mean() > 0.9


def test_panel_layout_and_caption():
    photo = np.random.default_rng(2).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    shown = pictures(np.random.default_rng(3).normal(size=(3, 32, 32)), photo, True, "squash", 0.6)
    caption = Caption("tabby", 281, 0.8712, 281, 281, "tabby", "epsilon-plus-flat", 1.0, False)
    panel = panel_image(photo, shown, caption)
    tile = round(90 * TILE_HEIGHT / 60)
    assert panel.width >= 3 * tile and panel.height > TILE_HEIGHT + 60
    array = np.asarray(panel, dtype=np.float64)
    expected = np.asarray(Image.fromarray(photo).resize((tile, TILE_HEIGHT), Image.Resampling.BILINEAR))
    top = next(y for y in range(panel.height) if np.abs(array[y, 8 : 8 + tile] - expected[0]).mean() < 8)
    np.testing.assert_allclose(array[top : top + TILE_HEIGHT, 8 : 8 + tile], expected, atol=40)
    # the colour bar under the heatmap: blue at one end, red at the other
    blue, red = colorize(np.array([-1.0, 1.0]), True)
    below = array[top + TILE_HEIGHT + 20 :]
    assert (np.abs(below - blue).max(axis=2) < 10).any() and (np.abs(below - red).max(axis=2) < 10).any()
    assert caption_lines(caption) == (
        "tabby (class 281): p = 0.871",
        "explained: class 281  |  composite epsilon-plus-flat, top-k 1",
    )
    seed = Caption(None, 3, 0.5, "softmax", 3, None, "seed", 0.05, True)
    assert caption_lines(seed)[1] == (
        "explained: softmax over all classes (shown: the top class)  |  composite seed, top-k 0.05 (renormalised)"
    )
    other = Caption("cat", 1, 0.1, 1, 2, "dog", "seed", 1.0, False)
    assert "model's top class: dog (class 2)" in caption_lines(other)[1]
    assert Path(font(13).path).parent == Path(matplotlib.get_data_path(), "fonts", "ttf")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    (folder / "panel_nets.py").write_text(NETS)
    sys.path.insert(0, str(folder))
    photos = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, size in [("wide", (48, 32)), ("tall", (32, 40))]:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            photos / f"{name}.png"
        )

    def run(out: Path, *options: str, inputs: list[Path] | None = None) -> list[dict]:
        args = ["run", *map(str, inputs or [photos]), "-o", str(out), "--model", "panel_nets:build"]
        result = CliRunner().invoke(app, [*args, "--resolution", "32", "--workers", "0", *options])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]

    yield run, photos
    sys.path.remove(str(folder))
    sys.modules.pop("panel_nets", None)


def test_run_writes_panels_and_a_report_by_default(cli_run, tmp_path):
    run, _ = cli_run
    records = run(tmp_path / "out")
    for record in records:
        panel = Image.open(record["outputs"]["panel"])
        assert (
            panel.format == "JPEG" and Path(record["outputs"]["panel"]).name == f"{record['name']}.panel.jpg"
        )
        assert panel.height > TILE_HEIGHT
        heatmap = Image.open(record["outputs"]["heatmap"]).size
        assert heatmap == {"wide": (48, 32), "tall": (32, 40)}[record["name"]]
    assert (tmp_path / "out" / "report.html").is_file()
    records = run(tmp_path / "off", "--no-panel", "--no-report")
    assert all("panel" not in r["outputs"] for r in records)
    assert (
        not list((tmp_path / "off").glob("*.panel.jpg")) and not (tmp_path / "off" / "report.html").exists()
    )


def test_report_default_is_for_more_than_one_image_and_keys_switch(cli_run, tmp_path):
    run, photos = cli_run
    run(tmp_path / "one", inputs=[photos / "wide.png"])
    assert not (tmp_path / "one" / "report.html").exists()
    run(tmp_path / "forced", "--report", inputs=[photos / "wide.png"])
    assert (tmp_path / "forced" / "report.html").is_file()
    config = tmp_path / "c.yaml"
    config.write_text("panel: false\nreport: false\noverlay_mode: contour\n")
    records = run(tmp_path / "keys", "-c", str(config))
    assert all(set(r["outputs"]) == {"heatmap", "overlay"} for r in records)
    assert not (tmp_path / "keys" / "report.html").exists()


def test_bad_overlay_mode_is_a_usage_error(cli_run, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("overlay_mode: glow\n")
    result = CliRunner().invoke(app, ["run", str(tmp_path), "-c", str(config), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "'overlay_mode' = 'glow' is invalid; expected one of blend, mask, contour" in result.output
