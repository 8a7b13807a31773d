"""torchvision's ViT-B/16 against LXT, the AttnLRP authors' library, on the same rules (CP-LRP).

LXT computes LRP as gradient x input with patched modules: the layer norm's scale held constant, GELU
by the identity rule, queries and keys detached (attention weights constant), and plain gradients
(LRP-0) through linear layers. Our `cp-lrp` preset with epsilon 1e-12 everywhere is the same rule set.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from lrp_cli.lrp import attribute

pytest.importorskip("lxt", reason="LXT is a test dependency (pip install -e '.[test]')")

REFERENCE = Path(__file__).parent / "references" / "lxt_vit.py"
TINY = {"conv": {"rule": "epsilon", "epsilon": 1e-12}, "linear": {"rule": "epsilon", "epsilon": 1e-12}}


def test_vit_b_16_cp_lrp_agrees_with_lxt(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=64)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision's head starts all zeros
    torch.save(model.state_dict(), tmp_path / "state.pt")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    model = model.double().eval()
    with torch.no_grad():
        logits = model(x)
    targets = logits.argmax(dim=1)
    torch.save(targets, tmp_path / "targets.pt")
    files = [str(tmp_path / name) for name in ("state.pt", "x.pt", "targets.pt", "lxt.pt")]
    done = subprocess.run(
        [sys.executable, str(REFERENCE), *files], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reference = torch.load(tmp_path / "lxt.pt")
    torch.testing.assert_close(reference["logits"], logits)

    # LXT's gradient x input starts from the logit itself; ours from the given start relevance
    start = torch.zeros_like(logits).scatter_(1, targets[:, None], logits.gather(1, targets[:, None]))
    composite_rules = {**TINY, "stabilizer": 1e-12}
    from lrp_cli.lrp import get_composite

    composite = get_composite("cp-lrp").with_overrides(composite_rules)
    ours = attribute(model, x, composite=composite, target=start).relevance
    error = (ours - reference["relevance"]).abs().max() / reference["relevance"].abs().max()
    # measured 3.2e-7 (float64; the residue is our 1e-12 stabilisers): 1e-5 leaves a 30x margin
    assert error < 1e-5, f"max deviation {error:.2e} of the largest relevance"
    assert ours.abs().sum() > 0
