"""The engine's shortcuts give what the plain computation gives: fused ReLUs, window-average shares,
one-sample constant terms and the dense layers' transposed product.

Winograd's joint forward (a layer's output and its z+ denominator from one input transform) is tested
in tests/test_winograd.py; agreement with Zennit and the seed method in tests/test_rules_reference.py
and tests/test_seed_reference.py, which run through every shortcut here as well.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrp_cli.lrp import Explainer
from lrp_cli.lrp.layers import WeightedLayer
from lrp_cli.lrp.ops.base import share_by_contribution
from lrp_cli.lrp.ops.pooling import pool_average_of


class Branches(nn.Module):
    """Three conv/ReLU pairs: fusable (module ReLU, in place), fusable (functional) and not fusable
    (the conv's output is also added to the ReLU's), then a dense ReLU and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.relu1(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        y = self.conv3(x)
        x = F.max_pool2d(torch.relu(y) + y, 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def branches() -> nn.Module:
    torch.manual_seed(0)
    return Branches().double().eval()


@pytest.mark.parametrize(
    ("composite", "expected"),
    [
        ("seed", {"relu1", "relu", "relu_2"}),  # conv1's, conv2's and fc1's: conv3's output is used twice
        ("epsilon-plus-flat", {"relu1", "relu"}),  # fc1's epsilon rule keeps its output as z: not fc1's
    ],
)
def test_relu_is_fused_only_where_the_layer_output_has_no_other_use(branches, composite, expected):
    explainer = Explainer(branches, composite)
    assert {node.name for node in explainer._fused_relus} == expected
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = branches(x)
    torch.testing.assert_close(explainer(x).logits, expected, rtol=1e-12, atol=1e-12)


def test_fused_relu_keeps_the_relevance_of_the_unfused_program(branches, monkeypatch):
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    fused = Explainer(branches, "seed")(x)
    monkeypatch.setattr(Explainer, "_fuse_relus", lambda self: set())
    plain = Explainer(branches, "seed")(x)
    torch.testing.assert_close(fused.relevance, plain.relevance, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fused.logits, plain.logits, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("window", [2, 3])
@pytest.mark.parametrize("signed", [False, True])
def test_window_average_share_equals_the_gradient_route(channels_last, window, signed):
    """The one-pass share through windows that tile the map, against the epsilon rule by autograd."""
    torch.manual_seed(window)
    average = pool_average_of({"kernel_size": window, "stride": window})
    a = torch.rand(2, 5, 4 * window, 3 * window, dtype=torch.float64) - (0.5 if signed else 0.0)
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
    relevance = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    assert average.tiles(a)
    fast = average.share(a, relevance, 1e-5)
    (reference,) = share_by_contribution(average, [a], average(a), relevance, 1e-5)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)
    assert fast.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_window_average_does_not_claim_maps_it_does_not_tile():
    assert not pool_average_of({"kernel_size": 2, "stride": 2}).tiles(torch.zeros(1, 1, 5, 4))
    assert not pool_average_of({"kernel_size": 3, "stride": 2}).tiles(torch.zeros(1, 1, 6, 6))
    assert not pool_average_of({"kernel_size": 2, "stride": 2, "padding": 1}).tiles(torch.zeros(1, 1, 6, 6))


@pytest.mark.parametrize("composite", ["seed", "epsilon-gamma-box", "epsilon-plus-flat"])
def test_one_sample_constant_terms_serve_every_batch_size(branches, composite):
    """Ones and box-bound terms are cached for one sample and broadcast: batches of other sizes, before
    and after, get what a fresh explainer gives them."""
    options = {"mean": [0.5] * 3, "std": [0.25] * 3}
    reused = Explainer(branches, composite, **options)
    for batch in (3, 1, 4):
        x = torch.rand(batch, 3, 16, 16, dtype=torch.float64)
        fresh = Explainer(branches, composite, **options)(x)
        torch.testing.assert_close(reused(x).relevance, fresh.relevance, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", [True, False])
def test_dense_forward_by_the_transposed_product(bias):
    torch.manual_seed(1)
    weight = torch.randn(7, 11, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64) if bias else None
    layer = WeightedLayer("linear", weight, b)
    x = torch.randn(4, 11, dtype=torch.float64)
    torch.testing.assert_close(layer.apply(x, weight, b), F.linear(x, weight, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        layer.apply(x, weight, b, relu=True), F.linear(x, weight, b).relu(), rtol=1e-12, atol=1e-12
    )
    tokens = torch.randn(2, 3, 11, dtype=torch.float64)  # more than one batch dimension: F.linear itself
    torch.testing.assert_close(layer.apply(tokens, weight, b), F.linear(tokens, weight, b))


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups"), [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 2, 2), (2, 0, 1, 4)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_conv_with_fused_relu_equals_conv_then_relu(stride, padding, dilation, groups, dtype):
    torch.manual_seed(2)
    weight, bias = torch.randn(8, 8 // groups, 3, 3, dtype=dtype), torch.randn(8, dtype=dtype)
    layer = WeightedLayer(
        "conv", weight, bias, (stride, stride), (padding, padding), (dilation, dilation), groups
    )
    x = torch.randn(2, 8, 22, 9, dtype=dtype)
    for image in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, ::2]):
        expected = F.conv2d(image, weight, bias, stride, padding, dilation, groups).relu()
        torch.testing.assert_close(layer.apply(image, weight, bias, relu=True), expected)
