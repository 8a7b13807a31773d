"""Training checkpoints: weights plus what explaining needs (model name, head, class names,
preprocessing), and in ``last.pt`` what resuming needs (optimizer, schedule, scaler, random states).

They are plain ``torch.save`` dicts with the weights under ``state_dict``, so other tools read the weights
too; ``run --weights best.pt`` recognises them by their ``format`` entry and rebuilds the model from them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import EMBEDDED, NO_WEIGHTS, LoadedModel, ModelError, state_hash
from ..render import TEMP_SUFFIX
from ..weights import fit
from .folders import Preprocessing

FORMAT = "lrp-heatmap-train"
VERSION = 1


def metadata(model: str, head: str, classes: list[str], pre: Preprocessing) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "head": head,
        "classes": list(classes),
        "resolution": pre.resolution,
        "resize": pre.resize,
        "interpolation": pre.interpolation,
        "mean": list(pre.mean),
        "std": list(pre.std),
    }


def save(path: Path, meta: dict[str, Any], module: nn.Module, **extra: Any) -> None:
    """Write atomically (temporary file, then rename): a checkpoint is whole or absent."""
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(handle)
    try:
        torch.save({**meta, "state_dict": state, **extra}, temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's contents if ``path`` is a training checkpoint of this tool, else None (and the
    caller reads it as an ordinary state dict, with that reader's messages)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"PK\x03\x04":  # torch.save's zip format
                return None
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours, or damaged: read_checkpoint reports it
        return None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        return None
    if content.get("version") != VERSION:
        raise ModelError(
            f"{path}: training checkpoint version {content.get('version')!r}; this lrp-heatmap "
            f"reads version {VERSION}"
        )
    return content


def trained_model(
    name: str, path: str | Path, mean: list[float] | None, std: list[float] | None
) -> LoadedModel | None:
    """The model of a training checkpoint, ready to explain with its class names and preprocessing
    (``mean``/``std`` override the stored ones); None when ``path`` is not one. ``name`` (the config's
    model) must be the checkpoint's model or the default, which the checkpoint then replaces."""
    content = read(path)
    if content is None:
        return None
    from ..models import load_model
    from .model import replace_head

    model = content["model"]
    if name not in (model, EMBEDDED):
        raise ModelError(
            f"{path} was trained from model {model!r}, not {name!r}: leave out --model (the "
            "checkpoint names its model) or pass the matching one"
        )
    loaded = load_model(model, NO_WEIGHTS)
    head = replace_head(loaded.module, len(content["classes"]))
    if head != content["head"]:
        raise ModelError(
            f"{path}: the checkpoint's head is {content['head']!r} but {model} now gets "
            f"{head!r}; was it saved by another version of the model's code?"
        )
    fit(loaded.module, content["state_dict"], path, model)
    loaded.module.eval()
    resolution = int(content["resolution"])
    return LoadedModel(
        loaded.module,
        model,
        list(mean if mean is not None else content["mean"]),
        list(std if std is not None else content["std"]),
        [str(label) for label in content["classes"]],
        state_hash(loaded.module),
        input_size=(resolution, resolution),
        interpolation=str(content["interpolation"]),
    )
