"""Model loading: timm names, weights from files and the Hugging Face cache, the pretrained config,
clear failures (offline, bad files, keys that do not fit) and factories in the current folder.

Everything runs offline on timm's tiny ``test_resnet`` (0.5 M parameters) with weights the tests write.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import ImageNetInfo
from typer.testing import CliRunner, Result

from lrp_cli.models import IMAGENET_MEAN, IMAGENET_STD, ModelError, load_model

TINY = "test_resnet.r160_in1k"  # timm's own test model: 160 px, bilinear, mean = std = 0.5
REVISION = "0123456789abcdef0123456789abcdef01234567"


def perturbed_state(name: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """A state dict for ``name`` that no initialisation produces: random init plus noise everywhere
    (variances stay positive)."""
    torch.manual_seed(seed)
    state = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    for key, tensor in state.items():
        if key.endswith("running_var"):
            tensor.mul_(1.0 + torch.rand_like(tensor))
        elif tensor.is_floating_point():
            tensor.add_(0.02 * torch.randn_like(tensor))
    return state


def fake_hub_cache(root: Path, repo_id: str, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Lay out ``root`` the way huggingface_hub's cache does for one snapshot of ``repo_id``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)  # no newline, as huggingface_hub writes it
    for filename, state in files.items():
        if filename.endswith(".safetensors"):
            save_file(state, str(snapshot / filename))
        else:
            torch.save(state, snapshot / filename)
    return snapshot


def assert_same_state(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    loaded = module.state_dict()
    assert set(loaded) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return perturbed_state(TINY, seed=3)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Offline, with an empty Hugging Face cache and torch hub folder of our own; returns the cache."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("LRP_HEATMAP_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return cache


# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [f"timm:{TINY}", "timm:test_resnet", TINY, "test_resnet"])
def test_timm_names_resolve_to_the_tagged_model(name, offline, tiny_state, tmp_path):
    """With or without ``timm:`` (torchvision has no such model) and with or without the tag (timm's
    default), the name resolves to the same tagged timm model."""
    weights = tmp_path / "w.safetensors"
    save_file(tiny_state, str(weights))
    loaded = load_model(name, str(weights))
    assert loaded.name == f"timm:{TINY}"
    assert type(loaded.module).__module__ == "timm.models.resnet"


def test_torchvision_keeps_the_names_it_knows(offline):
    """``resnet18`` exists in both libraries: it stays torchvision's, as before."""
    with pytest.raises(ModelError, match=r"download\.pytorch\.org/models/resnet18-"):
        load_model("resnet18")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "timm:test_resnet.nope",
            "timm model 'test_resnet' has no pretrained tag 'nope'; its tags are r160_in1k",
        ),
        ("timm:test_resnt", "unknown timm model 'test_resnt' (did you mean test_resnet"),
        ("test_resnt", "unknown model 'test_resnt' (did you mean test_resnet"),
    ],
)
def test_unknown_names_are_refused_with_suggestions(name, message, offline):
    with pytest.raises(ModelError) as error:
        load_model(name)
    assert message in str(error.value)


# --- weights files ----------------------------------------------------------------------------------


def test_safetensors_file_loads_exactly(offline, tiny_state, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file(tiny_state, str(weights))
    loaded = load_model(f"timm:{TINY}", str(weights))
    assert_same_state(loaded.module, load_file(str(weights)))
    assert not loaded.module.training


@pytest.mark.parametrize(
    "wrap",
    [
        lambda state, other: state,
        lambda state, other: {"state_dict": state, "epoch": 3, "args": argparse.Namespace(lr=0.1)},
        lambda state, other: {"model": state, "optimizer": {"lr": 0.1}},
        lambda state, other: {"state_dict": other, "state_dict_ema": state, "arch": "test_resnet"},
        lambda state, other: {f"module.{key}": value for key, value in state.items()},
    ],
    ids=["plain", "state_dict+args", "model", "ema-preferred", "ddp-prefix"],
)
def test_pytorch_checkpoints_are_unwrapped(wrap, offline, tiny_state, tmp_path):
    """timm's training checkpoints (EMA weights preferred, as timm loads them), other scripts' wrappers
    and DataParallel's ``module.`` prefix."""
    other = perturbed_state(TINY, seed=4)
    weights = tmp_path / "tiny.pth"
    torch.save(wrap(tiny_state, other), weights)
    assert_same_state(load_model(f"timm:{TINY}", str(weights)).module, tiny_state)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"epoch,loss\n1,0.5\n", "is not a PyTorch or safetensors checkpoint; pass the file saved with"),
        (b"", "is not a PyTorch or safetensors checkpoint"),
        (b"PK\x03\x04 not really a zip", "is not a PyTorch or safetensors checkpoint that can be read"),
        (b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": truncated}rest', "checkpoint that can be read"),
    ],
    ids=["text", "empty", "broken-zip", "broken-safetensors"],
)
def test_invalid_weights_file_is_named_plainly(content, message, offline, tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(content)
    with pytest.raises(ModelError) as error:
        load_model(f"timm:{TINY}", str(weights))
    assert str(error.value).startswith(f"weights file {weights} ")
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([torch.ones(2)], "holds no state dict"),
        ({"conv.weight": torch.ones(2), "epoch": 3}, "entry 'epoch' is not a tensor"),
    ],
)
def test_checkpoint_that_is_no_state_dict(payload, message, offline, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(payload, weights)
    with pytest.raises(ModelError, match=message):
        load_model(f"timm:{TINY}", str(weights))


def test_keys_that_do_not_fit_are_named(offline, tiny_state, tmp_path):
    state = dict(tiny_state)
    del state["fc.bias"]
    state["stem.extra"] = torch.zeros(1)
    state["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)
    weights = tmp_path / "renamed.safetensors"
    save_file(state, str(weights))
    with pytest.raises(ModelError) as error:
        load_model(f"timm:{TINY}", str(weights))
    shape = tuple(tiny_state["conv1.0.weight"].shape)
    assert str(error.value) == (
        f"weights from {weights} do not fit the model timm:{TINY}: 1 key(s) missing from the file "
        "(fc.bias); 1 key(s) the model does not have (stem.extra); 1 key(s) of another shape, file vs "
        f"model (conv1.0.weight: (1, 1, 1, 1) vs {shape}). Check that --model names the architecture "
        "the checkpoint was saved from"
    )


def test_long_key_lists_are_cut_short(offline, tiny_state, tmp_path):
    weights = tmp_path / "other.safetensors"
    save_file({f"other.{i}": torch.zeros(1) for i in range(5)}, str(weights))
    with pytest.raises(ModelError) as error:
        load_model(f"timm:{TINY}", str(weights))
    missing = [key for key in tiny_state if not key.endswith("num_batches_tracked")]  # torch fills those
    assert (
        f"{len(missing)} key(s) missing from the file ({', '.join(missing[:3])} and {len(missing) - 3} more)"
        in str(error.value)
    )
    assert "5 key(s) the model does not have (other.0, other.1, other.2 and 2 more)" in str(error.value)


# --- the Hugging Face cache -------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_weights_come_from_the_hub_cache_offline(variable, offline, tiny_state, tmp_path, monkeypatch):
    """A cache laid out as huggingface_hub lays it out is found without a network: the same file
    huggingface_hub itself resolves with ``local_files_only``."""
    from huggingface_hub import hf_hub_download

    cache = offline if variable == "HF_HUB_CACHE" else tmp_path / "hf-home" / "hub"
    if variable == "HF_HOME":
        monkeypatch.delenv("HF_HUB_CACHE")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    snapshot = fake_hub_cache(cache, f"timm/{TINY}", {"model.safetensors": tiny_state})
    reference = hf_hub_download(f"timm/{TINY}", "model.safetensors", cache_dir=cache, local_files_only=True)
    assert Path(reference) == snapshot / "model.safetensors"
    loaded = load_model("timm:test_resnet")
    assert_same_state(loaded.module, load_file(reference))


def test_hub_cache_with_only_the_pickle_file(offline, tiny_state):
    """Repositories without ``model.safetensors`` fall back to ``pytorch_model.bin``, as timm does."""
    fake_hub_cache(offline, f"timm/{TINY}", {"pytorch_model.bin": tiny_state})
    assert_same_state(load_model(f"timm:{TINY}").module, tiny_state)


def test_offline_without_weights_names_the_file_and_where_to_put_it(offline):
    with pytest.raises(ModelError) as error:
        load_model("timm:test_resnet")
    folder = offline / f"models--timm--{TINY}"
    assert str(error.value) == (
        f"weights for timm:{TINY} are not in the Hugging Face cache and LRP_HEATMAP_OFFLINE is set: "
        f"put model.safetensors of timm/{TINY} at {folder}/snapshots/<revision>/model.safetensors, "
        f"with {folder}/refs/main holding <revision> (running `hf download timm/{TINY} model.safetensors` "
        f"on a connected machine and copying its {folder.name} folder into {offline} does that), or "
        f"download https://huggingface.co/timm/{TINY}/resolve/main/model.safetensors and pass it with "
        "--weights model.safetensors"
    )


# --- the pretrained config --------------------------------------------------------------------------


def test_transform_and_labels_come_from_the_pretrained_config(offline, tiny_state, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file(tiny_state, str(weights))
    loaded = load_model(f"timm:{TINY}", str(weights))
    assert (loaded.mean, loaded.std) == ([0.5] * 3, [0.5] * 3)
    assert (loaded.input_size, loaded.interpolation) == ((160, 160), "bilinear")
    assert (loaded.crop_pct, loaded.crop_mode, loaded.fixed_input_size) == (0.95, "center", False)
    assert len(loaded.labels) == 1000
    assert loaded.label(0) == "tench, Tinca tinca" and loaded.label(
        999
    ) == ImageNetInfo().index_to_description(999)


def test_imagenet_statistics_when_the_config_says_so(offline, tmp_path):
    weights = tmp_path / "effnet.safetensors"
    save_file(perturbed_state("test_efficientnet.r160_in1k", seed=5), str(weights))
    loaded = load_model("timm:test_efficientnet", str(weights))
    assert (loaded.mean, loaded.std) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize(
    ("classes", "subset"), [(10, None), (11821, "imagenet-12k"), (21843, "imagenet-21k-goog")]
)
def test_fine_tuned_heads_get_their_size_and_labels(classes, subset, offline, tmp_path):
    """A checkpoint with another head size rebuilds the head to fit; ImageNet-12k/21k heads are named
    from timm's class lists, other heads have no names."""
    state = perturbed_state(TINY, seed=6, num_classes=classes)
    weights = tmp_path / "head.safetensors"
    save_file(state, str(weights))
    loaded = load_model(f"timm:{TINY}", str(weights))
    assert_same_state(loaded.module, state)
    assert loaded.module(torch.zeros(1, 3, 32, 32)).shape == (1, classes)
    if subset is None:
        assert loaded.labels is None and loaded.label(3) is None
    else:
        info = ImageNetInfo(subset)
        assert loaded.labels == [info.index_to_description(i) for i in range(classes)]


def test_torchvision_transform_and_labels(offline, tmp_path):
    """torchvision models carry their weights' evaluation transform and categories too."""
    import torchvision

    torch.manual_seed(7)
    weights = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), weights)
    loaded = load_model("squeezenet1_1", str(weights))
    assert (loaded.input_size, loaded.interpolation, loaded.crop_pct) == ((224, 224), "bilinear", 224 / 256)
    assert (loaded.mean, loaded.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert loaded.labels == torchvision.models.SqueezeNet1_1_Weights.DEFAULT.meta["categories"]


def test_label_names_from_the_config_for_other_heads():
    """Heads that are not ImageNet's are named by the config's label names (descriptions preferred)."""
    from lrp_cli.models import _timm_labels

    overlay = {"label_names": ["n01", "n02", "n03"], "label_descriptions": {"n01": "cat", "n03": "dog"}}
    model = timm.create_model(TINY, pretrained=False, num_classes=3, pretrained_cfg_overlay=overlay)
    assert _timm_labels(model) == ["cat", "n02", "dog"]
    del overlay["label_descriptions"]
    model = timm.create_model(TINY, pretrained=False, num_classes=3, pretrained_cfg_overlay=overlay)
    assert _timm_labels(model) == ["n01", "n02", "n03"]
    model = timm.create_model(TINY, pretrained=False, num_classes=4, pretrained_cfg_overlay=overlay)
    assert _timm_labels(model) is None  # names that do not match the head are not used


# --- factories in the current folder ----------------------------------------------------------------

FACTORY = """
import torch

def build():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))

def broken():
    raise ValueError("needs a config file")

def not_a_module():
    return 42
"""


@pytest.fixture
def factory_folder(tmp_path, monkeypatch) -> str:
    """A module file in a fresh current folder that is not on the Python path."""
    module = f"lrp_test_factory_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    yield module
    sys.modules.pop(module, None)


def test_factory_in_the_current_folder(factory_folder, tmp_path):
    path_before = list(sys.path)
    loaded = load_model(f"{factory_folder}:build")
    assert isinstance(loaded.module[0], torch.nn.Conv2d) and loaded.module[0].out_channels == 4
    assert loaded.labels is None and loaded.input_size is None
    assert sys.path == path_before  # the folder was on the path only for the import


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("missing", "cannot import 'missing' from"),
        ("broken", "the factory raised ValueError: needs a config file"),
        ("not_a_module", "the factory returned int, not a torch.nn.Module"),
    ],
)
def test_factory_failures_are_model_errors(attribute, message, factory_folder):
    with pytest.raises(ModelError, match=message):
        load_model(f"{factory_folder}:{attribute}")


def test_factory_module_not_found_names_the_folder(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=rf"looked in {tmp_path} and the Python path"):
        load_model("no_such_module_here:build")


# --- the command line -------------------------------------------------------------------------------


def invoke(*args: str) -> Result:
    from lrp_cli.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture
def photo(tmp_path) -> Path:
    """A flat-coloured photo: any resampling gives the same pixels, so the model input is known."""
    path = tmp_path / "photos" / "flat.png"
    path.parent.mkdir()
    Image.new("RGB", (80, 60), (200, 30, 90)).save(path)
    return path


def test_cli_offline_without_weights_exits_2(offline, photo, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", str(photo), "--model", "timm:test_resnet", "-o", str(out), "--workers", "0")
    assert result.exit_code == 2, result.output
    assert f"{offline}/models--timm--{TINY}/snapshots/<revision>/model.safetensors" in result.stderr
    assert "--weights model.safetensors" in result.stderr
    assert "Traceback" not in result.output
    assert not (out / "flat.heatmap.png").exists()


def test_cli_invalid_weights_exits_2(offline, photo, tmp_path):
    weights = tmp_path / "notes.pth"
    weights.write_text("these are not weights\n")
    result = invoke(
        "run", str(photo), "--model", f"timm:{TINY}", "--weights", str(weights), "-o", str(tmp_path / "o")
    )
    assert result.exit_code == 2, result.output
    assert f"weights file {weights} is not a PyTorch or safetensors checkpoint" in result.stderr


def test_cli_run_on_a_timm_model_from_the_hub_cache(offline, photo, tiny_state, tmp_path):
    """End to end: the model's own mean/std (0.5, not ImageNet's) feed it, labels name the class."""
    sharp = {**tiny_state, "fc.weight": 30.0 * tiny_state["fc.weight"]}  # inputs move the top class
    fake_hub_cache(offline, f"timm/{TINY}", {"model.safetensors": sharp})
    out = tmp_path / "out"
    args = ["run", str(photo), "--model", "test_resnet", "--resolution", "64", "--workers", "0"]
    result = invoke(*args, "-o", str(out), "--json", "--quiet")
    assert result.exit_code == 0, result.output
    record = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))

    model = timm.create_model(TINY, pretrained=False)
    model.load_state_dict(sharp)
    colour = torch.tensor([200.0, 30.0, 90.0]) / 255.0
    pixels = ((colour - 0.5) / 0.5).reshape(1, 3, 1, 1).expand(1, 3, 64, 64)
    with torch.no_grad():
        probabilities = model.eval()(pixels).softmax(dim=1)[0]
    expected = int(probabilities.argmax())
    assert record["class_index"] == expected
    assert record["label"] == ImageNetInfo().index_to_description(expected)
    assert record["probability"] == pytest.approx(float(probabilities[expected]), abs=2e-6)
    assert Image.open(out / "flat.heatmap.png").size == (85, 64)  # the photo's 4:3, short side at 64
    assert Image.open(out / "flat.overlay.jpg").size == (80, 60)
