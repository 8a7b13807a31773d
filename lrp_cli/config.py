"""The run configuration: one YAML schema, validated with messages that name the file, key and value."""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .training.settings import TRAIN_DEFAULTS, check_train

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
PRECISIONS = ("fp32", "bf16", "fp16")
RESIZE_POLICIES = ("squash", "crop")
OVERLAY_FORMATS = ("jpg", "png")
ENGINES = ("local", "ray")
BUILTIN_COMPOSITES = (  # lrp_cli.lrp.COMPOSITES without importing torch (tests/test_startup.py compares)
    "alpha1-beta0", "alpha2-beta1", "attnlrp", "cp-lrp", "epsilon", "epsilon-alpha2-beta1-flat",
    "epsilon-gamma-box", "epsilon-plus-flat", "patternattribution", "patternnet", "seed", "zplus",
)  # fmt: skip
OVERLAY_MODES = ("blend", "mask", "contour")  # lrp_cli.render.overlay_image


class ConfigError(ValueError):
    """A configuration problem the user has to fix; the message says where and how."""


NULL: Any = type("Null", (), {"__repr__": lambda self: "NULL"})()
"""An override that sets a key to null (``--set weights=null``); a plain None means "not given"."""


@dataclass
class Config:
    """Every setting of a run. ``configs/default.yaml`` documents each key."""

    model: str = "efficientnet-lite0"
    weights: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    composite: str = "auto"
    rules: dict[str, Any] = field(default_factory=dict)
    patterns: str | None = None  # file from `lrp-heatmap patterns fit` (lrp_cli.patterns)
    topk: float = 1.0
    renormalize: bool = False
    target: int | str | None = None
    device: str = "auto"
    precision: str = "fp32"
    winograd: bool = True
    resolution: int | None = None  # None: the model's own input size (224 where it has none)
    resize: str = "squash"
    batch_size: int = 8
    workers: int = 2
    colormap: str = "auto"
    overlay_alpha: float = 0.6
    overlay_format: str = "jpg"
    overlay_mode: str = "blend"
    panel: bool = True  # NAME.panel.jpg (lrp_cli.panel)
    report: bool | None = None  # report.html (lrp_cli.report); None: on for runs of more than one image
    save_relevance: bool = False
    output: str = "output"
    engine: str = "local"  # local, or ray (lrp_cli.ray_engine)
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray instance
    ray_actors: int | None = None  # None: one per GPU of the cluster, else one per 4 CPUs
    max_pixels: int = 89_478_485
    snapshot: dict[str, float] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=lambda: dict(TRAIN_DEFAULTS))  # lrp_cli.training

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check(key: str, value: Any, where: str) -> Any:
    """Validate one key's value, returning it normalised."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: key {key!r} = {value!r} is invalid; expected {expected}")

    def number(low: float, high: float, *, integer: bool, low_open: bool = False) -> Any:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (integer and not isinstance(value, int))
            or math.isnan(value)
        ):
            raise fail(
                f"{'an integer' if integer else 'a number'} in {'(' if low_open else '['}{low}, {high}]"
            )
        if value < low or value > high or (low_open and value == low):
            raise fail(f"a value in {'(' if low_open else '['}{low}, {high}]")
        return value

    def choice(options: tuple[str, ...]) -> str:
        if value not in options:
            raise fail(f"one of {', '.join(options)}")
        return value

    if key == "topk":
        return float(number(0.0, 1.0, integer=False, low_open=True))
    if key == "overlay_alpha":
        return float(number(0.0, 1.0, integer=False))
    if key == "resolution":
        return None if value is None else number(16, 4096, integer=True)
    if key == "batch_size":
        return number(1, 4096, integer=True)
    if key == "workers":
        return number(0, 64, integer=True)
    if key == "max_pixels":
        return number(1, 10**10, integer=True)
    if key == "precision":
        return choice(PRECISIONS)
    if key == "resize":
        return choice(RESIZE_POLICIES)
    if key == "overlay_format":
        return choice(OVERLAY_FORMATS)
    if key == "overlay_mode":
        return choice(OVERLAY_MODES)
    if key == "report" and value is None:
        return None
    if key == "composite":
        if value in ("auto", *BUILTIN_COMPOSITES):
            return value
        from .lrp import COMPOSITES  # presets registered by the user's code

        return choice(("auto", *sorted(COMPOSITES)))
    if key in ("renormalize", "save_relevance", "winograd", "panel", "report"):
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if key == "device":
        if not isinstance(value, str) or not (
            value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
        ):
            raise fail("auto, cpu, cuda or cuda:N")
        return value
    if key == "target":
        if value is None or value in ("predicted", "softmax"):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        raise fail("null, predicted, softmax or a class index >= 0")
    if key in ("mean", "std"):
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(_is_number(v) and abs(v) < math.inf for v in value)
        ):
            raise fail("null or a list of 3 finite numbers (per RGB channel)")
        if key == "std" and any(v <= 0 for v in value):
            raise fail("positive numbers")
        return [float(v) for v in value]
    if key == "train":
        return check_train(value, where)
    if key == "snapshot":
        return _check_tolerances(value, where)
    if key == "rules":
        if not isinstance(value, dict):
            raise fail("a mapping of layer type / module pattern to a rule")
        _check_rules(value, where)
        return value
    if key in ("model", "colormap", "output"):
        if not isinstance(value, str) or not value:
            raise fail("a non-empty string")
        if key == "colormap" and value != "auto":
            import matplotlib

            if value not in matplotlib.colormaps:
                raise ConfigError(
                    f"{where}: key 'colormap' = {value!r} is not a matplotlib colormap"
                    + _suggest(value, list(matplotlib.colormaps))
                )
        return value
    if key == "engine":
        return choice(ENGINES)
    if key == "ray_address":
        if value is not None and (not isinstance(value, str) or not value):
            raise fail("null or a Ray address (auto, HOST:PORT, ray://HOST:PORT)")
        return value
    if key == "ray_actors":
        return None if value is None else number(1, 100_000, integer=True)
    if key in ("weights", "patterns"):
        if value is not None and not isinstance(value, str):
            raise fail("null or a file path")
        return value
    raise AssertionError(f"unhandled key {key}")


TOLERANCES = {  # key: (low, high) -- see lrp_cli.snapshot.Tolerances for the defaults
    "min_pearson": (-1.0, 1.0),
    "max_diff": (0.0, float("inf")),
    "max_mean_diff": (0.0, float("inf")),
    "min_iou": (0.0, 1.0),
    "mask_fraction": (1e-6, 1.0),
}


def _check_tolerances(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: key 'snapshot' = {value!r} is invalid; expected a mapping of tolerances")
    for name, number in value.items():
        if name not in TOLERANCES:
            raise ConfigError(f"{where}: unknown key 'snapshot.{name}'{_suggest(name, list(TOLERANCES))}")
        low, high = TOLERANCES[name]
        if not _is_number(number) or not low <= number <= high:
            raise ConfigError(
                f"{where}: key 'snapshot.{name}' = {number!r} is invalid; expected a number in [{low}, {high}]"
            )
    return {name: float(number) for name, number in value.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


RULE_SETTINGS = {"maxpool": ("winner", "average"), "start": ("predicted", "softmax")}


def _check_rules(rules: Mapping[str, Any], where: str) -> None:
    """Rule names, parameter names and parameter types, so that a bad value stops the run before it starts."""
    if not rules:
        return  # nothing to check: the engine (and torch) need not load
    from .lrp import get_composite

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{where}: key 'rules' is invalid: {message}")

    for key, value in rules.items():
        if key in RULE_SETTINGS and value not in RULE_SETTINGS[key]:
            raise fail(f"{key} = {value!r}; expected one of {', '.join(RULE_SETTINGS[key])}")
        if key == "stabilizer" and not (_is_number(value) and 0 < value < math.inf):
            raise fail(f"stabilizer = {value!r}; expected a positive number")
    for key, spec in rules.items():
        if isinstance(spec, Mapping) and isinstance(spec.get("rule"), str):
            _check_rule_parameters(key, spec, fail)
    try:
        get_composite("epsilon").with_overrides(rules)
    except (ValueError, TypeError) as error:
        raise fail(str(error)) from error


def _check_rule_parameters(key: str, spec: Mapping[str, Any], fail: Callable[[str], ConfigError]) -> None:
    """Each parameter's type, judged by the rule's default for it (names are checked by the engine)."""
    from .lrp.rules import RULE_ALIASES, RULES

    base = RULE_ALIASES.get(spec["rule"], (spec["rule"], {}))[0]
    if base not in RULES:
        return  # the engine names the unknown rule
    defaults = {f.name: f.default for f in fields(RULES[base])}
    for name, value in spec.items():
        if name == "rule" or name not in defaults:
            continue
        default = defaults[name]
        if isinstance(default, bool):
            ok, expected = isinstance(value, bool), "true or false"
        elif isinstance(default, int | float):
            ok, expected = _is_number(value) and abs(value) < math.inf, "a finite number"
        else:  # per-channel bounds (zbox low/high)
            values = value if isinstance(value, list) else [value]
            ok = value is None or all(_is_number(v) for v in values)
            expected = "null, a number or a list of numbers"
        if not ok:
            raise fail(f"{key}: parameter {name!r} = {value!r}; expected {expected}")


def merge(config: Config, values: Mapping[str, Any], where: str, problems: list[str] | None = None) -> Config:
    """Apply ``values`` on top of ``config``, checking every key and value. Every mistake is reported:
    into ``problems`` when given (the bad keys are left out), else as one ConfigError listing them all."""
    known = [f.name for f in fields(Config)]
    found: list[str] = []
    updates = {}
    for key, value in values.items():
        normalised_key = key.replace("-", "_")
        if normalised_key not in known:
            found.append(f"{where}: unknown key {key!r}{_suggest(normalised_key, known)}")
            continue
        try:
            updates[normalised_key] = _check(normalised_key, value, where)
        except ConfigError as error:
            found.append(str(error))
    if problems is not None:
        problems.extend(found)
    elif found:
        raise ConfigError("\n".join(found))
    return Config(**{**config.to_dict(), **updates})


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (``configs/default.yaml`` when none is given), then overrides."""
    return resolve_config(path, overrides)[0]


def resolve_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[Config, dict[str, str]]:
    """:func:`load_config` plus where each key's value came from (``default``, the file, ``command
    line``). Override keys may be dotted (``rules.conv.rule``) to set one entry of a nested key. Every
    mistake in the file and on the command line is reported at once, one per line."""
    config = Config()
    sources = {f.name: "default" for f in fields(Config)}
    problems: list[str] = []
    source = Path(path) if path is not None else DEFAULT_CONFIG
    if path is not None or source.exists():
        data = _read_yaml(source)
        config = merge(config, data, str(source), problems)
        if path is not None:  # the shipped default file holds the defaults: those stay "default"
            sources.update({key.replace("-", "_"): f"file {source}" for key in data})
    if overrides:
        given = {k: None if v is NULL else v for k, v in overrides.items() if v is not None}
        tolerances = {k: given.pop(k) for k in list(given) if k in TOLERANCES}
        if tolerances:
            given["snapshot"] = {**config.snapshot, **tolerances}
        given = _nest(config, given, problems)
        config = merge(config, given, "command line", problems)
        sources.update({key.replace("-", "_"): "command line" for key in given})
    if problems:
        raise ConfigError("\n".join(problems))
    return config, {key: value for key, value in sources.items() if key in config.to_dict()}


def _read_yaml(source: Path) -> dict[str, Any]:
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {source}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{source}: not UTF-8 text (byte {error.start} is {error.object[error.start : error.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    return data


def _nest(config: Config, given: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Fold dotted keys (``rules.conv.rule``) into a copy of the nested key's current value."""
    nested: dict[str, Any] = {}
    for key, value in given.items():
        if "." not in key:
            nested[key] = value
            continue
        top, *path = key.replace("-", "_").split(".")
        current = nested.get(top, getattr(config, top, None))
        if not isinstance(current, dict):
            known = [f.name for f in fields(Config) if isinstance(getattr(config, f.name), dict)]
            problems.append(
                f"command line: key {key!r}: {top!r} has no sub-keys; dotted keys work for {', '.join(known)}"
                if hasattr(config, top)
                else f"command line: unknown key {top!r}{_suggest(top, [f.name for f in fields(Config)])}"
            )
            continue
        root = copy.deepcopy(current)
        place = root
        for part in path[:-1]:
            if not isinstance(place.get(part), dict):
                place[part] = {} if place.get(part) is None else {"rule": place[part]}
            place = place[part]
        place[path[-1]] = value
        nested[top] = root
    return nested
