"""Winograd F(4x4, 3x3) convolutions: exact in float64, within float32 rounding, used where they pay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrp_cli.lrp import Explainer, winograd
from lrp_cli.lrp.layers import WeightedLayer


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (2, 5, 7, 9), (3, 6, 13, 8), (1, 4, 1, 6)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv3x3_equals_direct_convolution(shape, with_bias):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    weight = torch.randn(7, shape[1], 3, 3, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64) if with_bias else None
    result = winograd.conv3x3(x, winograd.transform_filters(weight), bias)
    torch.testing.assert_close(result, F.conv2d(x, weight, bias, padding=1), rtol=0, atol=1e-10)


def test_conv3x3_splits_share_one_input_transform():
    """Two filter sets side by side give both convolutions as separate channels-last tensors, each
    with its own bias, on a map that is not a whole number of tiles."""
    torch.manual_seed(1)
    x = torch.randn(2, 8, 10, 7, dtype=torch.float64)
    first, second = torch.randn(5, 8, 3, 3, dtype=torch.float64), torch.randn(5, 8, 3, 3, dtype=torch.float64)
    bias = torch.randn(10, dtype=torch.float64)
    filters = torch.cat([winograd.transform_filters(first), winograd.transform_filters(second)], dim=2)
    a, b = winograd.conv3x3(x, filters, bias, splits=(5, 5))
    torch.testing.assert_close(a, F.conv2d(x, first, bias[:5], padding=1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b, F.conv2d(x, second, bias[5:], padding=1), rtol=1e-10, atol=1e-10)
    assert a.is_contiguous(memory_format=torch.channels_last) and b.is_contiguous(
        memory_format=torch.channels_last
    )


@pytest.mark.parametrize("size", [(5, 5), (12, 7)])
def test_transposed_filters_give_the_adjoint(size):
    torch.manual_seed(1)
    s = torch.randn(2, 6, *size, dtype=torch.float64)
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    result = winograd.conv3x3(s, winograd.transform_filters(weight, transposed=True))
    torch.testing.assert_close(result, F.conv_transpose2d(s, weight, padding=1), rtol=0, atol=1e-10)


def test_float32_error_stays_near_direct_rounding():
    torch.manual_seed(2)
    x = torch.randn(2, 256, 14, 14).relu().contiguous(memory_format=torch.channels_last)
    weight = torch.randn(256, 256, 3, 3) / 48
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    error = (winograd.conv3x3(x, winograd.transform_filters(weight)).double() - exact).abs().max()
    assert error / exact.abs().max() < 5e-5


def _conv_layer(**overrides):
    settings = {"weight": torch.randn(256, 256, 3, 3), "bias": None, "padding": (1, 1)}
    settings.update(overrides)
    return WeightedLayer("conv", **settings)


@pytest.mark.parametrize(
    ("overrides", "eligible"),
    [
        ({}, True),
        ({"pad_mode": "same", "padding": (0, 0)}, True),
        ({"weight": torch.randn(256, 128, 3, 3)}, True),
        ({"weight": torch.randn(128, 128, 3, 3)}, False),  # too narrow to pay for the transforms
        ({"weight": torch.randn(256, 256, 5, 5), "padding": (2, 2)}, False),
        ({"stride": (2, 2)}, False),
        ({"dilation": (2, 2), "padding": (2, 2)}, False),
        ({"groups": 2, "weight": torch.randn(256, 128, 3, 3)}, False),
        ({"padding": (0, 0)}, False),
        ({"pad_mode": "reflect"}, False),
    ],
)
def test_eligibility(overrides, eligible):
    assert _conv_layer(**overrides).winograd_eligible((8, 9)) is eligible


def test_maps_smaller_than_two_tiles_stay_direct():
    layer = _conv_layer()
    assert not layer.winograd_eligible((7, 64)) and not layer.winograd_eligible((64, 4))
    assert layer.winograd_filters(lambda w: w, torch.float32, (7, 7)) is None
    assert layer.winograd_filters(lambda w: w, torch.float16, (32, 32)) is None  # float32/float64 only
    filters = layer.winograd_filters(lambda w: w, torch.float32, (32, 32))
    torch.testing.assert_close(filters, _transformed(layer.weight), rtol=1e-6, atol=1e-6)


# Lavin & Gray's filter transform G of F(4x4, 3x3), written out here: the engine's must equal G w G^T
LAVIN_GRAY_G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]


def _transformed(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) filters as the (36, in, out) stack of G w G^T, tile position first."""
    g = torch.tensor(LAVIN_GRAY_G, dtype=torch.float64)
    tiles = torch.einsum("pj,oijk,qk->pqio", g, weight.double(), g)
    return tiles.reshape(36, weight.shape[1], weight.shape[0]).to(weight.dtype)


@pytest.mark.parametrize("transposed", [False, True])
def test_filter_transform_is_g_w_g_transposed(transposed):
    torch.manual_seed(4)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    # the adjoint map's filters: in/out swapped and flipped in space
    source = weight.transpose(0, 1).flip(2, 3) if transposed else weight
    expected = _transformed(source)
    torch.testing.assert_close(
        winograd.transform_filters(weight, transposed=transposed), expected, rtol=0, atol=1e-14
    )
    layer = _conv_layer(weight=torch.randn(256, 256, 3, 3, dtype=torch.float64))
    positive = layer.winograd_filters(
        lambda w: w.clamp(min=0), torch.float64, (16, 16), transposed=transposed
    )
    source = layer.weight.clamp(min=0)
    expected = _transformed(source.transpose(0, 1).flip(2, 3) if transposed else source)
    torch.testing.assert_close(positive, expected, rtol=0, atol=1e-12)


class WideNet(nn.Module):
    """Wide 3x3 convolutions (Winograd territory) between a stem and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 256, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize(("composite", "terms"), [("seed", 1), ("epsilon-plus-flat", 1), ("alpha2-beta1", 2)])
def test_engine_with_winograd_matches_direct(composite, terms, monkeypatch):
    torch.manual_seed(3)
    model = WideNet().double().eval()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    fast = Explainer(model, composite, mean=[0.5] * 3, std=[0.5] * 3)
    direct = Explainer(model, composite, mean=[0.5] * 3, std=[0.5] * 3, winograd=False)
    calls = []
    conv3x3 = winograd.conv3x3
    monkeypatch.setattr(
        winograd, "conv3x3", lambda *args, **kwargs: calls.append(kwargs) or conv3x3(*args, **kwargs)
    )
    result = fast(x)
    # two wide layers. One z+ term on ReLU outputs: its modified forward runs with the layer's forward
    # (one call, two outputs), then its transpose; two terms: forward, each term's forward and transpose
    assert len(calls) == 2 * (2 if terms == 1 else 1 + 2 * terms)
    assert sum("splits" in kwargs for kwargs in calls) == (2 if terms == 1 else 0)
    reference = direct(x)
    torch.testing.assert_close(result.relevance, reference.relevance, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.logits, reference.logits, rtol=1e-10, atol=1e-12)
