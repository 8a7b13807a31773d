"""`lrp-heatmap train` on generated coloured shapes (32x32, three classes): learning in fp32 and bf16,
exact resume, checkpoints explained with their class names, DDP on two gloo processes, and each way the
data or the settings can be refused.

Accuracy is measured by the test itself on a fresh set of shapes, with its own preprocessing and a
model it rebuilds from the checkpoint's weights; the DDP run is compared with one process taking the
same global batches. Torch runs on one thread here: tiny convolutions on a shared, loaded machine are
several times faster so than with a thread pool that spins waiting for its peers.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lrp_cli.cli import app
from lrp_cli.config import load_config
from lrp_cli.models import load_model
from lrp_cli.training.folders import find_split
from lrp_cli.training.loop import train
from lrp_cli.training.shapes import CLASSES, tiny_cnn, write_shapes

TINY = "lrp_cli.training.shapes:tiny_cnn"
FAST = {"crop_scale": 1.0, "jitter": 0.0, "lr": 0.005, "batch_size": 16, "schedule": "constant"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), per_class=40, seed=0)


@pytest.fixture(scope="module")
def unseen(tmp_path_factory) -> Path:
    """Shapes the training never saw (another seed)."""
    return write_shapes(tmp_path_factory.mktemp("unseen"), per_class=20, seed=1)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """``train_nets``: a CNN with dropout (the model's own random draws) and one without batch norms."""
    folder = tmp_path_factory.mktemp("nets")
    (folder / "train_nets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def dropout_cnn():
                return nn.Sequential(
                    nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                    nn.Dropout(0.3), nn.Linear(16, 3),
                )

            def plain_cnn():
                return nn.Sequential(
                    nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(512, 3)
                )
            """
        )
    )
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def settings(out: Path, model: str = TINY, **train_keys):
    return load_config(
        None, {"model": model, "resolution": 32, "workers": 0, "train": {"output": str(out), **train_keys}}
    )


def invoke(*args: object, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rebuilt(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """The tiny CNN with the checkpoint's weights, built here: the factory's layers, a 3-way head."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = tiny_cnn()
    model[-1] = torch.nn.Linear(32, len(content["classes"]))
    model.load_state_dict(content["state_dict"])
    return model.eval(), content


def pixels(path: Path, mean, std) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_beats_chance_on_unseen_shapes(shapes, unseen, tmp_path, precision):
    out = tmp_path / "run"
    assert train(settings(out, epochs=8, precision=precision, **FAST), shapes, quiet=True) == 0
    history = metrics(out)
    assert [record["epoch"] for record in history] == list(range(1, 9))
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.3
    model, content = rebuilt(out / "best.pt")
    assert content["classes"] == list(CLASSES)
    assert content["resolution"] == 32 and content["model"] == TINY
    best = max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert content["epoch"] == best["epoch"]
    images = sorted(unseen.glob("*/*.png"))
    batch = torch.stack([pixels(p, content["mean"], content["std"]) for p in images])
    labels = torch.tensor([CLASSES.index(p.parent.name) for p in images])
    with torch.no_grad():
        accuracy = (model(batch).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.7, f"{precision}: accuracy {accuracy:.3f} on unseen shapes (chance 0.333)"
    with Image.open(out / "curves.png") as curves:
        assert curves.format == "PNG" and curves.size == (800, 320)


def test_resume_is_bitwise_exact(shapes, nets, tmp_path):
    augmented = {**FAST, "crop_scale": 0.7, "jitter": 0.2, "schedule": "cosine", "epochs": 3}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(settings(whole, "train_nets:dropout_cnn", **augmented), shapes, quiet=True) == 0

    def stop_after_first(record: dict) -> None:
        if record["epoch"] == 1:
            raise KeyboardInterrupt  # as Ctrl-C would, once epoch 1's checkpoints are written

    interrupted = settings(parts, "train_nets:dropout_cnn", **augmented)
    messages = io.StringIO()
    assert train(interrupted, shapes, on_epoch=stop_after_first, err=messages) == 130
    assert f"interrupted; {parts / 'last.pt'} holds epoch 1: run again with --resume" in messages.getvalue()
    assert [r["epoch"] for r in metrics(parts)] == [1]
    interrupted.workers = 2  # the data order and the augmentation do not depend on the worker processes
    assert train(interrupted, shapes, resume=True, quiet=True) == 0
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(folder / name, weights_only=True) for folder in (whole, parts))
        assert a["epoch"] == b["epoch"]
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    a, b = (
        torch.load(folder / "last.pt", weights_only=True)["training"]["optimizer"]
        for folder in (whole, parts)
    )
    for index, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)
    timing = ("seconds", "images_per_second")
    strip = [[{k: v for k, v in r.items() if k not in timing} for r in metrics(f)] for f in (whole, parts)]
    assert strip[0] == strip[1] and len(strip[0]) == 3


def test_checkpoint_explained_with_class_names(shapes, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", shapes, "--model", TINY, "--resolution", 32, "--workers", 0, "--epochs", 2,
                    "-o", out, "--set", "train.crop_scale=1", "--lr", 0.005, "--batch-size", 16)  # fmt: skip
    assert "3 classes (circle, square, triangle): 96 training and 24 validation images" in result.output
    assert [r["epoch"] for r in metrics(out)] == [1, 2]
    images = [shapes / kind / "0000.png" for kind in CLASSES]
    explained = tmp_path / "explained"
    invoke("run", *images, "--weights", out / "best.pt", "-o", explained, "--workers", 0)
    records = [json.loads(line) for line in (explained / "manifest.jsonl").read_text().splitlines()]
    model, content = rebuilt(out / "best.pt")
    with torch.no_grad():
        logits = model(torch.stack([pixels(p, content["mean"], content["std"]) for p in images]))
    assert [r["predicted_label"] for r in records] == [CLASSES[i] for i in logits.argmax(1).tolist()]
    assert all(r["label"] in CLASSES and r["error"] is None for r in records)
    assert (explained / "circle" / "0000.heatmap.png").is_file()
    invoke(
        "snapshot",
        "record",
        images[0],
        "--weights",
        out / "best.pt",
        "--to",
        tmp_path / "snap",
        "--workers",
        0,
    )
    recorded = json.loads((tmp_path / "snap" / "snapshot.json").read_text())
    assert recorded["model"] == TINY and recorded["settings"]["resolution"] == 32
    again = invoke("train", shapes, "--model", TINY, "-o", out, code=2)  # a run is already there
    assert "already holds a training run" in again.output and "--resume" in again.output
    done = invoke("train", shapes, "--model", TINY, "--resolution", 32, "--workers", 0, "--epochs", 2,
                  "-o", out, "--set", "train.crop_scale=1", "--lr", 0.005, "--batch-size", 16, "--resume")  # fmt: skip
    assert "has finished all 2 epochs" in done.output
    wrong = invoke(
        "run", images[0], "--weights", out / "best.pt", "--model", "resnet18", "-o", tmp_path / "x", code=2
    )
    assert f"was trained from model {TINY!r}, not 'resnet18'" in wrong.output


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank(rank: int, port: int, config, data: Path) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )  # fmt: skip
    torch.set_num_threads(1)
    code = train(config, data, quiet=True)
    if code:
        raise SystemExit(code)


def test_ddp_on_two_gloo_processes_matches_one_process(shapes, nets, tmp_path):
    import torch.multiprocessing as mp

    keys = {**FAST, "epochs": 2, "batch_size": 24, "flip": True}
    single, double = tmp_path / "single", tmp_path / "double"
    assert train(settings(single, "train_nets:plain_cnn", **keys), shapes, quiet=True) == 0
    config = settings(double, "train_nets:plain_cnn", **keys)
    config.device = "cpu"
    mp.start_processes(_rank, args=(_free_port(), config, shapes), nprocs=2, start_method="fork")
    a, b = (torch.load(folder / "last.pt", weights_only=True)["state_dict"] for folder in (single, double))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    one, two = metrics(single), metrics(double)
    assert [r["val_accuracy"] for r in one] == [r["val_accuracy"] for r in two]
    for x, y in zip(one, two):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


def _folders(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (32, 32), (index * 40 % 256, 0, 0)).save(root / name / f"{index}.png")
    return root


def test_frozen_backbone_fine_tunes_only_the_new_head(shapes, tmp_path):
    out = tmp_path / "run"
    config = settings(out, "efficientnet-lite0", epochs=1, freeze_backbone=True, **FAST)
    assert train(config, shapes, quiet=True) == 0
    content = torch.load(out / "best.pt", weights_only=True)
    assert content["head"] == "classifier" and content["mean"] == [0.5, 0.5, 0.5]
    published = load_model("efficientnet-lite0").module.state_dict()
    trained = content["state_dict"]
    assert trained.keys() == published.keys()
    assert trained["classifier.weight"].shape == (3, 1280)
    for key, value in published.items():  # weights and batch-norm statistics alike
        if not key.startswith("classifier."):
            assert torch.equal(trained[key], value), key


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_no_validation(shapes, tmp_path):
    terminal, pipe = Terminal(), io.StringIO()
    assert train(settings(tmp_path / "a", epochs=1, **FAST), shapes, err=terminal) == 0
    assert train(settings(tmp_path / "b", epochs=1, val_fraction=0.0, **FAST), shapes, err=pipe) == 0
    assert "\repoch 1/1:   0%|          | 0/6 [" in terminal.getvalue()  # 96 images, 16 a batch
    assert "loss=" in terminal.getvalue() and "acc=" in terminal.getvalue()
    assert "\r" not in pipe.getvalue() and "epoch 1/1: train loss" in pipe.getvalue()
    assert "120 training and 0 validation images (validation: none)" in pipe.getvalue()
    assert metrics(tmp_path / "b")[0]["val_accuracy"] is None and (tmp_path / "b" / "best.pt").is_file()


def test_train_and_val_folders_give_the_split(tmp_path):
    root = _folders(tmp_path / "data", {"train/a": 3, "train/b": 2, "val/a": 1, "val/b": 2})
    (root / "train" / "runs" / "x").mkdir(parents=True)  # the output folder, inside: never a class
    split = find_split(root, 0.5, 0, 10**8, 0, exclude=root / "train" / "runs")
    assert split.classes == ["a", "b"]
    assert split.train == [(root / "train" / "a" / f"{i}.png", 0) for i in range(3)] + [
        (root / "train" / "b" / f"{i}.png", 1) for i in range(2)
    ]
    assert split.val == [(root / "val" / "a" / "0.png", 0)] + [
        (root / "val" / "b" / f"{i}.png", 1) for i in range(2)
    ]


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    data = _folders(tmp_path / "data", {"a": 4, "b": 4})
    _corrupt(data / "a" / "9.png")
    result = invoke("train", data, "--model", TINY, "--resolution", 32, "--workers", 0, "--epochs", 1,
                    "--val-fraction", 0.25, "-o", tmp_path / "run")  # fmt: skip
    assert f"skipped {data / 'a' / '9.png'}: not an image file PIL can read" in result.output
    assert (
        "6 training and 2 validation images" in result.output
        and "1 unreadable image(s) left out" in result.output
    )
    _corrupt(data / "b" / "0.png")
    for index in range(1, 4):
        (data / "b" / f"{index}.png").write_bytes(b"")
    refused = invoke("train", data, "--model", TINY, "-o", tmp_path / "other", code=2)
    assert f"{data / 'b'}: class 'b' holds no readable image (all 4 unreadable)" in refused.output


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"a": 3}, "{root}: found 1 class folder(s) (a); training needs at least two"),
        ({"a": 3, "b": 0}, "{root}/b: training class folder 'b' holds no image files"),
        ({"a": 3, "b": 2, "val/a": 0, "val/b": 0}, "{root}/val: the validation split is empty"),
        ({"a": 2, "b": 2, "val/a": 1}, "{root}/val: no folder for class(es) b"),
        ({"a": 1, "b": 1}, "{root}: the validation split is empty (0.2 of each class rounds to no image)"),
    ],
)
def test_data_that_cannot_be_trained_on_exits_2(tmp_path, layout, message):
    root = _folders(tmp_path / "data", layout)
    result = invoke("train", root, "--model", TINY, "-o", tmp_path / "run", code=2)
    assert message.format(root=root) in result.output
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--set", "train.lr=-1"], "key 'train.lr' = -1 is invalid; expected a value in (0.0, 10.0]"),
        (["--set", "train.epoch=3"], "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
        (
            ["--optimizer", "lamb"],
            "key 'train.optimizer' = 'lamb' is invalid; expected one of adamw, adam, sgd",
        ),
        (["--precision", "fp16", "--device", "cpu"], "'train.precision' = 'fp16' needs a CUDA device"),
        (["--resume"], "last.pt does not exist; start the run without --resume"),
    ],
)
def test_bad_settings_exit_2(shapes, tmp_path, options, message):
    result = invoke("train", shapes, "--model", TINY, "-o", tmp_path / "run", *options, code=2)
    assert message in result.output
