"""The LRP engine: conservation, agreement with Zennit, hand-computed cases, filter, errors, no mutation."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from conftest import bias_free
from torch import nn

from lrp_cli.lrp import (
    AlphaBeta,
    Composite,
    Epsilon,
    Explainer,
    UnsupportedOperationError,
    ZPlus,
    attribute,
    explain,
    relevance_filter,
)
from lrp_cli.lrp import filter as filter_module

tv = torchvision.models

BIAS_FREE = {
    "zplus": ZPlus(zero_bias=True),
    "epsilon": Epsilon(epsilon=1e-9, zero_bias=True),
    "alpha2-beta1": AlphaBeta(2.0, 1.0, epsilon=1e-9, zero_bias=True),
}

CONSERVATION_MODELS = {
    "vgg16": (tv.vgg16, 32),
    "resnet18": (tv.resnet18, 64),
    "mobilenet_v2": (tv.mobilenet_v2, 64),
    "densenet121": (tv.densenet121, 64),
    "tf_efficientnet_lite0": (lambda: timm.create_model("tf_efficientnet_lite0"), 64),
}


@pytest.fixture(scope="module", params=list(CONSERVATION_MODELS))
def bias_free_model(request):
    factory, size = CONSERVATION_MODELS[request.param]
    torch.manual_seed(0)
    return request.param, bias_free(factory().double(), size), size


@pytest.mark.parametrize("rule", list(BIAS_FREE))
def test_conservation_on_bias_free_models(bias_free_model, rule):
    _, model, size = bias_free_model
    composite = Composite(layer_map={"conv": BIAS_FREE[rule], "linear": BIAS_FREE[rule]}, stabilizer=1e-9)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = attribute(model, x, composite=composite, target=[1, 2])
    totals = result.relevance.sum(dim=(1, 2, 3))
    torch.testing.assert_close(totals, result.start.sum(dim=1), rtol=1e-4, atol=0)


def test_conservation_layer_by_layer_vgg16():
    model = bias_free(tv.vgg16().double(), 32)
    composite = Composite(layer_map={"conv": BIAS_FREE["zplus"], "linear": BIAS_FREE["zplus"]})
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    result = attribute(model, x, composite=composite, target=5, trace=True)
    weighted = [k for k in result.trace if k.startswith(("features.", "classifier."))]
    assert len(weighted) == 31 + 7  # every module in features/classifier records its input relevance
    for key in weighted:
        torch.testing.assert_close(
            result.trace[key].sum(dim=tuple(range(1, result.trace[key].dim()))),
            torch.ones(2, dtype=torch.float64),
            rtol=1e-4,
            atol=0,
            msg=key,
        )


def test_conservation_across_residual_cut_resnet18():
    """The relevance entering a residual stage splits between its main and shortcut branch, summing to 1."""
    model = bias_free(tv.resnet18().double(), 64)
    composite = Composite(layer_map={"conv": BIAS_FREE["zplus"], "linear": BIAS_FREE["zplus"]})
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    trace = attribute(model, x, composite=composite, target=0, trace=True).trace
    for stage in ("layer2", "layer3", "layer4"):
        total = trace[f"{stage}.0.conv1"].sum() + trace[f"{stage}.0.downsample.0"].sum()
        assert abs(total.item() - 1.0) < 1e-4, stage
        assert 0 < trace[f"{stage}.0.conv1"].sum() < 1


# --- agreement with Zennit ------------------------------------------------------------------------


def _zennit_relevance(model, x, composite, targets):
    from zennit.attribution import Gradient

    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, torch.eye(1000, dtype=x.dtype)[targets])
    return relevance


def _zennit_composite(name, canonizer):
    from zennit.composites import EpsilonPlusFlat, LayerMapComposite, layer_map_base
    from zennit.rules import AlphaBeta as ZAlphaBeta
    from zennit.rules import Epsilon as ZEpsilon
    from zennit.rules import ZPlus as ZZPlus
    from zennit.types import Convolution

    if name == "epsilon-plus-flat":
        return EpsilonPlusFlat(canonizers=[canonizer])
    rule = {"epsilon": ZEpsilon, "zplus": ZZPlus, "alpha2-beta1": ZAlphaBeta}[name]
    return LayerMapComposite(
        layer_map=[*layer_map_base(), (Convolution, rule()), (nn.Linear, rule())], canonizers=[canonizer]
    )


def _random_batchnorm(model):
    """Non-trivial batch-norm statistics so folding matters. eps=0 because Zennit 0.5's merged batch
    norm keeps dividing by sqrt(1 + eps), a 5e-6 scale error of its own."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g, dtype=m.running_mean.dtype) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g, dtype=m.running_var.dtype) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g, dtype=m.weight.dtype) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g, dtype=m.bias.dtype) * 0.1)
            m.eps = 0.0
    return model


@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
@pytest.mark.parametrize("composite", ["epsilon", "zplus", "alpha2-beta1", "epsilon-plus-flat"])
def test_agrees_with_zennit(arch, composite):
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    torch.manual_seed(0)
    model = _random_batchnorm(getattr(tv, arch)().double().eval())
    canonizer = VGGCanonizer() if arch == "vgg16" else ResNetCanonizer()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ours = explain(model, x, composite=composite, target=[3, 7])
    theirs = _zennit_relevance(model, x, _zennit_composite(composite, canonizer), [3, 7])
    error = ((ours - theirs).norm() / theirs.norm()).item()
    assert error <= 1e-4, error


# --- hand-computed cases --------------------------------------------------------------------------


def _linear(weight):
    layer = nn.Linear(len(weight[0]), len(weight), bias=False)
    layer.weight.data = torch.tensor(weight, dtype=torch.float64)
    return layer


def test_two_layer_mlp_by_hand():
    # h = relu(W1 x) = [3, 2], y = h1 + h2 = 5; LRP-0 then gives R_h = [3/5, 2/5]
    # R_x = 3/5 * [1/3, 2/3] + 2/5 * [3/2, -1/2] = [4/5, 1/5]; z+ drops the -1 contribution of x2 to h2
    model = nn.Sequential(_linear([[1.0, 2.0], [3.0, -1.0]]), nn.ReLU(), _linear([[1.0, 1.0]])).double()
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    eps = Composite(layer_map={"linear": Epsilon(epsilon=1e-12)})
    plus = Composite(layer_map={"linear": ZPlus(epsilon=1e-12)})
    torch.testing.assert_close(
        explain(model, x, composite=eps, target=0), torch.tensor([[0.8, 0.2]]).double()
    )
    torch.testing.assert_close(
        explain(model, x, composite=plus, target=0), torch.tensor([[0.6, 0.4]]).double()
    )


def test_strided_grouped_conv_by_hand():
    conv = nn.Conv2d(2, 2, kernel_size=2, stride=2, groups=2, bias=False)
    conv.weight.data = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[1.0, 0.0], [0.0, 2.0]]]])
    model = nn.Sequential(conv, nn.Flatten(), _linear([[1.0] * 4]).float())
    x = torch.stack([torch.arange(1.0, 9.0).reshape(2, 4), torch.ones(2, 4)])[None]
    # output = 14 + 22 + 3 + 3 = 42; with LRP-0 every input gets x_i * w_i / 42
    expected = torch.stack(
        [torch.arange(1.0, 9.0).reshape(2, 4), torch.tensor([[1, 0, 1, 0], [0, 2, 0, 2.0]])]
    )
    composite = Composite(layer_map={"conv": Epsilon(epsilon=1e-12), "linear": Epsilon(epsilon=1e-12)})
    torch.testing.assert_close(explain(model, x, composite=composite, target=0), expected[None] / 42)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = _linear([[2.0, 0.0], [0.0, 1.0]])

    def forward(self, x):
        return self.branch(x) + x


def test_addition_splits_by_contribution_by_hand():
    # y1 = 2 x1 + x1: the branch explains 2/3 of y1's relevance, the shortcut 1/3
    model = _Residual().double()
    x = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    result = attribute(
        model,
        x,
        composite=Composite(layer_map={"linear": Epsilon(epsilon=1e-12)}, stabilizer=1e-12),
        target=0,
        trace=True,
    )
    torch.testing.assert_close(result.trace["add[0]"], torch.tensor([[2 / 3, 0.0]]).double())
    torch.testing.assert_close(result.trace["add[1]"], torch.tensor([[1 / 3, 0.0]]).double())
    torch.testing.assert_close(result.relevance, torch.tensor([[1.0, 0.0]]).double())


# --- relevance filter -----------------------------------------------------------------------------


def _sort_reference(r, fraction):
    flat = r.reshape(r.shape[0], -1)
    k = max(1, int(fraction * flat.shape[1]))
    kth_largest = flat.sort(dim=1, descending=True).values[:, k - 1 : k]
    return torch.where(flat >= kth_largest, flat, torch.zeros_like(flat)).reshape(r.shape)


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.3, 0.999, 1.0])
def test_filter_matches_sort_reference_with_ties(fraction):
    g = torch.Generator().manual_seed(3)
    continuous = torch.randn(4, 8, 9, 9, generator=g)
    ties = torch.randint(-3, 4, (4, 8, 9, 9), generator=g).float()
    for r in (continuous, ties):
        torch.testing.assert_close(
            relevance_filter(r, fraction), _sort_reference(r, fraction), rtol=0, atol=0
        )


def _large_rows(case: str) -> torch.Tensor:
    """Rows long enough for the sampled threshold (200 704 entries each), one case per branch."""
    g = torch.Generator().manual_seed(4)
    r = torch.rand(3, 64, 56, 56, generator=g).pow(6)
    if case == "skewed channels":  # relevance in a few channels: a channel-aligned stride would miss it
        r[:, ::8] *= 1000
    elif case == "mostly zeros":  # fewer nonzeros than kept entries: the threshold is the tie at zero
        r = r * (torch.rand(r.shape, generator=g) < 0.02)
    elif case == "sample overshoots":  # every sampled entry is huge: the bound is useless, full selection
        flat = r.permute(0, 2, 3, 1).reshape(3, -1)
        stride = filter_module._prime_at_least(
            max(filter_module.MIN_STRIDE, flat.shape[1] // filter_module.SAMPLE_SIZE)
        )
        flat[:, ::stride] += 10.0
        r = flat.reshape(3, 56, 56, 64).permute(0, 3, 1, 2)
    return r.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", ["plain", "skewed channels", "mostly zeros", "sample overshoots"])
@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2])
def test_filter_on_large_rows_matches_sort_reference(case, fraction):
    r = _large_rows(case)
    torch.testing.assert_close(relevance_filter(r, fraction), _sort_reference(r, fraction), rtol=0, atol=0)


def test_filter_renormalize_conserves_and_rejects_bad_fraction():
    r = torch.rand(3, 100, generator=torch.Generator().manual_seed(0))
    kept = relevance_filter(r, 0.05, renormalize=True)
    assert ((kept != 0).sum(dim=1) == 5).all()
    torch.testing.assert_close(kept.sum(dim=1), r.sum(dim=1))
    with pytest.raises(ValueError, match="topk"):
        relevance_filter(r, 0.0)


def test_topk_changes_heatmap_and_concentrates_it():
    model = tv.vgg11().eval()
    x = torch.randn(1, 3, 32, 32)
    full = explain(model, x, composite="seed", topk=1.0)
    sparse = explain(model, x, composite="seed", topk=0.05)
    assert not torch.allclose(full, sparse)
    assert (sparse != 0).float().mean() < (full != 0).float().mean()


# --- errors and no mutation -----------------------------------------------------------------------


class _Sorting(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.sort(self.conv(x).flatten(1), dim=1).values


class _Multiplying(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return (self.a(x) * self.b(x)).mean((2, 3))


def test_unknown_operation_is_named():
    with pytest.raises(UnsupportedOperationError, match=r"'sort'.*node 'sort'"):
        explain(_Sorting(), torch.randn(1, 3, 8, 8))
    with pytest.raises(UnsupportedOperationError, match=r"'mul'.*two activations"):
        explain(_Multiplying(), torch.randn(1, 3, 8, 8), composite="epsilon")


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


@pytest.mark.parametrize("composite", ["seed", "epsilon-gamma-box", "epsilon-plus-flat"])
def test_model_is_never_modified(composite):
    model = tv.resnet18()
    model.train()  # a model left in training mode must stay so
    model.layer1.register_forward_hook(lambda *a: None)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = _snapshot(model)
    explain(model, torch.randn(2, 3, 32, 32), composite=composite, topk=0.1, mean=[0.5] * 3, std=[0.5] * 3)
    after = _snapshot(model)
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["requires_grad"] == after["requires_grad"]
    assert torch.equal(before["grads"]["fc.weight"], after["grads"]["fc.weight"])
    assert all(g is None for k, g in after["grads"].items() if k != "fc.weight")


# --- targets, precision, architectures -----------------------------------------------------------


def test_targets_and_starts():
    torch.manual_seed(0)
    model = tv.vgg11().eval()
    x = torch.randn(2, 3, 32, 32)
    explainer = Explainer(model, "epsilon-plus-flat")
    predicted = explainer(x)
    assert predicted.targets.tolist() == predicted.logits.argmax(1).tolist()
    assert explainer(x, target=7).targets.tolist() == [7, 7]
    assert explainer(x, target=[1, 2]).targets.tolist() == [1, 2]
    softmax = explainer(x, target="softmax")
    torch.testing.assert_close(softmax.start, softmax.logits.softmax(1))
    assert softmax.targets.tolist() == [-1, -1]
    seed = Explainer(model, "seed")(x)
    torch.testing.assert_close(seed.start, seed.logits.softmax(1))
    with pytest.raises(ValueError, match="out of range"):
        explainer(x, target=1000)
    with pytest.raises(ValueError, match="2 targets"):
        explainer(x[:1], target=[1, 2])


def test_zbox_needs_bounds():
    with pytest.raises(ValueError, match="mean= and std="):
        explain(tv.vgg11(), torch.randn(1, 3, 32, 32), composite="epsilon-gamma-box")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_agrees_with_fp32(precision):
    torch.manual_seed(0)
    model = tv.vgg11().eval()
    x = torch.randn(2, 3, 64, 64)
    full = explain(model, x, composite="seed")
    low = explain(model, x, composite="seed", precision=precision)
    assert low.dtype == torch.float32
    for a, b in zip(full, low):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert r > 0.99, r


ARCHITECTURES = {
    "alexnet": (tv.alexnet, 64),
    "vgg11": (tv.vgg11, 32),
    "vgg19": (tv.vgg19, 32),
    "vgg16_bn": (tv.vgg16_bn, 32),
    "resnet50": (tv.resnet50, 64),
    "mobilenet_v3_large": (tv.mobilenet_v3_large, 64),
    "efficientnet_b0": (tv.efficientnet_b0, 64),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architectures_run_and_reproduce_logits(arch):
    factory, size = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = bias_free(factory().double(), size)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    result = attribute(model, x, composite="epsilon-plus-flat", target=0)
    with torch.no_grad():
        reference = model(x)
    torch.testing.assert_close(result.logits, reference, rtol=1e-7, atol=1e-9 * reference.abs().max().item())
    assert torch.isfinite(result.relevance).all()
    totals = result.relevance.sum(dim=(1, 2, 3))
    assert (totals > 0.5).all() and (totals < 1.5).all(), totals


def test_first_layer_rule_reaches_through_leading_shape_ops():
    """A layer fed by the image through identity/dropout still counts as the first layer."""
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 5)
    direct = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear)
    wrapped = nn.Sequential(nn.Identity(), nn.Dropout(), conv, nn.ReLU(), nn.Flatten(), linear)
    x = torch.randn(2, 3, 8, 8)
    expected = explain(direct, x, composite="epsilon-plus-flat", target=1)
    torch.testing.assert_close(explain(wrapped, x, composite="epsilon-plus-flat", target=1), expected)
    with_input_rule = explain(wrapped, x, composite="epsilon", target=1)
    assert not torch.allclose(with_input_rule, expected)  # so the flat first-layer rule was really applied


def test_engine_does_not_import_the_command_line():
    import subprocess
    import sys

    code = "import sys, lrp_cli.lrp; print(sorted(m for m in sys.modules if m.startswith(('typer', 'lrp_cli.'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "typer" not in loaded and "lrp_cli.cli" not in loaded and "lrp_cli.pipeline" not in loaded
    assert "lrp_cli.lrp.engine" in loaded
