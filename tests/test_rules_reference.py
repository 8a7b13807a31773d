"""Every rule and preset against an independent reference: closed-form answers worked out by hand, and
Zennit 0.5.1 wherever it has the rule or composite.

Differences from Zennit, each pinned by a hand-computed case below:
- alpha-beta: a neuron whose contributions all have one sign is explained by that side alone (so the
  rule conserves); Zennit scales it by alpha (positive side) or -beta (negative side).
- z^B: a layer bias stays in our denominator (unless ``zero_bias``); in Zennit it cancels out. The
  preset comparison therefore uses a bias-free first layer.
- Zennit's merged batch norm divides by sqrt(1 + eps) (a 5e-6 scale error), so comparisons use eps=0.
Everything else agrees to about 1e-11 in float64 (measured: at most 8e-12 per rule, 5e-12 per preset;
the epsilon rule's small denominators amplify rounding most); the tolerance is 1e-9.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import NarrowVGG16, random_batchnorm, random_biases
from torch import nn

from lrp_cli.lrp import (
    AlphaBeta,
    Composite,
    Epsilon,
    Flat,
    Gamma,
    Pass,
    WSquare,
    ZBox,
    ZPlus,
    explain,
    make_rule,
)

ZENNIT_TOLERANCE = 1e-9  # relative L2 error; measured <= 8e-12

# --- closed-form answers on one dense layer -------------------------------------------------------
#
# x = [2, 1, -1] and four neurons (weights | bias), chosen so every rule's answer is a short fraction:
#   y0: [ 3, -1, -2] | 1   contributions z = [6, -1, 2], y0 = 8  (mixed signs)
#   y1: [-1,  2,  1] | -1  z = [-2, 2, -1], y1 = -2             (negative output)
#   y2: [ 1,  2, -1] | 0   z = [2, 2, 1], y2 = 5                (positive contributions only)
#   y3: [-1, -1,  1] | 0   z = [-2, -1, -1], y3 = -4            (negative contributions only)
X = [[2.0, 1.0, -1.0]]
WEIGHT = [[3.0, -1.0, -2.0], [-1.0, 2.0, 1.0], [1.0, 2.0, -1.0], [-1.0, -1.0, 1.0]]
BIAS = [1.0, -1.0, 0.0, 0.0]
TINY = 1e-12  # a stabiliser that cannot move the answers at the asserted precision


def _dense() -> nn.Module:
    layer = nn.Linear(3, 4).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(WEIGHT))
        layer.bias.copy_(torch.tensor(BIAS))
    return layer


def _conv1x1() -> nn.Module:
    """The same neurons as a 1x1 convolution on a 3-channel 1x1 image (z^B needs image channels)."""
    conv = nn.Conv2d(3, 4, 1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(WEIGHT)[:, :, None, None])
        conv.bias.copy_(torch.tensor(BIAS))
    return nn.Sequential(conv, nn.Flatten())


HAND_CASES = {
    # epsilon: z_i / (y + eps * sign(y)); the bias keeps its share
    "epsilon, eps=1": (Epsilon(epsilon=1.0), 0, [6 / 9, -1 / 9, 2 / 9]),
    "epsilon, eps=1, zero bias": (Epsilon(epsilon=1.0, zero_bias=True), 0, [6 / 8, -1 / 8, 2 / 8]),
    "epsilon, eps=1, negative output": (Epsilon(epsilon=1.0), 1, [-2 / -3, 2 / -3, -1 / -3]),
    # z+: x+ w+ and x- w- (6 and 2) plus b+ (1) share the relevance
    "zplus": (ZPlus(epsilon=TINY), 0, [6 / 9, 0.0, 2 / 9]),
    "zplus, zero bias": (ZPlus(epsilon=TINY, zero_bias=True), 0, [6 / 8, 0.0, 2 / 8]),
    # ones as input: w+ = [3, 0, 0] plus b+ = 1
    "zplus, ones input": (ZPlus(epsilon=TINY, ones_input=True), 0, [3 / 4, 0.0, 0.0]),
    "zplus, ones input, zero bias": (ZPlus(epsilon=TINY, ones_input=True, zero_bias=True), 0, [1.0, 0, 0]),
    "zplus, ones input, neuron 1": (ZPlus(epsilon=TINY, ones_input=True), 1, [0.0, 2 / 3, 1 / 3]),
    # alpha-beta: 2 * [6, 0, 2] / 9 - 1 * [0, -1, 0] / -1
    "alpha2-beta1": (AlphaBeta(2.0, 1.0, epsilon=TINY), 0, [4 / 3, -1.0, 4 / 9]),
    "alpha2-beta1, zero bias": (AlphaBeta(2.0, 1.0, epsilon=TINY, zero_bias=True), 0, [3 / 2, -1.0, 1 / 2]),
    "alpha1-beta0": (AlphaBeta(1.0, 0.0, epsilon=TINY), 0, [6 / 9, 0.0, 2 / 9]),
    # one-sided neurons: explained by that side alone (Zennit: alpha * [2, 2, 1] / 5)
    "alpha2-beta1, positive side only": (AlphaBeta(2.0, 1.0, epsilon=TINY), 2, [2 / 5, 2 / 5, 1 / 5]),
    "alpha2-beta1, negative side only": (AlphaBeta(2.0, 1.0, epsilon=TINY), 3, [1 / 2, 1 / 4, 1 / 4]),
    # gamma 0.5, y0 > 0: x+ (w + .5 w+) = [9, -1, 0], x- (w + .5 w-) = [0, 0, 3], b + .5 b+ = 1.5
    "gamma": (Gamma(gamma=0.5, epsilon=TINY), 0, [9 / 12.5, -1 / 12.5, 3 / 12.5]),
    "gamma, zero bias": (Gamma(gamma=0.5, epsilon=TINY, zero_bias=True), 0, [9 / 11, -1 / 11, 3 / 11]),
    # y1 < 0: x+ (w + .5 w-) = [-3, 2, 0], x- (w + .5 w+) = [0, 0, -1.5], b + .5 b- = -1.5; sum -4
    "gamma, negative output": (Gamma(gamma=0.5, epsilon=TINY), 1, [-3 / -4, 2 / -4, -1.5 / -4]),
    # flat: every input of the receptive field gets the same share
    "flat": (Flat(epsilon=TINY), 0, [1 / 3, 1 / 3, 1 / 3]),
    # w^2: [9, 1, 4] / 14, the bias squared joins the denominator only when asked
    "wsquare": (WSquare(epsilon=TINY), 0, [9 / 14, 1 / 14, 4 / 14]),
    "wsquare with bias": (WSquare(epsilon=TINY, zero_bias=False), 0, [9 / 15, 1 / 15, 4 / 15]),
}


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_rule_matches_closed_form(case):
    rule, target, expected = HAND_CASES[case]
    composite = Composite(layer_map={"linear": rule, "conv": rule})
    x = torch.tensor(X, dtype=torch.float64)
    relevance = explain(_dense(), x, composite=composite, target=target)
    torch.testing.assert_close(
        relevance, torch.tensor([expected], dtype=torch.float64), rtol=1e-10, atol=1e-10
    )
    # the convolution code path gives the same answer
    image = x[:, :, None, None]
    relevance = explain(_conv1x1(), image, composite=composite, target=target)
    torch.testing.assert_close(
        relevance.flatten(1), torch.tensor([expected], dtype=torch.float64), rtol=1e-10, atol=1e-10
    )


def test_alpha1_beta0_conserves_on_a_negative_only_neuron():
    composite = Composite(layer_map={"linear": AlphaBeta(1.0, 0.0, epsilon=TINY)})
    relevance = explain(_dense(), torch.tensor(X, dtype=torch.float64), composite=composite, target=3)
    torch.testing.assert_close(relevance, torch.tensor([[1 / 2, 1 / 4, 1 / 4]], dtype=torch.float64))


def test_flat_shares_by_receptive_field_at_the_border():
    """A 1x3 kernel over four pixels with zero padding: border outputs see two pixels, inner ones three.
    Relevance 1 on every output gives [1/2 + 1/3, 1/2 + 2/3, 2/3 + 1/2, 1/3 + 1/2]."""
    conv = nn.Conv2d(1, 1, (1, 3), padding=(0, 1), bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[-5.0, 0.5, 7.0]]]]))  # the weights must not matter
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.tensor([[[[3.0, -1.0, 4.0, 1.0]]]], dtype=torch.float64)
    relevance = explain(
        model,
        x,
        composite=Composite(layer_map={"conv": Flat(epsilon=TINY)}),
        target=torch.ones(1, 4).double(),
    )
    expected = torch.tensor([[[[5 / 6, 7 / 6, 7 / 6, 5 / 6]]]], dtype=torch.float64)
    torch.testing.assert_close(relevance, expected, rtol=1e-10, atol=1e-10)


def test_zbox_matches_closed_form():
    """z^B with box [l, h]: R_i = (x_i w_i - l_i w+_i - h_i w-_i) / (sum of those + b).

    Box l = [-2, -1, -1], h = [3, 2, 1] on neuron 0: [6 + 6, -1 + 2, 2 + 2] = [12, 1, 4], sum 17, b = 1.
    From mean 0.5, std 0.25 the box is [-2, 2] per channel: [12, 1, 6], sum 19, b = 1.
    """
    x = torch.tensor(X, dtype=torch.float64)[:, :, None, None]
    box = {"low": (-2.0, -1.0, -1.0), "high": (3.0, 2.0, 1.0), "epsilon": TINY}
    for zero_bias, expected in [(False, [12 / 18, 1 / 18, 4 / 18]), (True, [12 / 17, 1 / 17, 4 / 17])]:
        composite = Composite(layer_map={"conv": make_rule("zbox", zero_bias=zero_bias, **box)})
        relevance = explain(_conv1x1(), x, composite=composite, target=0).flatten(1)
        torch.testing.assert_close(
            relevance, torch.tensor([expected], dtype=torch.float64), rtol=1e-10, atol=0
        )
    derived = Composite(layer_map={"conv": ZBox(epsilon=TINY)})
    relevance = explain(_conv1x1(), x, composite=derived, target=0, mean=[0.5] * 3, std=[0.25] * 3)
    torch.testing.assert_close(
        relevance.flatten(1),
        torch.tensor([[12 / 20, 1 / 20, 6 / 20]], dtype=torch.float64),
        rtol=1e-10,
        atol=0,
    )


def test_pass_hands_batchnorm_relevance_through_unchanged():
    """BN (scale 2, shift 1) then a sum: y = 2x + 1 = [5, 3, -1], out = 7, R_y = y / 7.
    pass: R_x = R_y; epsilon at the batch norm instead: 2x / (2x + 1) * R_y = [4/7, 2/7, -2/7]."""
    bn = nn.BatchNorm2d(3, eps=0.0).double().eval()
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(1.0)
    head = nn.Linear(3, 1, bias=False).double()
    head.weight.data.fill_(1.0)
    model = nn.Sequential(bn, nn.Flatten(), head)
    x = torch.tensor(X, dtype=torch.float64)[:, :, None, None]
    expectations = {Pass(): [5 / 7, 3 / 7, -1 / 7], Epsilon(epsilon=TINY): [4 / 7, 2 / 7, -2 / 7]}
    for rule, expected in expectations.items():
        composite = Composite(layer_map={"linear": Epsilon(epsilon=TINY), "batchnorm": rule})
        relevance = explain(model, x, composite=composite, target=0).flatten(1)
        torch.testing.assert_close(
            relevance, torch.tensor([expected], dtype=torch.float64), rtol=1e-10, atol=0
        )


# --- every rule against Zennit on a small random network ------------------------------------------


def _small_net() -> nn.Module:
    """Conv + folded BN, a stand-alone BN after a ReLU (relevance passes it), max and adaptive pools,
    dense layers; every bias non-zero."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(12),
        nn.MaxPool2d(2),
        nn.Conv2d(12, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    return random_biases(random_batchnorm(model.double().eval()))


@pytest.fixture(scope="module")
def small_net():
    return _small_net()


def _zennit_relevance(model, x, composite, targets, classes=10):
    from zennit.attribution import Gradient

    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, torch.eye(classes, dtype=x.dtype)[targets])
    return relevance


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


BOX = (-2.0, 2.0)  # the first-layer box for z^B comparisons


def _rule_pairs():
    """(ours, Zennit's) for each rule; where Zennit names parameters differently, the same values."""
    from zennit import rules as z

    low = torch.full((1, 3, 1, 1), BOX[0], dtype=torch.float64)
    high = torch.full((1, 3, 1, 1), BOX[1], dtype=torch.float64)
    return {
        "epsilon": (Epsilon(), z.Epsilon(), False),
        "epsilon 0.25": (Epsilon(epsilon=0.25), z.Epsilon(epsilon=0.25), False),
        "zplus": (ZPlus(), z.ZPlus(), False),
        "zplus, zero bias": (ZPlus(zero_bias=True), z.ZPlus(zero_params=["bias"]), False),
        "alpha2-beta1": (AlphaBeta(2.0, 1.0), z.AlphaBeta(2.0, 1.0), False),
        "alpha1-beta0": (AlphaBeta(1.0, 0.0), z.AlphaBeta(1.0, 0.0), False),
        "gamma 0.25": (Gamma(0.25), z.Gamma(0.25), False),
        "gamma 1": (Gamma(1.0), z.Gamma(1.0), False),
        # input-layer rules: first layer only, epsilon elsewhere
        "flat": (Flat(), z.Flat(), True),
        "wsquare": (WSquare(), z.WSquare(zero_params=["bias"]), True),
        "zbox": (ZBox(low=(BOX[0],) * 3, high=(BOX[1],) * 3, zero_bias=True), z.ZBox(low, high), True),
    }


@pytest.mark.parametrize("rule", list(_rule_pairs()))
def test_rule_agrees_with_zennit(small_net, rule):
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite, layer_map_base
    from zennit.rules import Epsilon as ZEpsilon
    from zennit.types import Convolution
    from zennit.types import Linear as AnyLinear

    ours, theirs, first_only = _rule_pairs()[rule]
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = [3, 7]
    canonizers = [SequentialMergeBatchNorm()]
    if first_only:  # Zennit's base map passes relevance through stand-alone batch norms, as ours does
        composite = Composite(layer_map={"conv": Epsilon(), "linear": Epsilon()}, first=ours)
        reference = SpecialFirstLayerMapComposite(
            [*layer_map_base(), (Convolution, ZEpsilon()), (nn.Linear, ZEpsilon())],
            [(AnyLinear, theirs)],
            canonizers=canonizers,
        )
    else:
        composite = Composite(layer_map={"conv": ours, "linear": ours})
        reference = LayerMapComposite(
            [*layer_map_base(), (Convolution, theirs), (nn.Linear, theirs)], canonizers=canonizers
        )
    result = explain(small_net, x, composite=composite, target=targets)
    expected = _zennit_relevance(small_net, x, reference, targets)
    assert _relative_error(result, expected) <= ZENNIT_TOLERANCE


# --- every preset except seed against Zennit's composites (seed: tests/test_seed_reference.py) ------

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _zennit_preset(name: str, canonizer):
    from zennit import composites as zc
    from zennit import rules as z
    from zennit.types import Convolution

    low = ((0.0 - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(STD, dtype=torch.float64)).reshape(
        1, 3, 1, 1
    )
    high = ((1.0 - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(STD, dtype=torch.float64)).reshape(
        1, 3, 1, 1
    )
    uniform = {"epsilon": z.Epsilon, "zplus": z.ZPlus}
    if name in uniform or name.startswith("alpha"):
        rule = (
            uniform[name]()
            if name in uniform
            else z.AlphaBeta(*(2.0, 1.0) if name == "alpha2-beta1" else (1.0, 0.0))
        )
        return zc.LayerMapComposite(
            [*zc.layer_map_base(), (Convolution, rule), (nn.Linear, rule)], canonizers=[canonizer]
        )
    if name == "epsilon-gamma-box":
        return zc.EpsilonGammaBox(low=low, high=high, canonizers=[canonizer])
    factory = {
        "epsilon-plus-flat": zc.EpsilonPlusFlat,
        "epsilon-alpha2-beta1-flat": zc.EpsilonAlpha2Beta1Flat,
    }[name]
    return factory(canonizers=[canonizer])


PRESETS = [
    "epsilon",
    "zplus",
    "alpha1-beta0",
    "alpha2-beta1",
    "epsilon-plus-flat",
    "epsilon-gamma-box",
    "epsilon-alpha2-beta1-flat",
]


@pytest.fixture(scope="module", params=["vgg16", "resnet18"])
def preset_model(request):
    """VGG16's convolutions (narrow classifier) at 32x32 and ResNet18 at 64x64, float64, random batch
    norms and biases; the first layer bias-free so z^B means the same in both libraries."""
    torch.manual_seed(0)
    if request.param == "vgg16":
        model, size = NarrowVGG16(), 32
    else:
        model, size = torchvision.models.resnet18(num_classes=10), 64
    model = random_biases(random_batchnorm(model.double().eval()))
    with torch.no_grad():
        if request.param == "vgg16":
            model.features[0].bias.zero_()
        else:  # the first conv's folded bias is bn1's shift minus its scaled mean
            model.bn1.bias.zero_()
            model.bn1.running_mean.zero_()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    return request.param, model, x


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_agrees_with_zennit(preset_model, preset):
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    arch, model, x = preset_model
    canonizer = VGGCanonizer() if arch == "vgg16" else ResNetCanonizer()
    ours = explain(model, x, composite=preset, target=[3, 7], mean=MEAN, std=STD)
    theirs = _zennit_relevance(model, x, _zennit_preset(preset, canonizer), [3, 7])
    error = _relative_error(ours, theirs)
    assert error <= ZENNIT_TOLERANCE, error
