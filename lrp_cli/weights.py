"""Checkpoint files and where they come from: PyTorch or safetensors files, the Hugging Face cache,
torch's download cache. Nothing here touches the network while offline."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

OFFLINE_ENV = "LRP_HEATMAP_OFFLINE"
STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
"""Where training scripts nest the weights, in the order timm prefers them (EMA weights first)."""
_SHOWN = 3


class ModelError(RuntimeError):
    """The model or its weights cannot be had; the message says what to do."""


def offline() -> str | None:
    """Which set environment variables forbid downloads, as a phrase (None when online)."""
    names = [
        name
        for name in (OFFLINE_ENV, "HF_HUB_OFFLINE")
        if os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")
    ]
    return f"{' and '.join(names)} {'is' if len(names) == 1 else 'are'} set" if names else None


def _sniff(path: Path) -> str:
    """``torch`` (zip or pickle), ``safetensors`` (u64 header length then JSON) or ``unknown``."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    return "unknown"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file.

    Training checkpoints (a dict with ``state_dict``, ``model`` or ``state_dict_ema`` next to epochs and
    arguments) are unwrapped, and the ``module.`` prefix of DataParallel/DDP is dropped. The format is
    read from the file's first bytes, not its name; torch files load with ``weights_only`` (no code
    runs), allowing only the ``argparse.Namespace`` that timm's training script stores."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    kind = _sniff(path)
    if kind == "unknown":
        raise ModelError(
            f"weights file {path} is not a PyTorch or safetensors checkpoint; pass the file saved with "
            "torch.save(model.state_dict(), ...) or safetensors.torch.save_file"
        )
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            state: object = load_file(path, device="cpu")
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types for a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"weights file {path} is not a PyTorch or safetensors checkpoint that can be read ({reason})"
        ) from error
    if isinstance(state, dict):
        nested = next((key for key in STATE_KEYS if isinstance(state.get(key), dict)), None)
        state = state[nested] if nested else state
    if not isinstance(state, dict) or not state:
        raise ModelError(f"weights file {path} holds no state dict")
    odd = next((key for key, value in state.items() if not isinstance(value, torch.Tensor)), None)
    if odd is not None:
        raise ModelError(
            f"weights file {path}: entry {odd!r} is not a tensor, so this is not a state dict (nor one "
            f"under {', '.join(STATE_KEYS)})"
        )
    if all(str(key).startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def _listed(count_of: str, items: Sequence[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {count_of} ({', '.join(items[:_SHOWN])}{more})"


def fit(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path, model_name: str) -> None:
    """Load ``state`` into ``module``; if it does not fit, name the first few keys that are missing,
    extra or of another shape instead of torch's wall of text."""
    expected = module.state_dict()
    reshaped = [key for key, tensor in expected.items() if key in state and state[key].shape != tensor.shape]
    usable = {key: value for key, value in state.items() if key not in reshaped}
    outcome = module.load_state_dict(usable, strict=False)  # lets modules fill in optional buffers
    missing = [key for key in outcome.missing_keys if key not in reshaped]
    problems = [
        _listed(what, keys)
        for what, keys in (
            ("key(s) missing from the file", missing),
            ("key(s) the model does not have", outcome.unexpected_keys),
            (
                "key(s) of another shape, file vs model",
                [f"{key}: {tuple(state[key].shape)} vs {tuple(expected[key].shape)}" for key in reshaped],
            ),
        )
        if keys
    ]
    if problems:
        raise ModelError(
            f"weights from {source} do not fit the model {model_name}: {'; '.join(problems)}. "
            "Check that --model names the architecture the checkpoint was saved from"
        )


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at
    import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_weights(repo: str, filenames: Sequence[str], what: str) -> Path:
    """The first of ``filenames`` in hub repository ``repo`` (``id`` or ``id@revision``): from the local
    cache, else downloaded into it unless offline, else a `ModelError` saying where to put which file."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    revision = revision or None
    cache = hf_cache_dir()
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
        if isinstance(found, str):
            return Path(found)
    filename = filenames[0]
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    ref = revision or "main"
    help_text = (
        f"put {filename} of {repo_id} at {folder}/snapshots/<revision>/{filename}, with "
        f"{folder}/refs/{ref} holding <revision> (running `hf download {repo_id} {filename}"
        f"{f' --revision {revision}' if revision else ''}` on a connected machine and copying its "
        f"{folder.name} folder into {cache} does that), or download "
        f"https://huggingface.co/{repo_id}/resolve/{ref}/{filename} and pass it with --weights {filename}"
    )
    blocked = offline()
    if blocked:
        raise ModelError(f"weights for {what} are not in the Hugging Face cache and {blocked}: {help_text}")
    from huggingface_hub.errors import EntryNotFoundError

    error: Exception | None = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache))
        except EntryNotFoundError as missing:  # try the next name (safetensors, then pickle)
            error = missing
        except Exception as failure:  # network, auth, disk: all mean "could not get the file"
            error = failure
            break
    raise ModelError(f"could not download the weights for {what} ({error}): {help_text}")


def url_weights(url: str, what: str) -> dict[str, torch.Tensor]:
    """Weights published at ``url``: from torch's cache, downloaded into it when allowed."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    help_text = (
        f"download {url} on a connected machine and put it at {cached}, or pass the file with --weights FILE"
    )
    if cached.is_file():
        return read_checkpoint(cached)
    blocked = offline()
    if blocked:
        raise ModelError(f"weights for {what} are not cached and {blocked}: {help_text}")
    hash_prefix = torch.hub.HASH_REGEX.search(cached.name)  # torchvision's file names carry one
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            url, str(cached), hash_prefix.group(1) if hash_prefix else None, progress=False
        )
    except Exception as error:  # urllib/ssl/hash errors: all mean "could not get the file"
        raise ModelError(f"could not download the weights for {what} ({error}): {help_text}") from error
    return read_checkpoint(cached)
