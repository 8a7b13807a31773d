"""`lrp-heatmap doctor` and `audit`, and timm's tiny test models of every family through the engine."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from typer.testing import CliRunner

from lrp_cli.cli import app
from lrp_cli.lrp import attribute, audit

runner = CliRunner()

TIMM_TEST_MODELS = sorted(timm.list_models("test_*"))


@pytest.mark.parametrize("name", TIMM_TEST_MODELS)
def test_timm_test_models_explain_and_reproduce_logits(name):
    """timm's own miniature of each family (ViT variants, ConvNeXt, CoAtNet, MaxViT, NFNet, ...)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(2, 3, size, size)
    result = attribute(model, x)
    with torch.no_grad():
        reference = model(x)
    scale = reference.abs().max().item()
    torch.testing.assert_close(result.logits, reference, rtol=1e-4, atol=1e-4 * scale)
    assert torch.isfinite(result.relevance).all()


def test_doctor_lists_rules_and_accounts_for_relevance_on_a_vit():
    done = runner.invoke(app, ["doctor", "timm:test_vit", "--weights", "none"])
    assert done.exit_code == 0, done.output
    assert "composite attnlrp" in done.output
    assert "AttnLRP softmax" in done.output and "layer_norm" in done.output
    assert "softmax rule (not conservative)" in done.output
    assert done.output.rstrip().endswith("OK")


def test_doctor_json_and_cp_lrp_conserves_more():
    done = runner.invoke(
        app, ["doctor", "timm:test_vit", "--weights", "none", "--json", "--composite", "cp-lrp"]
    )
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["ok"] is True and report["composite"] == "cp-lrp" and report["unsupported"] == []
    operations = {entry["operation"] for entry in report["operations"]}
    assert {"softmax", "matmul", "layer_norm", "Linear (linear)"} <= operations
    # attention weights are constants under CP-LRP: no softmax step hands on relevance
    assert not any(layer["operation"] == "softmax" for layer in report["layers"])


def test_doctor_names_every_unsupported_operation_and_exits_1(tmp_path, monkeypatch):
    (tmp_path / "odd_model.py").write_text(
        "import torch\n"
        "class Odd(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(12, 3)\n"
        "    def forward(self, x):\n"
        "        x = torch.cumsum(x, 1) + torch.cumprod(x, 1)\n"
        "        return self.fc(x.mean((2, 3)).repeat(1, 4))\n"
        "def build():\n"
        "    return Odd()\n"
    )
    monkeypatch.chdir(tmp_path)
    done = runner.invoke(app, ["doctor", "odd_model:build", "--resolution", "16"])
    assert done.exit_code == 1, done.output
    assert "no rule for 2 operation(s)" in done.output
    assert "cumsum" in done.output and "cumprod" in done.output
    assert "NOT OK: unsupported operations" in done.output


def test_audit_attributes_bias_and_z_plus_on_signed_inputs():
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)
    ).eval()
    report = audit(model, torch.randn(1, 3, 8, 8), composite="zplus")
    causes = {layer.path: layer.cause for layer in report.layers}
    assert causes["1"] == "z+/alpha-beta on a signed input (cannot conserve)"  # after a conv, no ReLU
    assert causes["3"] == "z+/alpha-beta on a signed input (cannot conserve)"
    assert report.ok
