"""Each operation of today's classifiers against its rule, computed by hand (float64, tiny tensors).

Every test builds a small module around one operation, explains it with a known start relevance and
compares the input relevance with the closed form of the rule written out here, independently of the
engine's implementation.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lrp_cli.lrp import Composite, Epsilon, Explainer, UnsupportedOperationError, attribute, audit

EPS = 1e-12  # stabiliser small enough that the closed forms below hold to rounding
LINEAR = Composite(layer_map={"conv": Epsilon(EPS), "linear": Epsilon(EPS)}, stabilizer=EPS)
CP = Composite(layer_map={"conv": Epsilon(EPS), "linear": Epsilon(EPS)}, stabilizer=EPS, attention="cp")


def relevance_of(model: nn.Module, x: torch.Tensor, start: torch.Tensor, composite=LINEAR) -> torch.Tensor:
    """Input relevance for the float start relevance ``start`` (shaped like the output)."""
    return attribute(model.double(), x.double(), composite=composite, target=start.double()).relevance


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class Flat(nn.Module):
    """Wraps an operation on (N, T, D) tokens so the model returns (N, classes) logits."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x).flatten(1)


# --- normalisation ------------------------------------------------------------------------------


def layer_norm_reference(x, R, weight, bias, eps):
    """AttnLRP: std held constant, then the epsilon rule on the remaining linear map (centre, scale, w)."""
    mean = x.mean(-1, keepdim=True)
    std = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    y = (x - mean) / std * weight + bias
    u = R / y * weight / std
    return x * (u - u.mean(-1, keepdim=True))


@pytest.mark.parametrize("functional", [False, True])
def test_layer_norm_identity_rule_matches_closed_form(functional):
    norm = nn.LayerNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(rand(6, seed=1))
        norm.bias.copy_(rand(6, seed=2) * 0.1)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = norm.weight, norm.bias

        def forward(self, x):
            return F.layer_norm(x, (6,), self.weight, self.bias, 1e-5)

    model = Flat(Functional() if functional else norm)
    x, R = rand(2, 3, 6, seed=3), rand(2, 18, seed=4)
    got = relevance_of(model, x, R)
    torch.testing.assert_close(got, layer_norm_reference(x, R.reshape(2, 3, 6), norm.weight, norm.bias, 1e-5))


def test_bias_free_layer_norm_conserves_and_rms_norm_is_the_identity():
    x, R = rand(2, 4, 8, seed=5), rand(2, 32, seed=6)
    ln = Flat(nn.LayerNorm(8, bias=False))
    torch.testing.assert_close(relevance_of(ln, x, R).sum(), R.sum(), rtol=1e-10, atol=0)
    rms = Flat(nn.RMSNorm(8, eps=1e-6))
    with torch.no_grad():
        rms.op.weight.copy_(rand(8, seed=7))
    torch.testing.assert_close(relevance_of(rms, x, R), R.reshape(2, 4, 8))


def test_group_norm_and_layer_norm_2d_with_permutes():
    x = rand(2, 4, 3, 3, seed=8)
    group = nn.GroupNorm(2, 4, affine=False)
    R = rand(2, 36, seed=9)
    got = relevance_of(Flat(group), x, R)
    g = x.reshape(2, 2, -1)
    std = torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)
    y = (g - g.mean(-1, keepdim=True)) / std
    u = R.reshape(2, 2, -1) / y / std
    torch.testing.assert_close(got, (g * (u - u.mean(-1, keepdim=True))).reshape(x.shape))
    ln2d = timm.layers.LayerNorm2d(4)  # permute, layer_norm over channels, permute back
    with torch.no_grad():
        ln2d.bias.zero_()
    torch.testing.assert_close(relevance_of(Flat(ln2d), x, R).sum(), R.sum(), rtol=1e-10, atol=0)


# --- activations, gates, products ---------------------------------------------------------------


@pytest.mark.parametrize(
    "activation",
    [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish(), nn.Mish(), timm.layers.GELUTanh()],
)
def test_element_wise_activations_pass_relevance_unchanged(activation):
    x, R = rand(2, 10, seed=10), rand(2, 10, seed=11)
    torch.testing.assert_close(relevance_of(Flat(activation), x, R), R)


def test_product_of_two_activations_is_split_in_halves():
    class GatedLinearUnit(nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, dim=-1)
            return F.gelu(a) * b

    x, R = rand(2, 8, seed=12), rand(2, 4, seed=13)
    got = relevance_of(GatedLinearUnit(), x, R)
    torch.testing.assert_close(got, torch.cat([R / 2, R / 2], dim=-1))


def test_sigmoid_gate_gives_everything_to_the_signal():
    class Gate(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x.mean(dim=-1, keepdim=True))

    x, R = rand(2, 5, seed=14), rand(2, 5, seed=15)
    torch.testing.assert_close(relevance_of(Gate(), x, R), R)


def test_softmax_rule_attnlrp_and_cp():
    x, R = rand(2, 5, seed=16), rand(2, 5, seed=17)
    model = Flat(nn.Softmax(dim=-1))
    s = torch.softmax(x, -1)
    torch.testing.assert_close(relevance_of(model, x, R), x * (R - s * R.sum(-1, keepdim=True)))
    torch.testing.assert_close(relevance_of(model, x, R, CP), torch.zeros_like(x))


class TinyAttention(nn.Module):
    """Single-head self-attention from primitives: softmax(q k^T / sqrt(d)) v."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        generator = torch.Generator().manual_seed(18)
        self.wq, self.wk, self.wv = (
            nn.Parameter(torch.randn(4, 4, generator=generator, dtype=torch.float64)) for _ in range(3)
        )

    def forward(self, x):
        q, k, v = x @ self.wq, x @ self.wk, x @ self.wv
        if self.fused:
            out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        else:
            out = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) @ v
        return out.flatten(1)


def test_attention_rules_by_hand_and_fused_equals_unfused():
    model = TinyAttention(fused=False)
    x, R = rand(2, 3, 4, seed=19), rand(2, 12, seed=20)
    q, k, v = x @ model.wq, x @ model.wk, x @ model.wv
    scores = q @ k.transpose(-2, -1) / 2.0
    a = torch.softmax(scores, -1)
    out = a @ v
    s = R.reshape(out.shape) / out
    # CP-LRP: attention fixed, out = A v is linear in v, then v = x Wv
    r_v = v * (a.transpose(-2, -1) @ s)
    expected_cp = x * ((r_v / v) @ model.wv.T)
    torch.testing.assert_close(relevance_of(model, x, R, CP), expected_cp)
    # AttnLRP: halves at A @ v, the softmax rule, halves at q @ k^T
    r_a = 0.5 * a * (s @ v.transpose(-2, -1))
    r_v = 0.5 * v * (a.transpose(-2, -1) @ s)
    r_scores = scores * (r_a - a * r_a.sum(-1, keepdim=True))
    t = r_scores / (q @ k.transpose(-2, -1))  # the scaling by 1/2 passes relevance unchanged
    r_q, r_k = 0.5 * q * (t @ k), 0.5 * k * (t.transpose(-2, -1) @ q)
    expected = sum(
        x * ((r / z) @ w.T) for r, z, w in ((r_q, q, model.wq), (r_k, k, model.wk), (r_v, v, model.wv))
    )
    torch.testing.assert_close(relevance_of(model, x, R), expected)
    fused = TinyAttention(fused=True)
    fused.load_state_dict(model.state_dict())
    for composite in (LINEAR, CP):
        torch.testing.assert_close(relevance_of(fused, x, R, composite), relevance_of(model, x, R, composite))


def test_multihead_attention_module_equals_its_primitives_and_model_output():
    torch.manual_seed(21)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()

    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = mha

        def forward(self, x):
            out, _ = self.attention(x, x, x, need_weights=False)
            return out.flatten(1)

    class Primitives(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            mha = self.mha
            w, b = mha.in_proj_weight, mha.in_proj_bias
            q, k, v = (F.linear(x, w[i * 8 : (i + 1) * 8], b[i * 8 : (i + 1) * 8]) for i in range(3))
            q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in (q, k, v))
            a = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
            out = (a @ v).transpose(1, 2).flatten(-2)
            return mha.out_proj(out).flatten(1)

    x, R = rand(2, 3, 8, seed=22), rand(2, 24, seed=23)
    result = attribute(Module().double(), x, composite=LINEAR, target=R)
    torch.testing.assert_close(result.logits, Module()(x))
    for composite in (LINEAR, CP):
        torch.testing.assert_close(
            relevance_of(Module(), x, R, composite), relevance_of(Primitives(), x, R, composite)
        )


def test_cp_lrp_conserves_on_a_bias_free_transformer_block():
    """Attention held constant, no biases anywhere: the block's input relevance sums to its output's."""
    torch.manual_seed(24)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(8, bias=False), nn.LayerNorm(8, bias=False)
            self.attention = nn.MultiheadAttention(8, 2, bias=False, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(8, 16, bias=False), nn.GELU(), nn.Linear(16, 8, bias=False))

        def forward(self, x):
            h = self.norm1(x)
            x = x + self.attention(h, h, h, need_weights=False)[0]
            x = x + self.mlp(self.norm2(x))
            return x.mean(dim=1)

    x = rand(2, 5, 8, seed=25)
    result = attribute(Block().double().eval(), x, composite=CP, target=[1, 3])
    torch.testing.assert_close(
        result.relevance.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64), rtol=1e-4, atol=0
    )


# --- token and window plumbing --------------------------------------------------------------------


class Tokens(nn.Module):
    """Class token, positional embedding, roll, window partition and reverse, layer scale, mean pool."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(26)
        self.cls = nn.Parameter(torch.randn(1, 1, 4, generator=generator, dtype=torch.float64))
        self.pos = nn.Parameter(torch.randn(1, 17, 4, generator=generator, dtype=torch.float64))
        self.scale = nn.Parameter(torch.rand(4, generator=generator, dtype=torch.float64) + 0.5)

    def forward(self, x):  # x: (N, 4, 4, 4) channels-last map
        n, h, w, c = x.shape
        x = torch.roll(x, shifts=(1, 2), dims=(1, 2))
        windows = x.view(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        x = windows.view(n, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h * w, c)
        x = torch.cat([self.cls.expand(n, -1, -1), x], dim=1) + self.pos
        x = x * self.scale  # layer scale
        mask = (torch.arange(h * w + 1, device=x.device) % 5).eq(0)
        x = x.masked_fill(mask[None, :, None], 0.0)
        return x[:, 1:].mean(dim=1) + 0 * x[:, 0].mean(dim=1, keepdim=True)


def test_token_plumbing_routes_and_absorbs_by_hand():
    x, R = rand(2, 4, 4, 4, seed=27), rand(2, 4, seed=28)
    model = Tokens()
    got = relevance_of(model, x, R)
    # by hand: roll and the window round trip only move values; the positional add leaves each token
    # x / (x + pos) of its share; layer scale passes; masked tokens and the class token get nothing
    tokens = torch.roll(x, shifts=(1, 2), dims=(1, 2)).reshape(2, 16, 4)
    with_pos = tokens + model.pos[:, 1:]
    scaled = with_pos * model.scale
    keep = ((torch.arange(17) % 5) != 0)[1:].to(torch.float64)[None, :, None]
    pooled = (scaled * keep).mean(dim=1)
    share = (R[:, None, :] * scaled * keep / 16) / pooled[:, None, :]  # mean pool by contribution
    on_tokens = share * tokens / with_pos
    expected = torch.roll(on_tokens.reshape(2, 4, 4, 4), shifts=(-1, -2), dims=(1, 2))
    torch.testing.assert_close(got, expected)
    report = audit(model, x, composite=LINEAR)
    causes = {layer.cause for layer in report.layers if abs(layer.absorbed) > 1e-9}
    assert "parameter operand" in causes and report.ok


def test_interpolation_shares_by_contribution_and_conserves():
    class Upsample(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False).flatten(1)

    x = rand(1, 2, 3, 3, seed=29).abs() + 0.1
    R = rand(1, 72, seed=30)
    torch.testing.assert_close(relevance_of(Upsample(), x, R).sum(), R.sum(), rtol=1e-10, atol=0)
    nearest = nn.Sequential(nn.Upsample(scale_factor=2), nn.Flatten())
    got = relevance_of(nearest, x, R)
    torch.testing.assert_close(
        got, R.reshape(1, 2, 6, 6).unflatten(-1, (3, 2)).unflatten(-3, (3, 2)).sum((-1, -3))
    )


# --- slips and shape-only code -------------------------------------------------------------------


def test_python_scalar_first_and_scalar_products_pass_relevance():
    class Scalars(nn.Module):
        def forward(self, x):
            y = 0 + x
            y = 2.0 * y
            y = 1.0 - (-y)
            return y / 4

    x, R = rand(2, 3, seed=31), rand(2, 3, seed=32)
    torch.testing.assert_close(relevance_of(Scalars(), x, R), R)


def test_shape_arithmetic_asserts_and_linear_subclasses_do_not_block():
    class ShapeCode(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = timm.layers.Linear(6, 4, bias=False)  # a subclass of nn.Linear with its own forward

        def forward(self, x):
            n, t = x.shape[0], x.size(1)
            torch._assert(t % 2 == 0, "even tokens")
            half = t // 2
            assert_even = (torch.tensor(t) == 6).item() if False else None  # never runs: plain Python
            del assert_even
            y = x.reshape(n, half, 2 * x.shape[-1])
            return self.fc(y.reshape(n, -1)[:, :6])

    x, R = rand(2, 6, 1, seed=33), rand(2, 4, seed=34)
    model = ShapeCode().double()
    result = attribute(model, x, composite=LINEAR, target=R)
    torch.testing.assert_close(result.logits, model(x))
    torch.testing.assert_close(result.relevance.sum(), R.sum(), rtol=1e-8, atol=0)


def test_every_unsupported_operation_is_named_at_once():
    class Unknown(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1) + torch.cumprod(x, 1) + torch.logcumsumexp(x, 1)

    with pytest.raises(UnsupportedOperationError) as error:
        Explainer(Unknown())
    message = str(error.value)
    assert "3 operation(s)" in message and "cumsum" in message and "cumprod" in message


def test_an_unsupported_op_on_a_gate_path_does_not_block():
    class GatePath(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(torch.cumsum(x, dim=1))

    x, R = rand(2, 4, seed=35), rand(2, 4, seed=36)
    torch.testing.assert_close(relevance_of(GatePath(), x, R), R)


def test_weight_standardised_conv_and_unfolded_batch_norm_with_activation():
    torch.manual_seed(37)
    model = nn.Sequential(
        timm.layers.StdConv2d(3, 4, 3, padding=1),
        nn.MaxPool2d(2),
        timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU),  # after a pool: not folded, activation inside
        nn.Flatten(),
    ).double()
    model[2].running_mean.uniform_(-0.1, 0.1)
    model.eval()
    x = rand(2, 3, 4, 4, seed=38)
    result = attribute(model, x, composite=LINEAR, target=torch.ones(2, 16, dtype=torch.float64))
    torch.testing.assert_close(result.logits, model(x))
    assert torch.isfinite(result.relevance).all() and result.relevance.abs().sum() > 0


def test_attention_models_default_to_attnlrp_and_cnns_to_epsilon_plus_flat():
    assert Explainer(TinyAttention(fused=True)).composite.name == "attnlrp"
    assert (
        Explainer(nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten())).composite.name
        == "epsilon-plus-flat"
    )


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32),
        ("swin_tiny_patch4_window7_224", {"img_size": 56, "depths": (1, 1, 1, 1)}, 56),
        ("convnext_atto", {}, 32),
        ("levit_128s", {"img_size": 64}, 64),
    ],
)
def test_small_timm_transformers_explain_and_reproduce_logits(name, kwargs, size):
    torch.manual_seed(39)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    result = attribute(model, x)
    with torch.no_grad():
        reference = model(x)
    torch.testing.assert_close(result.logits, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    assert torch.isfinite(result.relevance).all()
    assert not math.isclose(float(result.relevance.abs().sum()), 0.0)


def test_global_response_norm_statistic_is_held_constant_and_its_bias_absorbs():
    from timm.layers.grn import GlobalResponseNorm

    grn = GlobalResponseNorm(3, channels_last=False)
    with torch.no_grad():
        grn.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
        grn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    x, R = rand(2, 3, 2, 2, seed=40), rand(2, 12, seed=41)
    model = Flat(grn).double()
    result = attribute(model, x, composite=LINEAR, target=R)
    torch.testing.assert_close(result.logits, model(x))
    # y = x + (b + w * x * n) with n = |x|_spatial / mean_c |x|_spatial held constant
    g = x.norm(p=2, dim=(2, 3), keepdim=True)
    n = g / (g.mean(dim=1, keepdim=True) + grn.eps)
    w, b = grn.weight.view(1, 3, 1, 1), grn.bias.view(1, 3, 1, 1)
    branch = b + w * x * n
    y = x + branch
    share = R.reshape(x.shape) / y
    expected = x * share + (w * x * n) * (share * branch / branch)
    torch.testing.assert_close(result.relevance, expected)


def test_star_relu_power_of_an_activation_is_element_wise():
    class StarReLU(nn.Module):  # MetaFormer's activation: scale * relu(x) ** 2 + bias
        def forward(self, x):
            return 0.8 * torch.relu(x) ** 2 + 0.0

    x, R = rand(2, 6, seed=42), rand(2, 6, seed=43)
    torch.testing.assert_close(relevance_of(StarReLU(), x, R), R)
