"""``lrp-heatmap evaluate`` and the region-perturbation metric behind it, against Quantus 0.6."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy import stats
from torch import nn
from typer.testing import CliRunner

from lrp_cli.cli import app
from lrp_cli.evaluate import expand_settings, join_curves, parse_renormalize, parse_topks
from lrp_cli.faithfulness import RegionPerturbation, patch_order, region_perturbation
from lrp_cli.lrp import explain

quantus = pytest.importorskip("quantus")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10),
    ).eval()  # fmt: skip


def quantus_curves(model: nn.Module, x: torch.Tensor, maps: np.ndarray, y: np.ndarray, order: str, **options):
    metric = quantus.RegionPerturbation(order=order, disable_warnings=True, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=maps[:, None], device="cpu")
    return np.array(scores)


@pytest.mark.parametrize(("size", "baseline"), [(64, "black"), (60, "black"), (64, "white")])  # 60: padded
def test_curves_equal_quantus(model: nn.Module, size: int, baseline: str) -> None:
    """Same images, maps and settings: both orders' curves equal Quantus' RegionPerturbation to 1e-5,
    for random maps, a map with tied patches, and LRP maps of two composites."""
    torch.manual_seed(size)
    x = torch.randn(3, 3, size, size)
    y = model(x).argmax(dim=1).numpy()
    tied = np.random.default_rng(1).normal(size=(3, size, size))
    tied[:, :, : size // 2] = 0.0  # half the patches tie at 0: argsort's tie order must match too
    lrp = [
        explain(model, x, composite=c, target=torch.as_tensor(y)).sum(1).numpy() for c in ("epsilon", "zplus")
    ]
    maps = np.stack([tied, *lrp]).astype(np.float32)
    settings = RegionPerturbation(patch_size=8, regions=20, baseline=baseline)
    ours = region_perturbation(model, x, maps, y, settings, batch_size=100)
    theirs = {}
    for order in ("morf", "lerf"):
        for index, attribution in enumerate(maps):
            options = {"patch_size": 8, "regions_evaluation": 20, "perturb_baseline": baseline}
            theirs[order, index] = quantus_curves(model, x, attribution, y, order, **options)
            assert theirs[order, index].shape == (3, 20)
            np.testing.assert_allclose(ours.drops[order][index], theirs[order, index], rtol=0, atol=1e-5)
    abpc = (theirs["morf", 0].sum(1) - theirs["lerf", 0].sum(1)) / 21  # AOPC over steps 0..20, step 0 zero
    np.testing.assert_allclose(ours.abpc()[0], abpc, atol=1e-6)


def test_fewer_patches_than_regions(model: nn.Module) -> None:
    """A 16x16 image has 4 patches of 8: both stop after 4 steps, and after all 4 MoRF and LeRF meet."""
    x = torch.randn(2, 3, 16, 16)
    y = model(x).argmax(dim=1).numpy()
    maps = np.random.default_rng(3).normal(size=(2, 16, 16)).astype(np.float32)
    ours = region_perturbation(model, x, maps, y)
    for order in ("morf", "lerf"):
        expected = quantus_curves(model, x, maps, y, order)
        np.testing.assert_allclose(ours.drops[order][0], expected, atol=1e-5)
    np.testing.assert_allclose(ours.drops["morf"][0, :, -1], ours.drops["lerf"][0, :, -1])


def test_batched_and_shared(model: nn.Module) -> None:
    """Hundreds of perturbed images per forward; results do not depend on the batch size; an image that
    two maps reach with the same removed patches is scored once."""
    x = torch.randn(4, 3, 48, 48)
    y = model(x).argmax(dim=1).numpy()
    maps = np.random.default_rng(4).normal(size=(4, 48, 48))
    sizes: list[int] = []
    handle = model.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    try:
        big = region_perturbation(model, x, maps, y, RegionPerturbation(regions=30), batch_size=200)
    finally:
        handle.remove()
    assert sizes == [4, 200, 40]  # originals, then 4 images x 2 orders x 30 steps in two forwards
    small = region_perturbation(model, x, maps, y, RegionPerturbation(regions=30), batch_size=7)
    np.testing.assert_allclose(small.drops["morf"], big.drops["morf"], atol=1e-6)
    twice = region_perturbation(
        model, x, np.stack([maps, maps * 3.0]), y, RegionPerturbation(regions=30), batch_size=200
    )
    assert twice.forwards == big.forwards == 4 + 240
    np.testing.assert_array_equal(twice.drops["lerf"][0], twice.drops["lerf"][1])
    halves = [region_perturbation(model, x[i : i + 2], maps[i : i + 2], y[i : i + 2], RegionPerturbation(regions=30))
              for i in (0, 2)]  # fmt: skip
    joined = join_curves(halves)  # the command scores images in chunks
    np.testing.assert_allclose(joined.drops["morf"], big.drops["morf"], atol=1e-6)
    assert joined.forwards == big.forwards


def test_patch_order_is_numpy_argsort() -> None:
    maps = np.zeros((1, 16, 16))
    maps[0, 8:, :8] = 1.0  # patch 2 (bottom left) most relevant, the three others tied at 0
    maps[0, :8, 8:] = -1.0  # patch 1 least relevant
    assert patch_order(maps, 8, "morf")[0].tolist()[0] == 2
    assert patch_order(maps, 8, "lerf")[0].tolist()[0] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topk", "1.0,x"], "--topk '1.0,x' is invalid"),
        (["--topk", "1.0,0"], "key 'topk' = 0.0 is invalid"),
        (["--composite", "seed,nope"], "key 'composite' = 'nope' is invalid"),
        (["--renormalize", "maybe"], "--renormalize 'maybe' is invalid"),
        (["--composite", "seed,"], "--composite 'seed,' has an empty entry"),
        (["--baseline", "grey"], "--baseline 'grey' is invalid"),
        (["--composite", "seed,seed"], "repeat themselves"),
    ],
)
def test_bad_settings_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(
        app, ["evaluate", str(ROOT / "input" / "cat.png"), "-o", str(tmp_path), *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def test_settings_cross_product(tmp_path: Path) -> None:
    """Config files x composites x top-k x renormalise, in that order; renormalising without a filter
    (top-k 1) is the same map as not renormalising and is listed once."""
    other = tmp_path / "gamma.yaml"
    other.write_text(yaml.safe_dump({"rules": {"conv": {"rule": "gamma", "gamma": 0.25}}}))
    default = ROOT / "configs" / "default.yaml"
    settings = expand_settings(
        [default, other], {}, ["seed", "zplus"], parse_topks("1.0,0.05"), parse_renormalize("both")
    )
    labels = [s.label for s in settings]
    assert labels[:3] == ["default: seed", "default: seed topk 0.05", "default: seed topk 0.05 renorm"]
    assert len(labels) == 12 and labels[-1] == "gamma: zplus topk 0.05 renorm +rules"
    assert [(s.config.topk, s.config.renormalize) for s in settings[:3]] == [
        (1.0, False),
        (0.05, False),
        (0.05, True),
    ]
    assert settings[-1].config.rules == {"conv": {"rule": "gamma", "gamma": 0.25}}
    assert parse_renormalize("false,true") == [False, True] and parse_renormalize("on") == [True]


def test_configs_must_share_the_model(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"composite": "seed"}))
    second.write_text(yaml.safe_dump({"model": "resnet18"}))
    result = CliRunner().invoke(app, ["evaluate", "input/", "-c", str(first), "-c", str(second)])
    assert result.exit_code == 2
    assert "settings to compare must share 'model'" in result.output


def test_command_end_to_end(tmp_path: Path) -> None:
    """The real CLI on the embedded model (at 64 px: the size is not the point): exit 0, the table, the
    summary on stdout equal to evaluation.json and recomputed from the per-image records, and the plots."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("cat.png", "coffee.png", "rocket.jpg"):
        (photos / name).write_bytes((ROOT / "input" / name).read_bytes())
    (photos / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    env = {**os.environ, "LRP_HEATMAP_OFFLINE": "1"}
    args = ["evaluate", str(photos), "--composite", "epsilon-plus-flat,seed", "--topk", "0.05",
            "--renormalize", "true", "--regions", "6", "--resolution", "64", "--workers", "0", "-o", str(out),
            "--json"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "lrp_cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)  # fmt: skip
    assert done.returncode == 1, done.stderr  # one input could not be read: reported, the rest evaluated
    assert f"skipped {photos / 'broken.png'}" in done.stderr
    labels = ["epsilon-plus-flat topk 0.05 renorm", "seed topk 0.05 renorm", "random", "gradient x input"]
    summary = json.loads(done.stdout)
    assert summary == json.loads((out / "evaluation.json").read_text())
    assert [entry["setting"] for entry in summary["settings"]] == labels
    assert (summary["images"], summary["failed"], summary["regions"], summary["patch_size"]) == (3, 1, 6, 8)
    for label in labels:
        assert any(line.startswith(label + " ") for line in done.stderr.splitlines())
    records = [json.loads(line) for line in (out / "evaluation.jsonl").read_text().splitlines()]
    assert len(records) == len(labels) * 3
    for entry in summary["settings"]:
        rows = [r for r in records if r["setting"] == entry["setting"]]
        for row in rows:
            assert len(row["curve_morf"]) == len(row["curve_lerf"]) == 6
            assert math.isclose(
                row["abpc"], (sum(row["curve_morf"]) - sum(row["curve_lerf"])) / 7, abs_tol=1e-12
            )
        values = np.array([r["abpc"] for r in rows])
        half = values.std(ddof=1) / math.sqrt(3) * stats.t.ppf(0.975, 2)
        assert entry["abpc"]["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert entry["abpc"]["ci95"] == pytest.approx([values.mean() - half, values.mean() + half], abs=1e-12)
        mean_curve = np.mean([r["curve_morf"] for r in rows], axis=0)
        np.testing.assert_allclose(entry["curve_morf"]["mean"], mean_curve, atol=1e-12)
    assert {r["name"] for r in records} == {"cat", "coffee", "rocket"}
    with Image.open(out / "evaluation.png") as picture:
        assert picture.format == "PNG" and picture.width > 600
    assert (out / "evaluation.svg").read_text().lstrip().startswith("<?xml")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_output_folder_that_is_a_file_exits_2_before_the_model_loads(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("x")
    result = CliRunner().invoke(app, ["evaluate", str(ROOT / "input" / "cat.png"), "-o", str(target)])
    assert result.exit_code == 2
    assert f"output folder {target} is a file" in result.output
    assert target.read_text() == "x"
