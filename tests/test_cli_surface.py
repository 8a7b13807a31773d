"""The command line's surface (issue #15): every config key reachable from the command line, all
mistakes reported at once, ``config show``, clean help with examples, completion, NO_COLOR, the
manifest's timing and conservation fields, the resolution warning, ``snapshot check --update`` and
``--allow-missing``, and labelled diff images.

In-process through Typer's runner on a tiny bias-free model (conservation is then exact) wherever the
interpreter's start is not what is tested."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_cli import ROOT
from typer.main import get_command
from typer.testing import CliRunner

from lrp_cli import pipeline
from lrp_cli.cli import app
from lrp_cli.config import Config, load_config
from lrp_cli.render import colorize
from lrp_cli.runinfo import image_records, resolution_notice
from lrp_cli.snapshot import diff_image

TINY = (
    "import torch\n"
    "def build():\n"  # no biases: relevance is conserved from the start to the pixels
    "    torch.manual_seed(0)\n"
    "    return torch.nn.Sequential(\n"
    "        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),\n"
    "        torch.nn.Flatten(), torch.nn.Linear(4, 5, bias=False),\n"
    "    )\n"
)
SNAP = ("--model", "surface_net:build", "--resolution", "16", "--workers", "0")
FAST = (*SNAP, "--no-panel", "--no-report")


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("net")
    (folder / "surface_net.py").write_text(TINY)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("surface_net", None)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def photos(folder: Path, names: list[str], seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (20, 26, 3), dtype=np.uint8)).save(folder / name)
    return folder


def shown(*args: str) -> dict:
    result = invoke("config", "show", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- every key from the command line ----------------------------------------------------------------

NON_DEFAULT = {  # a valid value other than the default, for every key of the config
    "model": "resnet18", "weights": "w.pth", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4],
    "composite": "seed", "rules": {"conv": {"rule": "gamma", "gamma": 0.5}}, "topk": 0.05,
    "renormalize": True, "target": 7, "device": "cpu", "precision": "bf16", "winograd": False,
    "resolution": 96, "resize": "crop", "batch_size": 3, "workers": 0, "colormap": "viridis",
    "overlay_alpha": 0.3, "overlay_format": "png", "save_relevance": True, "output": "elsewhere",
    "max_pixels": 1000, "snapshot": {"min_pearson": 0.9},
}  # fmt: skip


def test_set_reaches_every_config_key():
    defaults = Config().to_dict()
    for key in defaults:  # keys other helpers add: any value of another type than the default's
        NON_DEFAULT.setdefault(key, _other_value(defaults[key]))
    arguments = [arg for key, value in NON_DEFAULT.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    document = shown(*arguments)
    for key, value in NON_DEFAULT.items():
        assert document[key] == {"value": value, "source": "command line"}, key


def _other_value(default):
    if isinstance(default, bool):
        return not default
    if isinstance(default, dict):
        return default
    return default


def test_dedicated_options_and_dotted_keys():
    document = shown(
        "--overlay-alpha", "0.25", "--mean", "0.1,0.2,0.3", "--std", "[0.5, 0.5, 0.5]", "--max-pixels",
        "5000", "--rules", "{first: zbox}", "--set", "rules.conv.rule=gamma", "--set",
        "rules.conv.gamma=0.75", "--set", "snapshot.min_iou=0.5", "--topk", "0.1",
    )  # fmt: skip
    assert document["overlay_alpha"]["value"] == 0.25
    assert document["mean"]["value"] == [0.1, 0.2, 0.3] and document["std"]["value"] == [0.5] * 3
    assert document["max_pixels"]["value"] == 5000
    # --rules replaces the key, the dotted --set entries then add to it
    assert document["rules"]["value"] == {"first": "zbox", "conv": {"rule": "gamma", "gamma": 0.75}}
    assert document["snapshot"]["value"] == {"min_iou": 0.5}
    assert document["topk"] == {"value": 0.1, "source": "command line"}


def test_set_is_validated_with_the_files_messages(tmp_path):
    for key, bad in (("topk", "1.5"), ("precision", "fp8"), ("rules", "{conv: {rule: gamma, gamma: x}}")):
        config = tmp_path / f"{key}.yaml"
        config.write_text(f"{key}: {bad}\n")
        from_file = invoke("config", "show", "--config", config)
        from_set = invoke("config", "show", "--set", f"{key}={bad}")
        assert from_file.exit_code == from_set.exit_code == 2
        file_message = from_file.stderr.strip().replace(str(config), "WHERE")
        set_message = from_set.stderr.strip().replace("command line", "WHERE")
        assert file_message == set_message and key in set_message, (file_message, set_message)
    malformed = invoke("config", "show", "--set", "topk")
    assert malformed.exit_code == 2 and "--set 'topk' is not KEY=VALUE" in malformed.stderr
    nested = invoke("config", "show", "--set", "topk.x=1")
    assert nested.exit_code == 2 and "'topk' has no sub-keys" in nested.stderr


def test_a_config_with_several_mistakes_reports_all_of_them(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("topk: 1.5\nmodle: vgg16\nbatch_size: 0\n")
    result = invoke("run", "x.png", "--config", config, "--set", "resize=stretch")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"lrp-heatmap: error: {config}: key 'topk' = 1.5 is invalid; expected a value in (0.0, 1.0]",
        f"lrp-heatmap: error: {config}: unknown key 'modle' (did you mean 'model'?)",
        f"lrp-heatmap: error: {config}: key 'batch_size' = 0 is invalid; expected a value in [1, 4096]",
        "lrp-heatmap: error: command line: key 'resize' = 'stretch' is invalid; expected one of squash, crop",
    ]


def test_config_show_names_each_source_and_is_itself_a_config(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("topk: 0.2\ncomposite: seed\n")
    result = invoke("config", "show", "--config", config, "--topk", "0.3", "--set", "rules.first=flat")
    assert result.exit_code == 0, result.output
    sources = dict(re.findall(r"^(\w+):.*#\s(.+)$", result.stdout, re.M))
    assert sources["topk"] == "command line" and sources["rules"] == "command line"
    assert sources["composite"] == f"file {config}"
    assert sources["model"] == "default"
    assert set(sources) == {f.name for f in fields(Config)}
    written = tmp_path / "shown.yaml"
    written.write_text(result.stdout)
    assert load_config(written) == load_config(config, {"topk": 0.3, "rules": {"first": "flat"}})
    assert yaml.safe_load(result.stdout)["topk"] == 0.3


# --- help, completion, colour --------------------------------------------------------------------------


def leaf_commands() -> list[list[str]]:
    found = []

    def walk(group, prefix):
        for name, command in getattr(group, "commands", {}).items():
            if getattr(command, "commands", None):
                walk(command, [*prefix, name])
            else:
                found.append([*prefix, name])

    walk(get_command(app), [])
    return found


def test_help_is_clean_and_ends_with_examples():
    everything = [[], *leaf_commands()]
    assert ["run"] in everything and ["snapshot", "check"] in everything and ["config", "show"] in everything
    for command in everything:
        text = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).stdout  # no wrapping
        assert not re.search(r"<(bool|int|float|str|path|list)|\{\w+\}", text), (command, text)
        if not command:
            continue
        tail = text.rstrip().rsplit("Examples:", 1)
        assert len(tail) == 2, f"{command}: no examples at the end of its help"
        examples = [line.strip() for line in tail[1].splitlines() if line.strip()]
        assert 1 <= len(examples) <= 3 and all("lrp-heatmap " in line for line in examples), (
            command,
            examples,
        )


def test_options_are_listed_only_where_they_act():
    def options(*command: str) -> set[str]:
        return set(re.findall(r"(--[a-z][a-z-]+)", invoke(*command, "--help").stdout))

    run = options("run")
    assert {"--overlay-alpha", "--mean", "--std", "--max-pixels", "--rules", "--set", "--colormap"} <= run
    for snapshot in (options("snapshot", "record"), options("snapshot", "check")):
        assert not {"--colormap", "--overlay-format", "--overlay-alpha", "--save-relevance"} & snapshot
        assert {"--topk", "--composite", "--resolution", "--set"} <= snapshot
    doctor = options("doctor")
    assert not {"--batch-size", "--workers", "--output", "--colormap", "--device"} & doctor
    assert {"--composite", "--resolution", "--rules", "--weights"} <= doctor


def cli_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lrp_cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_shell_completion_script_and_answers():
    script = cli_process("--show-completion", "bash")
    assert script.returncode == 0 and "_LRP_HEATMAP_COMPLETE" in script.stdout
    asked = {"_LRP_HEATMAP_COMPLETE": "complete_bash", "COMP_WORDS": "lrp-heatmap sn", "COMP_CWORD": "1"}
    assert cli_process(env=asked).stdout.split() == ["snapshot"]
    options = {**asked, "COMP_WORDS": "lrp-heatmap run --overlay-a", "COMP_CWORD": "2"}
    assert cli_process(env=options).stdout.split() == ["--overlay-alpha"]


COLOUR = re.compile(r"\x1b\[[0-9;]*(3[0-7]|9[0-7]|38;)[0-9;]*m")


def test_no_color_is_respected():
    coloured = cli_process("run", "--help", env={"FORCE_COLOR": "1", "TERM": "xterm-256color"})
    assert COLOUR.search(coloured.stdout)  # the check below could fail
    plain = cli_process("run", "--help", env={"FORCE_COLOR": "1", "TERM": "xterm-256color", "NO_COLOR": "1"})
    assert plain.returncode == 0 and "--overlay-alpha" in re.sub(r"\x1b\[[0-9;]*m", "", plain.stdout)
    assert not COLOUR.search(plain.stdout)
    error = cli_process("run", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert error.returncode == 2 and not COLOUR.search(error.stderr)


# --- the manifest: steady ms, set-up once, start_sum next to relevance_sum ------------------------------


def test_records_time_steady_images_and_the_summary_reports_the_set_up(net, tmp_path, monkeypatch):
    folder = photos(tmp_path / "in", [f"p{i}.png" for i in range(6)])
    calls: list[int] = []
    explain = pipeline.Explainer.__call__

    def first_shape_is_slow(self, inputs, target=None):  # as kernel selection is, once per batch shape
        if len(inputs) not in calls:
            time.sleep(1.6)
        calls.append(len(inputs))
        return explain(self, inputs, target)

    monkeypatch.setattr(pipeline.Explainer, "__call__", first_shape_is_slow)
    out = tmp_path / "out"
    result = invoke("run", folder, "-o", out, "-b", "2", "--json", *FAST)
    assert result.exit_code == 0, result.output
    # the trial batch at the first batch's size, then 2 + 2 + 2 images (a last, smaller batch would pay
    # its own shape's one-off cost: the README says so)
    assert calls == [2, 2, 2, 2]
    *records, last = [json.loads(line) for line in result.stdout.splitlines()]
    assert image_records(result.stdout.splitlines()) == records and len(records) == 6
    assert list(last) == ["summary"] and "path" not in last["summary"]
    assert last["summary"]["explained"] == 6 and last["summary"]["failed"] == 0
    assert last["summary"]["setup_ms"] >= 1600  # the first-shape delay of the batch size
    assert last["summary"]["manifest"] == str(out / "manifest.jsonl")
    # without the warm-up the first batch's two images would take 800 ms each
    assert all(record["ms"] < 600 for record in records), [r["ms"] for r in records]
    on_disk = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["name"] for r in on_disk] == [f"p{i}" for i in range(6)]  # no summary in the manifest
    for record in records:  # bias-free net and epsilon rules: everything that starts reaches the pixels
        assert record["start_sum"] == pytest.approx(1.0)
        assert record["relevance_sum"] == pytest.approx(record["start_sum"], rel=1e-3)
    quiet_out = tmp_path / "plain"
    summary = invoke("run", folder, "-o", quiet_out, "-b", "2", *FAST).stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"lrp-heatmap: 6 explained, 0 failed; set-up \d+\.\d s \(model, tracing, warm-up\); manifest "
        rf"{re.escape(str(quiet_out / 'manifest.jsonl'))}",
        summary,
    ), summary


def test_embedded_model_softmax_start_biases_and_resolution_warning(tmp_path):
    folder = photos(tmp_path / "in", ["a.png"])
    result = invoke("run", folder, "-o", tmp_path / "out", "--json", "--workers", "0", "--resolution", "32",
                    "--composite", "seed", "--no-panel", "--no-report")  # fmt: skip
    assert result.exit_code == 0, result.output
    (record,) = image_records(result.stdout.splitlines())
    assert record["target"] == "softmax" and record["start_sum"] == pytest.approx(1.0, abs=1e-6)
    # the embedded model's (folded) biases take most of it: relevance_sum is a small share of start_sum
    assert 0 < abs(record["relevance_sum"]) < 0.5 * record["start_sum"]
    assert "weights of efficientnet-lite0 were trained at 224x224; at --resolution 32" in result.stderr


def test_a_resolution_the_weights_were_not_trained_at_is_warned_about():
    err = io.StringIO()
    resolution_notice(Config(resolution=384), (224, 224), "efficientnet-lite0", err)
    assert err.getvalue() == (
        "lrp-heatmap: warning: the weights of efficientnet-lite0 were trained at 224x224; at --resolution 384 "
        "its predictions may change (leave resolution unset to use 224)\n"
    )
    for quiet in (Config(), Config(resolution=224), Config(resolution=384, weights="mine.pth")):
        err = io.StringIO()
        resolution_notice(quiet, (224, 224), "efficientnet-lite0", err)
        assert err.getvalue() == ""


# --- snapshots: --update, missing images, diff images -------------------------------------------------


def test_update_rewrites_only_drifted_and_added_entries(net, tmp_path):
    folder = photos(tmp_path / "in", ["a.png", "b.png"])
    snap = tmp_path / "snap"
    assert invoke("snapshot", "record", folder, "--to", snap, *SNAP).exit_code == 0
    before = {path.name: path.read_bytes() for path in snap.iterdir()}
    photos(tmp_path / "other", ["a.png"], seed=1)  # a's pixels change: its map drifts
    (folder / "a.png").write_bytes((tmp_path / "other" / "a.png").read_bytes())
    photos(tmp_path / "more", ["c.png"], seed=2)
    (folder / "c.png").write_bytes((tmp_path / "more" / "c.png").read_bytes())
    drifted = invoke("snapshot", "check", folder, "--against", snap, "-o", tmp_path / "o1", *SNAP)
    assert drifted.exit_code == 1 and "FAIL (drift: input file changed" in drifted.stderr
    assert {path.name: path.read_bytes() for path in snap.iterdir()} == before  # a check writes nothing

    updated = invoke("snapshot", "check", folder, "--against", snap, "-o", tmp_path / "o2", *SNAP, "--update")
    assert updated.exit_code == 0, updated.output
    changes = [
        line for line in updated.stderr.splitlines() if line.startswith(f"lrp-heatmap: snapshot {snap}:")
    ]
    assert [line.split(": ", 2)[2].split(" (")[0] for line in changes] == ["updated a", "added c"]
    after = {path.name: path.read_bytes() for path in snap.iterdir()}
    assert after["b.relevance.npy.gz"] == before["b.relevance.npy.gz"]  # the passing entry is untouched
    assert after["a.relevance.npy.gz"] != before["a.relevance.npy.gz"] and "c.relevance.npy.gz" in after
    assert sorted(json.loads(after["snapshot.json"])["images"]) == ["a", "b", "c"]
    again = invoke("snapshot", "check", folder, "--against", snap, "-o", tmp_path / "o3", *SNAP)
    assert again.exit_code == 0 and "3 passed, 0 failed" in again.stderr

    same = invoke("snapshot", "check", folder, "--against", snap, "-o", tmp_path / "o4", *SNAP, "--update")
    assert same.exit_code == 0 and "nothing to rewrite" in same.stderr
    assert {path.name: path.read_bytes() for path in snap.iterdir()} == after


def test_recorded_images_missing_from_the_inputs_fail_unless_allowed(net, tmp_path):
    folder = photos(tmp_path / "in", ["a.png", "b.png"])
    snap = tmp_path / "snap"
    assert invoke("snapshot", "record", folder, "--to", snap, *SNAP).exit_code == 0
    (folder / "b.png").unlink()
    strict = invoke("snapshot", "check", folder, "--against", snap, "-o", tmp_path / "o", *SNAP)
    assert strict.exit_code == 1 and "FAIL (missing" in strict.stderr
    allowed = invoke(
        "snapshot", "check", folder, "--against", snap, "-o", tmp_path / "o", *SNAP, "--allow-missing"
    )
    assert allowed.exit_code == 0, allowed.output
    assert "WARN (missing" in allowed.stderr and "1 passed, 0 failed, 1 missing (allowed)" in allowed.stderr
    pruned = invoke("snapshot", "check", folder, "--against", snap, "-o", tmp_path / "o", *SNAP, "--update")
    assert pruned.exit_code == 0 and "removed b" in pruned.stderr
    assert not (snap / "b.relevance.npy.gz").exists()
    assert sorted(json.loads((snap / "snapshot.json").read_text())["images"]) == ["a"]


def test_diff_images_are_labelled_on_one_shared_scale():
    rng = np.random.default_rng(0)
    recorded = rng.normal(size=(40, 50)).astype(np.float32)
    current = 3.0 * recorded  # the scale changed: the current map must not saturate
    picture = np.asarray(diff_image(recorded, current))
    scale = float(np.abs(current).max())
    top, gap = 14, 4
    assert picture.shape == (top + 40 + 14, 3 * 50 + 2 * gap, 3)
    panels = [picture[top : top + 40, i * (50 + gap) : i * (50 + gap) + 50] for i in range(3)]
    np.testing.assert_array_equal(panels[0], colorize(recorded / scale, signed=True))
    np.testing.assert_array_equal(panels[1], colorize(current / scale, signed=True))
    np.testing.assert_array_equal(
        panels[2], colorize((current - recorded) / scale, signed=True, colormap="PiYG")
    )
    saturated = colorize(np.array([[1.0, -1.0]]), signed=True)[0]
    assert (panels[1].reshape(-1, 3) == saturated[0]).all(axis=1).sum() <= 1  # only the maximum itself
    for i in range(3):  # a label (dark text) above each panel, and the scale below them
        strip = picture[:top, i * (50 + gap) : i * (50 + gap) + 50]
        assert (strip.min(axis=2) < 100).any(), i
    assert (picture[top + 40 :].min(axis=2) < 100).any()
