"""The ``train:`` section of the config: defaults and validation (standard library only, so that reading
a config stays light)."""

from __future__ import annotations

import difflib
import math
from typing import Any

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant", "step")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 32,
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "schedule": "cosine",
    "warmup_epochs": 0,
    "step_epochs": 10,
    "step_gamma": 0.1,
    "precision": "auto",
    "grad_clip": None,
    "val_fraction": 0.2,
    "pretrained": True,
    "freeze_backbone": False,
    "flip": True,
    "crop_scale": 0.8,
    "jitter": 0.1,
    "seed": 0,
    "output": "runs/train",
}
"""Every key of ``train:`` with its default; ``configs/default.yaml`` says what each one does."""

# key: (low, high, integer, low_open); numbers outside are refused with the range in the message
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "epochs": (1, 100_000, True, False),
    "batch_size": (1, 65_536, True, False),
    "lr": (0.0, 10.0, False, True),
    "weight_decay": (0.0, 1.0, False, False),
    "momentum": (0.0, 0.999, False, False),
    "warmup_epochs": (0, 100_000, True, False),
    "step_epochs": (1, 100_000, True, False),
    "step_gamma": (0.0, 1.0, False, True),
    "grad_clip": (0.0, math.inf, False, True),
    "val_fraction": (0.0, 0.9, False, False),
    "crop_scale": (0.0, 1.0, False, True),
    "jitter": (0.0, 1.0, False, False),
    "seed": (0, 2**63 - 1, True, False),
}
_CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": TRAIN_PRECISIONS}
_FLAGS = ("pretrained", "freeze_backbone", "flip")


def check_train(value: Any, where: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``train:`` mapping ``value`` on top of ``base`` (the defaults when None), every key checked;
    the result holds every key."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _error(f"{where}: key 'train' = {value!r} is invalid; expected a mapping of training settings")
    result = dict(TRAIN_DEFAULTS if base is None else base)
    for raw_key, item in value.items():
        key = str(raw_key).replace("-", "_")
        if key not in TRAIN_DEFAULTS:
            close = difflib.get_close_matches(key, list(TRAIN_DEFAULTS), n=1)
            hint = f" (did you mean 'train.{close[0]}'?)" if close else ""
            raise _error(f"{where}: unknown key 'train.{raw_key}'{hint}")
        result[key] = _check_one(key, item, where)
    if result["warmup_epochs"] >= result["epochs"] and result["warmup_epochs"]:
        raise _error(
            f"{where}: key 'train.warmup_epochs' = {result['warmup_epochs']} is invalid; expected fewer "
            f"than train.epochs ({result['epochs']})"
        )
    return result


def _check_one(key: str, value: Any, where: str) -> Any:
    def fail(expected: str) -> Exception:
        return _error(f"{where}: key 'train.{key}' = {value!r} is invalid; expected {expected}")

    if key in _RANGES:
        low, high, integer, low_open = _RANGES[key]
        if key == "grad_clip" and value is None:
            return None
        kind = "an integer" if integer else "a number"
        span = f"{'(' if low_open else '['}{low}, {high}]"
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (integer and not isinstance(value, int))
            or math.isnan(value)
        ):
            raise fail(f"{'null or ' if key == 'grad_clip' else ''}{kind} in {span}")
        if value < low or value > high or (low_open and value == low):
            raise fail(f"a value in {span}")
        return value if integer else float(value)
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise fail(f"one of {', '.join(_CHOICES[key])}")
        return value
    if key in _FLAGS:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if not isinstance(value, str) or not value:  # output
        raise fail("a non-empty string (a folder)")
    return value


def _error(message: str) -> Exception:
    from ..config import ConfigError  # config imports this module: resolve the cycle at call time

    return ConfigError(message)
