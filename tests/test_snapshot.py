"""Snapshot regression: record/check round trip, drift detection, reports, the pytest helper."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import ROOT, SAMPLES, cli

from lrp_cli.config import ConfigError, load_config
from lrp_cli.snapshot import Tolerances, judge, metrics
from lrp_cli.testing import assert_heatmaps_match

FAST = ("--resolution", "96", "--workers", "0")
COMMITTED = ROOT / "tests" / "snapshots" / "efficientnet-lite0"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in ("cat.png", "coffee.png"):
        (folder / name).write_bytes((SAMPLES / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def recorded(photos, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("snap") / "snap"
    result = cli("snapshot", "record", str(photos), "--to", str(target), *FAST)
    assert result.returncode == 0, result.stderr
    return target


def test_record_is_deterministic_and_complete(photos, recorded, tmp_path):
    again = tmp_path / "again"
    assert cli("snapshot", "record", str(photos), "--to", str(again), *FAST).returncode == 0
    files = sorted(p.name for p in recorded.iterdir())
    assert files == ["cat.relevance.npy.gz", "coffee.relevance.npy.gz", "snapshot.json"]
    for name in files:
        assert (recorded / name).read_bytes() == (again / name).read_bytes(), name
    meta = json.loads((recorded / "snapshot.json").read_text())
    committed = json.loads((COMMITTED / "snapshot.json").read_text())
    assert meta["model"] == "efficientnet-lite0"
    assert meta["weights_sha256"] == committed["weights_sha256"]  # the embedded weights' known hash
    assert meta["settings"]["resolution"] == 96 and meta["settings"]["composite"] == "epsilon-plus-flat"
    assert {"torch", "lrp-heatmap", "numpy"} <= set(meta["versions"])
    assert set(meta["images"]) == {"cat", "coffee"}
    for name in ("cat", "coffee"):  # each input file's SHA-256, computed here from its bytes
        assert (
            meta["images"][name]["sha256"]
            == hashlib.sha256((photos / f"{name}.png").read_bytes()).hexdigest()
        )
        assert meta["images"][name]["sha256"] == committed["images"][name]["sha256"]


def test_check_passes_on_the_recording(photos, recorded, tmp_path):
    junit = tmp_path / "report.xml"
    result = cli(
        "snapshot", "check", str(photos), "--against", str(recorded), *FAST, "--json", "--junit", str(junit)
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["passed"] and all(image["pearson"] > 0.999 for image in document["images"])
    for image in document["images"]:  # recomputed on the same machine: equal up to float16 storage
        assert image["pearson"] >= 0.99999 and image["iou"] == 1.0, image
        assert image["max_diff"] <= 1e-3 and image["mean_diff"] <= 1e-4, image
    assert "2 passed, 0 failed" in result.stderr
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "0"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--composite", "seed"), "setting 'composite' changed: recorded 'epsilon-plus-flat', now 'seed'"),
        (("--topk", "0.05"), "setting 'topk' changed: recorded 1.0, now 0.05"),
    ],
)
def test_changed_settings_are_reported_as_such(photos, recorded, tmp_path, change, message):
    junit = tmp_path / "report.xml"
    result = cli(
        "snapshot",
        "check",
        str(photos),
        "--against",
        str(recorded),
        *FAST,
        *change,
        "-o",
        str(tmp_path),
        "--junit",
        str(junit),
    )
    assert result.returncode == 1
    assert f"CHANGED: {message}" in result.stderr
    failures = ElementTree.parse(junit).getroot().findall(".//failure")
    assert any(message in (f.get("message") or "") for f in failures)


def test_perturbed_weights_and_modified_image_fail(photos, recorded, tmp_path):
    # a perturbed layer: a custom model whose factory scales one conv of the embedded network
    factory = tmp_path / "perturbed_model.py"
    factory.write_text(
        "import torch\n"
        "from lrp_cli.models import embedded_lite0\n"
        "def build():\n"
        "    model = embedded_lite0(None).module\n"
        "    with torch.no_grad():\n"
        "        model.blocks[3][0].conv_pwl.weight.mul_(-1.0)\n"
        "    return model\n"
    )
    env = {"PYTHONPATH": str(tmp_path)}
    meta = json.loads((recorded / "snapshot.json").read_text())
    meta["model"] = "perturbed_model:build"  # same recording, claimed for the custom model
    spoofed = tmp_path / "spoofed"
    spoofed.mkdir()
    for path in recorded.iterdir():
        (spoofed / path.name).write_bytes(path.read_bytes())
    (spoofed / "snapshot.json").write_text(json.dumps(meta))
    result = cli(
        "snapshot",
        "check",
        str(photos),
        "--against",
        str(spoofed),
        *FAST,
        "--model",
        "perturbed_model:build",
        "-o",
        str(tmp_path / "out"),
        env=env,
    )
    assert result.returncode == 1
    assert "weights changed" in result.stderr
    assert "FAIL (drift" in result.stderr  # and the heatmaps themselves moved beyond the tolerances
    assert (tmp_path / "out" / "snapshot-diff" / "cat.diff.png").exists()

    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("cat.png", "coffee.png"):
        (edited / name).write_bytes((photos / name).read_bytes())
    image = np.asarray(Image.open(edited / "cat.png").convert("RGB")).copy()
    image[:, : image.shape[1] // 2] = 0  # black out half the cat
    Image.fromarray(image).save(edited / "cat.png")
    result = cli(
        "snapshot", "check", str(edited), "--against", str(recorded), *FAST, "-o", str(tmp_path / "o2")
    )
    assert result.returncode == 1
    assert "input file changed since recording" in result.stderr
    assert "coffee" in result.stderr and "1 passed, 1 failed" in result.stderr


def test_added_and_missing_images_are_listed(photos, recorded, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "cat.png").write_bytes((photos / "cat.png").read_bytes())
    (folder / "rocket.jpg").write_bytes((SAMPLES / "rocket.jpg").read_bytes())
    result = cli("snapshot", "check", str(folder), "--against", str(recorded), *FAST, "--json")
    assert result.returncode == 1
    statuses = {image["name"]: image["status"] for image in json.loads(result.stdout)["images"]}
    assert statuses == {"cat": "pass", "rocket": "added", "coffee": "missing"}


def test_corrupt_snapshots_are_a_clear_usage_error(photos, recorded, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "snapshot.json").write_text("{not json")
    result = cli("snapshot", "check", str(photos), "--against", str(broken), *FAST)
    assert result.returncode == 2 and "corrupt snapshot metadata" in result.stderr
    for path in recorded.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "cat.relevance.npy.gz").write_bytes(b"garbage")
    result = cli("snapshot", "check", str(photos), "--against", str(broken), *FAST)
    assert result.returncode == 2 and "cat.relevance.npy.gz: corrupt snapshot file" in result.stderr
    result = cli("snapshot", "check", str(photos), "--against", str(tmp_path / "none"), *FAST)
    assert result.returncode == 2 and "no snapshot.json" in result.stderr


def test_tolerances_pass_float_noise_and_fail_real_changes():
    """Default tolerances: noise of float32-vs-float64 size passes; a different rule or top-k fails."""
    from lrp_cli.lrp import explain
    from lrp_cli.models import load_model

    model = load_model("efficientnet-lite0").module
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    base = explain(model, x, composite="epsilon-plus-flat")[0].sum(0).numpy()
    precise = explain(model.double(), x.double(), composite="epsilon-plus-flat")[0].sum(0).float().numpy()
    model.float()
    tolerances = Tolerances()
    assert judge("noise", metrics(base, precise, 0.05), tolerances).status == "pass"
    for composite, topk in [("epsilon-alpha2-beta1-flat", 1.0), ("epsilon-plus-flat", 0.05)]:
        other = explain(model, x, composite=composite, topk=topk)[0].sum(0).numpy()
        assert judge("changed", metrics(base, other, 0.05), tolerances).status == "drift", composite


def test_pytest_helper(photos, recorded):
    assert_heatmaps_match([photos], recorded, resolution=96, workers=0)
    with pytest.raises(AssertionError, match="setting 'topk' changed"):
        assert_heatmaps_match([photos], recorded, resolution=96, workers=0, topk=0.5)


def test_project_heatmaps_match_committed_snapshot(tmp_path):
    """The embedded model on input/ against tests/snapshots: an engine change that alters heatmaps fails here."""
    result = cli(
        "snapshot",
        "check",
        str(SAMPLES),
        "--against",
        str(COMMITTED),
        "-o",
        str(tmp_path),
        "--junit",
        str(tmp_path / "junit.xml"),
    )
    assert result.returncode == 0, result.stderr


def test_snapshot_tolerance_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("snapshot: {min_pearsn: 0.9}\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'snapshot.min_pearsn' \(did you mean 'min_pearson'\?\)"
    ):
        load_config(bad)
