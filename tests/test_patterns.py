"""PatternNet and PatternAttribution: the estimators against Kindermans et al.'s toy example and a direct
computation, the fitted patterns and heatmaps against TorchLRP's formulas (written out here), streaming
against all-at-once statistics, the weights check, and the command line."""

from __future__ import annotations

import copy
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from lrp_cli.cli import app
from lrp_cli.config import ConfigError, load_config
from lrp_cli.data import ImageDataset, discover
from lrp_cli.lrp import Explainer
from lrp_cli.lrp.layers import WeightedLayer
from lrp_cli.lrp.patterns import (
    Patterns,
    _maps,
    fit_patterns,
    pattern_composite,
    weights_hash,
)
from lrp_cli.models import IMAGENET_MEAN, IMAGENET_STD, state_hash

torch.set_default_dtype(torch.float32)
F64 = torch.float64


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> bool:
    scale = max(float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) <= rtol * scale


# --- Kindermans et al.'s toy example --------------------------------------------------------------


def _orthogonal_noise(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise with zero mean and zero sample covariance with ``y``, both over all samples and over the
    samples where y > 0 (as the distractor is in expectation): the estimators' answer is then exact."""
    noise = torch.randn(y.shape, dtype=F64, generator=generator)
    for part in (y > 0, y <= 0):
        basis = torch.stack([torch.ones_like(y[part]), y[part]], dim=1)
        coefficients = torch.linalg.lstsq(basis, noise[part]).solution
        noise[part] = noise[part] - basis @ coefficients
    return noise


@pytest.fixture(scope="module")
def toy():
    """x = a_s * y + a_d * eps with signal direction a_s = (1, 0) and distractor a_d = (1, 1): the filter
    w = (1, -1) reads y exactly (it cancels the distractor), the second output reads eps."""
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(400, dtype=F64, generator=generator)
    eps = _orthogonal_noise(y, generator)
    signal, distractor = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([1.0, 1.0], dtype=F64)
    x = y[:, None] * signal + eps[:, None] * distractor
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).to(F64).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    return model, x, signal, distractor


def test_patternnet_recovers_the_signal_direction(toy):
    model, x, signal, distractor = toy
    patterns = fit_patterns(model, x.split(64))
    for estimator in ("linear", "positive"):
        a = patterns.table(estimator)["0"]
        assert torch.allclose(a[0], signal, atol=1e-12), (estimator, a)  # not the weight (1, -1)
    # the second output reads the distractor itself: its pattern is the distractor's direction
    assert torch.allclose(patterns.linear["0"][1], distractor, atol=1e-12)
    net = Explainer(model, "patternnet", patterns=patterns)(x[:5], target=0).relevance
    assert torch.allclose(net, signal.expand(5, 2), atol=1e-12)  # the signal's direction, for every input
    leaf = x[:1].clone().requires_grad_()
    (gradient,) = torch.autograd.grad(model(leaf)[0, 0], leaf)
    assert torch.allclose(gradient[0], model[0].weight[0])  # the gradient shows the filter (1, -1) instead


def test_patternattribution_is_weight_times_pattern(toy):
    model, x, signal, _ = toy
    patterns = fit_patterns(model, [x])
    attribution = Explainer(model, "patternattribution", patterns=patterns)(x[:3], target=0).relevance
    expected = model[0].weight[0] * signal  # (1, -1) * (1, 0): all on the signal's dimension
    assert torch.allclose(attribution, expected.expand(3, 2), atol=1e-12)


# --- a direct computation through two layers ---------------------------------------------------------


def test_two_layer_network_against_a_direct_computation():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(F64).eval()
    x = torch.randn(200, 6, dtype=F64) @ torch.randn(6, 6, dtype=F64)
    patterns = fit_patterns(model, x.split(50))
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    hidden = torch.relu(model[0](x)).detach()
    for estimator in ("linear", "positive"):
        a1, a2 = patterns.table(estimator)["0"], patterns.table(estimator)["2"]
        # the estimators written out: cov(x, y) / w^T cov(x, y), over all outputs or over y > 0 (with E[y])
        for a, inputs, w, b in ((a1, x, w1, model[0].bias), (a2, hidden, w2, model[2].bias)):
            y = (inputs @ w.T).detach()
            mask = (y + b.detach() > 0).to(F64) if estimator == "positive" else torch.ones_like(y)
            count = mask.sum(0)[:, None]
            cov = ((mask * y).T @ inputs) / count - (mask.T @ inputs) / count * y.mean(0)[:, None]
            assert close(a, cov / (w * cov).sum(1, keepdim=True))
        for method, p1, p2 in (("patternnet", a1, a2), ("patternattribution", w1 * a1, w2 * a2)):
            explained = Explainer(model, pattern_composite(patterns, method, estimator))(x[:4], target=1)
            direct = (
                (p2[1] * (hidden[:4] > 0)) @ p1
            ).detach()  # back through layer 2, the ReLU gate, layer 1
            assert close(explained.relevance, direct), (method, estimator)


# --- TorchLRP's formulas on a small CNN, written out --------------------------------------------------


def _safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a / (b + (b == 0).to(b.dtype))  # TorchLRP's: 0 where the denominator is 0 (a neuron never on)


def _torchlrp_patterns(model: nn.Sequential, x: torch.Tensor, positive: bool) -> dict[str, torch.Tensor]:
    """TorchLRP's pattern fitting, reimplemented: per conv/linear layer, the input patches as rows
    (unfold), a mask (y >= 0 with bias for the positive estimator, all ones otherwise), E+[x], E+[xy]
    over the mask, E[y] over all rows (y without bias), cov = E+[xy] - E+[x] E[y], and the pattern
    cov / diag(W cov), reshaped to the weight (divisions by zero give zero)."""
    found = {}
    for index, module in enumerate(model):
        y = module(x)
        if isinstance(module, nn.Conv2d | nn.Linear):
            out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            if isinstance(module, nn.Conv2d):
                rows = F.unfold(x, module.kernel_size, padding=module.padding, stride=module.stride)
                rows = rows.transpose(1, 2).reshape(-1, rows.shape[1])
                outputs = y.permute(0, 2, 3, 1).reshape(-1, out)
            else:
                rows, outputs = x, y
            mask = (outputs >= 0).to(F64) if positive else torch.ones_like(outputs)
            plain = outputs - module.bias
            count = mask.sum(0, keepdim=True)
            x_mean = _safe_divide(rows.T @ mask, count)
            xy_mean = _safe_divide(rows.T @ (plain * mask), count)
            y_mean = plain.sum(0) / len(plain)
            cov = xy_mean - x_mean * y_mean
            weight = module.weight.reshape(out, -1)
            pattern = _safe_divide(cov, torch.diag(weight @ cov)[None, :])
            found[str(index)] = pattern.T.reshape(module.weight.shape)
        x = y
    return found


class _PatternBackward(torch.autograd.Function):
    """TorchLRP's pattern layers: the forward as usual, the backward through the pattern (PatternNet) or
    pattern * weight (PatternAttribution) with conv_transpose2d / a matrix product."""

    @staticmethod
    def forward(ctx, x, module, pattern):
        ctx.module, ctx.pattern = module, pattern
        return module(x)

    @staticmethod
    def backward(ctx, grad):
        module, pattern = ctx.module, ctx.pattern
        if isinstance(module, nn.Conv2d):
            return F.conv_transpose2d(grad, pattern, stride=module.stride, padding=module.padding), None, None
        return grad @ pattern, None, None


def _torchlrp_explain(model, x, patterns, attribution):
    x = x.clone().requires_grad_()
    h = x
    for index, module in enumerate(model):
        if str(index) in patterns:
            pattern = patterns[str(index)] * module.weight.detach() if attribution else patterns[str(index)]
            h = _PatternBackward.apply(h, module, pattern)
        else:
            h = module(h)  # ReLU, max pool, flatten: autograd's own backward
    h[torch.arange(len(h)), h.argmax(1)].sum().backward()
    return x.grad


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    )
    with torch.no_grad():
        for module in model:
            if hasattr(module, "bias"):
                module.bias.uniform_(-0.3, 0.3)  # no output sits exactly at zero
    return model.to(F64).eval(), torch.randn(24, 3, 11, 11, dtype=F64)  # 11: stride 2 needs no output padding


def test_agrees_with_torchlrp_formulas_on_a_cnn(cnn):
    model, x = cnn
    ours = fit_patterns(model, x.split(10))
    for estimator, positive in (("linear", False), ("positive", True)):
        with torch.no_grad():
            reference = _torchlrp_patterns(model, x, positive)
        assert set(reference) == set(ours.table(estimator)) == {"0", "2", "6"}
        for name, pattern in reference.items():
            assert close(ours.table(estimator)[name], pattern), (estimator, name)
        for method in ("patternnet", "patternattribution"):
            expected = _torchlrp_explain(model, x[:6], reference, method == "patternattribution")
            got = Explainer(model, pattern_composite(ours, method, estimator))(x[:6]).relevance
            assert close(got, expected), (method, estimator)
            assert got.abs().sum() > 0


def test_streaming_statistics_equal_the_batch_statistics(cnn):
    model, x = cnn
    streamed = fit_patterns(model, x.split(5))  # 5, 5, 5, 5, 4
    at_once = fit_patterns(model, [x])
    assert streamed.images == at_once.images == 24
    for estimator in ("linear", "positive"):
        for name, pattern in at_once.table(estimator).items():
            assert close(streamed.table(estimator)[name], pattern, 1e-12), (estimator, name)


@pytest.mark.parametrize(
    ("groups", "pad_mode", "stride", "dilation"),
    [(1, "zeros", 2, 1), (4, "zeros", 2, 1), (8, "same", 1, 2), (8, "same", 2, 1), (2, "reflect", 1, 1)],
)
def test_layer_statistics_are_the_weight_gradient(groups, pad_mode, stride, dilation):
    """The correlations behind every estimator (grouped convolutions by their own unfolded path) against
    autograd's weight gradient of the engine's own layer map."""
    generator = torch.Generator().manual_seed(groups)
    weight = torch.randn(8, 8 // groups, 3, 3, dtype=F64, generator=generator)
    layer = WeightedLayer(
        "conv", weight, None, (stride, stride), (1, 1), (dilation, dilation), groups, pad_mode
    )
    x = torch.randn(3, 8, 9, 10, dtype=F64, generator=generator)
    y, correlate = _maps(layer, x)
    assert close(y, layer.apply(x, weight, None), 1e-13)
    grad = torch.randn(y.shape, dtype=F64, generator=generator)
    leaf = weight.clone().requires_grad_()
    expected = torch.autograd.grad(layer.apply(x, leaf, None), leaf, grad)[0]
    assert close(correlate(grad).reshape(weight.shape), expected, 1e-12)


# --- the weights check and the file ------------------------------------------------------------------


def test_patterns_for_other_weights_are_refused(cnn):
    model, x = cnn
    patterns = fit_patterns(model, [x[:8]])
    assert patterns.weights_hash == weights_hash(model) == state_hash(model)  # the registry's digest
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight.mul_(1.01)
    with pytest.raises(
        ValueError, match=f"fitted for weights {patterns.weights_hash}.*{weights_hash(changed)}"
    ):
        Explainer(changed, "patternnet", patterns=patterns)
    with pytest.raises(ValueError, match="needs patterns"):
        Explainer(model, "patternattribution")
    with pytest.raises(ValueError, match="only, not 'epsilon'"):
        Explainer(model, "epsilon", patterns=patterns)
    del patterns.linear["6"]
    with pytest.raises(ValueError, match="no pattern for layer '6'"):
        Explainer(model, pattern_composite(patterns, "patternnet", "linear"))


def test_file_round_trip_and_bad_files(cnn, tmp_path):
    model, x = cnn
    patterns = fit_patterns(model, [x[:8]], name="tiny")
    patterns.save(tmp_path / "p.pt")
    loaded = Patterns.load(tmp_path / "p.pt")
    assert (loaded.model, loaded.images, loaded.weights_hash, loaded.kinds) == (
        "tiny",
        8,
        patterns.weights_hash,
        {"0": "conv", "2": "conv", "6": "linear"},
    )
    for estimator in ("linear", "positive"):
        for name, pattern in patterns.table(estimator).items():
            assert torch.equal(loaded.table(estimator)[name], pattern)
    state = patterns.state()
    with pytest.raises(ValueError, match="not a patterns file"):
        Patterns.from_state({"model": "x"})
    with pytest.raises(ValueError, match="same layers"):
        Patterns.from_state({**state, "positive": {}})
    with pytest.raises(ValueError, match="unknown pattern estimator"):
        patterns.table("negative")


# --- command line -------------------------------------------------------------------------------------

NETS = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3),
    )
"""
MODEL = "pattern_nets:build"


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    (folder / "pattern_nets.py").write_text(NETS)
    sys.path.insert(0, str(folder))
    import pattern_nets

    yield pattern_nets
    sys.path.remove(str(folder))
    sys.modules.pop("pattern_nets", None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two class folders of small generated images and one file that is not an image."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for index in range(6):
        folder = root / ("circles" if index % 2 else "squares")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (root / "squares" / "broken.png").write_bytes(b"not an image")
    return root


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def fitted(nets, data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fit") / "tiny.patterns.pt"
    result = invoke("patterns", "fit", data, "--model", MODEL, "--resolution", 16, "--workers", 0, "-o", path)
    assert result.exit_code == 1, result.output  # written, with the unreadable file reported
    assert f"skipped {data / 'squares' / 'broken.png'}: " in result.output
    assert f"fitted on 6 image(s) at 16x16, written to {path}" in result.output
    return path


def test_fit_writes_the_patterns_of_the_model(nets, data, fitted):
    patterns = Patterns.load(fitted)
    model = nets.build().eval()
    assert (patterns.model, patterns.images, patterns.weights_hash) == (MODEL, 6, state_hash(model))
    assert patterns.kinds == {"0": "conv", "3": "conv", "7": "linear"}
    items = [item for item in discover([str(data)]) if item.error is None]
    dataset = ImageDataset(items, 16, "squash", IMAGENET_MEAN, IMAGENET_STD, 10**8)
    decoded = [dataset[i][1] for i in range(len(dataset))]
    pixels = torch.stack([t for t in decoded if t is not None])  # without the file that is not an image
    expected = fit_patterns(model, [pixels])  # the same images through the API, all at once
    for estimator in ("linear", "positive"):
        for name, pattern in expected.table(estimator).items():
            assert torch.allclose(patterns.table(estimator)[name], pattern, rtol=1e-5, atol=1e-7)
    assert not list(fitted.parent.glob(".*.lrp.tmp"))  # written atomically, nothing left over


def test_run_explains_with_the_patterns(nets, data, fitted, tmp_path):
    image = data / "circles" / "1.png"
    out = tmp_path / "out"
    args = ("run", image, "--model", MODEL, "--resolution", 16, "--workers", 0, "--save-relevance", "-o", out)
    result = invoke(*args, "--composite", "patternattribution", "--patterns", fitted)
    assert result.exit_code == 0, result.output
    record = (out / "manifest.jsonl").read_text().splitlines()
    assert '"composite": "patternattribution"' in record[0]
    saved = torch.from_numpy(np.load(out / "1.relevance.npy"))
    items = discover([str(image)])
    pixels = ImageDataset(items, 16, "squash", IMAGENET_MEAN, IMAGENET_STD, 10**8)[0][1][None]
    model = nets.build().eval()
    expected = Explainer(model, "patternattribution", patterns=Patterns.load(fitted))(pixels).relevance[0]
    assert torch.allclose(saved, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    audited = invoke("doctor", MODEL, "--composite", "patternnet", "--patterns", fitted, "--resolution", 16)
    assert audited.exit_code in (0, 1), audited.output  # audited (a signal need not be conserved)
    assert re.search(r"Conv2d \(conv\)\s+x2\s+patternnet", audited.output), audited.output


def test_cli_errors(nets, data, fitted, tmp_path):
    run = ("run", data / "circles" / "1.png", "--model", MODEL, "--resolution", 16, "--workers", 0)
    out = ("-o", tmp_path / "out")
    other = tmp_path / "other.pt"
    model = nets.build()
    with torch.no_grad():
        model[0].weight.add_(0.01)
    torch.save(model.state_dict(), other)
    cases = [
        ((*run, *out, "--composite", "patternnet"), "composite 'patternnet' needs --patterns FILE"),
        ((*run, *out, "--composite", "patternnet", "--patterns", tmp_path / "nothing.pt"), "no such file"),
        (
            (*run, *out, "--composite", "patternnet", "--patterns", data / "squares" / "0.png"),
            "cannot be used",
        ),
        (
            (*run, *out, "--patterns", fitted),
            "is used only by the composites patternnet and patternattribution",
        ),
        (
            (*run, *out, "--composite", "patternnet", "--patterns", fitted, "--weights", other),
            f"patterns file {fitted} was fitted for other weights (model {MODEL}, weights "
            f"{Patterns.load(fitted).weights_hash}) than model '{MODEL}' has now (weights {state_hash(model)})",
        ),
        (("doctor", MODEL, "--composite", "patternattribution"), "needs --patterns FILE"),
        (("patterns", "fit", tmp_path, "--model", MODEL, "-o", tmp_path / "p.pt"), "holds no image files"),
        (("patterns", "fit", data, "--model", MODEL, "-o", tmp_path), "is a folder"),
        (("patterns", "fit", data, "--model", MODEL, "--limit", 0), "expected a number of images >= 1"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
    assert not list((tmp_path / "out").iterdir()) and not (tmp_path / "p.pt").exists()  # nothing written
    config = tmp_path / "bad.yaml"
    config.write_text("patterns: 5\n")
    with pytest.raises(ConfigError, match="key 'patterns' = 5 is invalid; expected null or a file path"):
        load_config(config)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_fit_shows_progress_on_a_terminal_and_takes_a_limit(nets, data, tmp_path):
    from lrp_cli.patterns import fit_file

    config = load_config(None, {"model": MODEL, "resolution": 16, "workers": 0, "batch_size": 2})
    err = _Terminal()
    first = discover([str(data)])[:3]
    code = fit_file(config, str(data), tmp_path / "p.pt", limit=3, err=err)
    readable = [item for item in first if item.path.name != "broken.png"]
    assert code == (1 if len(readable) < 3 else 0)
    assert Patterns.load(tmp_path / "p.pt").images == len(readable)
    shown = err.getvalue()
    assert "fitting patterns" in shown and "3/3" in shown, shown


def test_rule_overrides_win_over_the_patterns(cnn):
    model, x = cnn
    patterns = fit_patterns(model, [x[:8]])
    explainer = Explainer(model, "patternnet", patterns=patterns, rules={"linear": "epsilon"})
    assert {op.path: op.rule.name for op in explainer.program.weighted} == {
        "0": "patternnet",
        "2": "patternnet",
        "6": "epsilon",
    }
    assert explainer.composite.signed  # heatmaps drawn centred on zero
