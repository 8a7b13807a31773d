"""Occlusion sensitivity: the batched map against a direct computation written out here (one forward per
window, a pixel's value averaged over the windows that cover it), and ``lrp-heatmap occlude`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lrp_cli.cli import app
from lrp_cli.data import decode, prepare
from lrp_cli.models import load_model
from lrp_cli.occlude import occlusion_map, window_starts, windowed

CAT = Path(__file__).resolve().parent.parent / "input" / "cat.png"


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(72, 5),
    ).eval().double()  # fmt: skip


def direct_occlusion(
    model: nn.Module, image: torch.Tensor, target: int, patch: int, stride: int
) -> np.ndarray:
    """Every window occluded on its own; then, pixel by pixel, the mean drop of the windows covering it."""
    height, width = image.shape[1:]
    tops = list(range(0, height - patch + 1, stride))
    lefts = list(range(0, width - patch + 1, stride))
    tops += [height - patch] if tops[-1] != height - patch else []
    lefts += [width - patch] if lefts[-1] != width - patch else []
    with torch.no_grad():
        base = model(image[None])[0, target].item()
        drops = {}
        for top in tops:
            for left in lefts:
                occluded = image.clone()
                occluded[:, top : top + patch, left : left + patch] = 0
                drops[top, left] = base - model(occluded[None])[0, target].item()
    result = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            covering = [
                d for (top, left), d in drops.items() if top <= i < top + patch and left <= j < left + patch
            ]
            result[i, j] = sum(covering) / len(covering)
    return result


def test_windows_cover_the_border():
    assert window_starts(20, 6, 4) == [0, 4, 8, 12, 14]
    assert window_starts(32, 8, 8) == [0, 8, 16, 24]
    assert window_starts(10, 10, 3) == [0]


@pytest.mark.parametrize(("patch", "stride", "batch"), [(6, 4, 7), (5, 5, 64), (4, 3, 1)])
def test_occlusion_map_matches_the_direct_computation(patch, stride, batch):
    model = tiny_model()
    image = torch.randn(3, 20, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = direct_occlusion(model, image, 3, patch, stride)
    np.testing.assert_allclose(
        occlusion_map(model, image, 3, patch, stride, batch), expected, rtol=1e-10, atol=1e-12
    )


def test_windowed_relevance_is_the_window_sums_spread_per_pixel():
    relevance = np.random.default_rng(2).normal(size=(9, 11))
    result = windowed(relevance, 4, 3)
    tops, lefts = [0, 3, 5], [0, 3, 6, 7]
    for i, j in [(0, 0), (4, 4), (8, 10), (5, 7)]:
        sums = [
            relevance[top : top + 4, left : left + 4].sum()
            for top in tops
            for left in lefts
            if top <= i < top + 4 and left <= j < left + 4
        ]
        assert result[i, j] == pytest.approx(np.mean(sums), rel=1e-12)


def test_occlude_command_writes_both_maps_and_their_correlation(tmp_path):
    result = CliRunner().invoke(
        app,
        ["occlude", str(CAT), "--patch", "16", "--stride", "16", "--resolution", "32", "-o", str(tmp_path)],
    )
    assert result.exit_code == 0, result.stderr
    names = {
        "cat.heatmap.png",
        "cat.occlusion.png",
        "cat.relevance.npy",
        "cat.occlusion.npy",
        "occlusion.jsonl",
    }
    assert names <= {p.name for p in tmp_path.iterdir()}
    (record,) = [json.loads(line) for line in (tmp_path / "occlusion.jsonl").read_text().splitlines()]
    assert (record["patch"], record["stride"], record["windows"], record["error"]) == (16, 16, 4, None)
    occlusion = np.load(tmp_path / "cat.occlusion.npy").astype(np.float64)
    lrp = np.load(tmp_path / "cat.relevance.npy").sum(axis=0).astype(np.float64)
    blocks = lrp.reshape(2, 16, 2, 16).sum(axis=(1, 3))  # stride = patch: each pixel has one window
    smoothed = np.kron(blocks, np.ones((16, 16)))
    assert record["pearson"] == pytest.approx(
        np.corrcoef(occlusion.ravel(), smoothed.ravel())[0, 1], abs=1e-4
    )
    assert record["pearson_pixels"] == pytest.approx(
        np.corrcoef(occlusion.ravel(), lrp.ravel())[0, 1], abs=1e-4
    )
    loaded = load_model("efficientnet-lite0", None, None, None)
    photo = prepare(decode(CAT, 10**9), 32, "squash", loaded.interpolation or "bicubic")
    x = (torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    expected = direct_occlusion(loaded.module, x, record["class_index"], 16, 16)
    np.testing.assert_allclose(occlusion, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_a_patch_larger_than_the_input_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(
        app, ["occlude", str(CAT), "--patch", "64", "--resolution", "32", "-o", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "--patch 64: give a size from 1 to the model's input size 32" in result.stderr
