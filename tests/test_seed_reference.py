"""The ``seed`` preset against the seed method written out the way its author describes it.

Layer by layer over VGG16's layers: a z+ layer is a copy of the layer with its weights clamped at zero
and no bias; its relevance is found with autograd as ``a * grad((layer+(a) + eps) * s)`` for
``s = R / (layer+(a) + eps)``; the first layer sees ones instead of the image; max pools are explained
as average pools of the same window; the start is the softmax of the logits; the stabiliser is 1e-5
everywhere. With ``topk`` the relevance entering every conv, dense and pooling layer first keeps only its
largest fraction per sample (a sort, ties kept). Nothing of the engine is used.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import NarrowVGG16, random_biases
from torch import nn

from lrp_cli.lrp import Explainer

EPSILON = 1e-5
TOLERANCE = 1e-9  # relative L2 error in float64; measured 1.7e-11 (topk 1), 6.7e-12 (topk 0.05)


def _keep_largest(relevance: torch.Tensor, fraction: float) -> torch.Tensor:
    flat = relevance.reshape(relevance.shape[0], -1)
    k = max(1, int(fraction * flat.shape[1]))
    kth = flat.sort(dim=1, descending=True).values[:, k - 1 : k]
    return torch.where(flat >= kth, flat, torch.zeros_like(flat)).reshape(relevance.shape)


def _plus(layer: nn.Module) -> nn.Module:
    """The z+ copy: weights clamped at zero, bias dropped."""
    plus = copy.deepcopy(layer)
    with torch.no_grad():
        plus.weight.clamp_(min=0)
        plus.bias.zero_()
    return plus


def seed_lrp(model: NarrowVGG16, x: torch.Tensor, topk: float = 1.0) -> torch.Tensor:
    """Input relevance by the seed method."""
    layers = [*model.features, model.avgpool, nn.Flatten(), *model.classifier]
    activations = [x]
    with torch.no_grad():
        for layer in layers:
            activations.append(layer(activations[-1]))
    relevance = activations[-1].softmax(dim=1)
    first = next(i for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d))
    for index in reversed(range(len(layers))):
        layer, a = layers[index], activations[index]
        if isinstance(layer, nn.MaxPool2d):
            layer = nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding)
        if isinstance(layer, nn.Conv2d | nn.Linear):
            layer = _plus(layer)
            if index == first:
                a = torch.ones_like(a)
        if isinstance(layer, nn.Conv2d | nn.Linear | nn.AvgPool2d | nn.AdaptiveAvgPool2d):
            if topk < 1.0:
                relevance = _keep_largest(relevance, topk)
            a = a.detach().requires_grad_(True)
            z = layer(a) + EPSILON
            s = (relevance / z).detach()
            (gradient,) = torch.autograd.grad((z * s).sum(), a)
            relevance = (a * gradient).detach()
        elif isinstance(layer, nn.Flatten):
            relevance = relevance.reshape(a.shape)
        # ReLU and dropout (eval): relevance passes unchanged
    return relevance


@pytest.fixture(scope="module")
def vgg():
    """VGG16's convolution stack with random non-zero biases (the seed must drop them), float64."""
    torch.manual_seed(0)
    model = random_biases(NarrowVGG16().double().eval())
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.mark.parametrize("topk", [1.0, 0.05])
def test_seed_preset_matches_the_seed_method(vgg, topk):
    model, x = vgg
    expected = seed_lrp(model, x, topk)
    result = Explainer(model, "seed", topk)(x)
    assert result.targets.tolist() == [-1, -1]
    error = ((result.relevance - expected).norm() / expected.norm()).item()
    assert error <= TOLERANCE, error
    if topk < 1.0:  # the filter really acted: the full-relevance map is far from it
        full = seed_lrp(model, x)
        assert ((full - expected).norm() / expected.norm()).item() > 0.1


def test_seed_reference_is_sensitive_to_each_ingredient(vgg):
    """The comparison above could not pass by accident: dropping any ingredient of the seed method
    moves the answer far beyond the tolerance."""
    model, x = vgg
    result = Explainer(model, "seed")(x).relevance
    variants = {
        "bias kept": ("seed", {"rules": {"conv": {"rule": "zplus", "epsilon": EPSILON}}}),
        "image as first input": (
            "seed",
            {"rules": {"first": {"rule": "zplus", "epsilon": EPSILON, "zero_bias": True}}},
        ),
        "max pools by winner": ("seed", {"rules": {"maxpool": "winner"}}),
    }
    from lrp_cli.lrp import get_composite

    for name, (preset, change) in variants.items():
        composite = get_composite(preset).with_overrides(change["rules"])
        other = Explainer(model, composite)(x).relevance
        assert ((other - result).norm() / result.norm()).item() > 1e-3, name


@pytest.mark.parametrize(
    "topk",
    [
        1.0,
        0.05,
    ],
)
def test_seed_starts_from_the_models_softmax(vgg, topk):
    """The start is the softmax of ``model(x)`` itself, and stays what it was when the filter runs."""
    model, x = vgg
    with torch.no_grad():
        expected = model(x).softmax(dim=1)
    result = Explainer(model, "seed", topk)(x)
    torch.testing.assert_close(result.start, expected, rtol=1e-12, atol=0)
