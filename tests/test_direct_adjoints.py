"""The engine's written-out adjoints equal autograd's vector-Jacobian products (float64, odd shapes).

The normaliser, residual-add and matmul rules used to take ``x * d<s, f(x)>/dx`` from autograd; they now
write the transpose out. Each case below computes the same share with autograd (``share_by_contribution``
on the map written as plain torch code) and asserts the two agree, on odd sizes, negative dims, strided
(non-contiguous) inputs and broadcast operands.
"""

from __future__ import annotations

import operator
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lrp_cli.lrp import Explainer
from lrp_cli.lrp.composites import Composite
from lrp_cli.lrp.ops.arithmetic import Arithmetic, Product, matmul_shares
from lrp_cli.lrp.ops.base import share_by_contribution
from lrp_cli.lrp.ops.normalization import Normalization
from lrp_cli.lrp.rules import Epsilon, ZPlus

EPS = 1e-6
CTX = SimpleNamespace(stabilizer=EPS, attention="attnlrp")


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def strided(*shape: int, seed: int) -> torch.Tensor:
    """A non-contiguous tensor of ``shape``: every other element along the last dim of a wider one."""
    wide = rand(*shape[:-1], 2 * shape[-1] + 1, seed=seed)[..., 1::2]
    assert not wide.is_contiguous() and wide.shape == shape
    return wide


def fixed_scale_reference(x, centre, dims, weight, eps, groups=None):
    """The normaliser as plain torch code, its statistic computed from ``x`` and then held constant."""
    if groups is not None:
        g = x.reshape(x.shape[0], groups, -1)
        scale = torch.rsqrt(g.var(dim=-1, unbiased=False, keepdim=True) + eps)

        def grouped(v):
            h = v.reshape(v.shape[0], groups, -1)
            out = ((h - h.mean(dim=-1, keepdim=True)) * scale).reshape(v.shape)
            return out if weight is None else out * weight.reshape(1, -1, *([1] * (v.dim() - 2)))

        return grouped
    stat = x.var(dim=dims, unbiased=False, keepdim=True) if centre else x.pow(2).mean(dim=dims, keepdim=True)
    scale = torch.rsqrt(stat + eps)

    def linear(v):
        out = (v - v.mean(dim=dims, keepdim=True)) * scale if centre else v * scale
        return out if weight is None else out * weight

    return linear


@pytest.mark.parametrize(
    ("shape", "centre", "dims", "weight_shape", "groups", "non_contiguous"),
    [
        ((3, 5, 7), True, (-1,), (7,), None, False),  # layer norm, odd sizes
        ((3, 5, 7), True, (-2, -1), (5, 7), None, True),  # over two negative dims, strided input
        ((2, 4, 9), False, (-1,), (9,), None, True),  # RMS norm
        ((2, 3, 5, 7), True, (1,), None, None, False),  # LayerNorm2d's channel dim, no affine weight
        ((2, 6, 3, 5), True, (), (6,), 3, True),  # group norm, 3 groups of 2 channels
    ],
)
def test_normalization_adjoint_equals_autograd(shape, centre, dims, weight_shape, groups, non_contiguous):
    x = strided(*shape, seed=1) if non_contiguous else rand(*shape, seed=1)
    relevance = rand(*shape, seed=2)
    weight = None if weight_shape is None else rand(*weight_shape, seed=3)
    op = Normalization(lambda v: v, centre=centre, dims=dims, groups=groups, weight=weight, eps=1e-5)
    reference_map = fixed_scale_reference(x, centre, dims, weight, 1e-5, groups)
    output = reference_map(x) + 0.25  # the affine bias only shows in the output (the denominator)
    (expected,) = share_by_contribution(reference_map, [x], output, relevance, EPS)
    (got, *rest) = op.propagate(relevance, [x], output, CTX)
    assert rest == []
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # and it is not trivially zero or the relevance itself
    assert got.abs().sum() > 0 and not torch.allclose(got, relevance)


@pytest.mark.parametrize("kind", ["add", "sub"])
@pytest.mark.parametrize(
    ("shape_a", "shape_b", "roles"),
    [
        ((3, 5, 7), (3, 5, 7), ("value", "value")),  # residual connection
        ((3, 5, 7), (1, 5, 7), ("value", "constant")),  # positional embedding: broadcast, absorbed
        ((1, 5, 7), (3, 5, 7), ("constant", "value")),  # the constant first
        ((3, 1, 7), (3, 5, 1), ("value", "value")),  # both broadcast
    ],
)
def test_add_by_contribution_equals_autograd(kind, shape_a, shape_b, roles):
    a, b = strided(*shape_a, seed=4), rand(*shape_b, seed=5)
    fn = operator.add if kind == "add" else operator.sub
    output = fn(a, b)
    relevance = rand(*output.shape, seed=6)
    op = Arithmetic(fn, kind, roles, fn)
    got = op.propagate(relevance, [a, b], output, CTX)
    sign = -1.0 if kind == "sub" else 1.0
    shares = share_by_contribution(lambda u, v: u + sign * v, [a, b], output, relevance, EPS)
    for index, (share, role) in enumerate(zip(shares, roles)):
        if role == "constant":
            assert got[index] is None
        else:
            assert got[index].shape == (a, b)[index].shape
            torch.testing.assert_close(got[index], share.sum_to_size((a, b)[index].shape), rtol=1e-12, atol=0)


@pytest.mark.parametrize("transposed_key", [False, True])
def test_matmul_shares_equal_autograd_and_cp_skips_the_attention_weights(transposed_key):
    a = rand(2, 3, 5, 7, seed=7)
    b = strided(2, 3, 4, 7, seed=8).transpose(-2, -1) if transposed_key else rand(2, 3, 7, 4, seed=8)
    assert b.shape == (2, 3, 7, 4)
    output = a @ b
    relevance = rand(*output.shape, seed=9)
    expected = share_by_contribution(operator.matmul, [a, b], output, relevance, EPS)
    got = matmul_shares(operator.matmul, [a, b], output, relevance, EPS, [0, 1])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    # attention @ value: AttnLRP halves both shares, CP-LRP gives the value everything, the weights nothing
    product = Product(operator.matmul, ("attention", "value"), operator.matmul)
    halves = product.propagate(relevance, [a, b], output, CTX)
    torch.testing.assert_close(halves[0], expected[0] * 0.5, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(halves[1], expected[1] * 0.5, rtol=1e-12, atol=1e-14)
    cp = product.propagate(relevance, [a, b], output, SimpleNamespace(stabilizer=EPS, attention="cp"))
    assert cp[0] is None
    torch.testing.assert_close(cp[1], expected[1], rtol=1e-12, atol=1e-14)


def test_matmul_with_broadcast_operands_falls_back_on_autograd():
    a, b = rand(2, 3, 5, 7, seed=10), rand(7, 4, seed=11)
    output = a @ b
    relevance = rand(*output.shape, seed=12)
    assert matmul_shares(operator.matmul, [a, b], output, relevance, EPS, [0]) is None
    (share, none) = Product(operator.matmul, ("value", "constant"), operator.matmul).propagate(
        relevance, [a, b], output, CTX
    )
    assert none is None
    expected = a * ((relevance / (output + torch.where(output >= 0, EPS, -EPS))) @ b.T)
    torch.testing.assert_close(share, expected, rtol=1e-12, atol=1e-14)


def test_epsilon_layers_reuse_the_forward_output_with_the_same_result():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(11, 13), nn.ReLU(), nn.Linear(13, 5)).double().eval()
    x = rand(3, 11, seed=13)
    epsilon = Composite(name="eps", layer_map={"linear": Epsilon(epsilon=1e-6)})
    explainer = Explainer(model, epsilon)
    ops = explainer.program.weighted
    assert all(op.reuses_output and "output" in op.keeps for op in ops)
    fast = explainer(x, target=2).relevance
    for op in ops:  # recompute z the old way
        op.reuses_output, op.keeps = False, "inputs"
    slow = explainer(x, target=2).relevance
    torch.testing.assert_close(fast, slow, rtol=1e-13, atol=0)
    # rules whose denominator is not the plain forward output keep recomputing it
    for rule in (ZPlus(), Epsilon(zero_bias=True)):
        other = Explainer(model, Composite(name="other", layer_map={"linear": rule}))
        assert not any(op.reuses_output for op in other.program.weighted)
