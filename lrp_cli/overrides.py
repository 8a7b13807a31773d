"""Config keys from the command line: ``--set key=value`` (YAML values, dotted keys for nested entries)
and the options whose values are YAML (``--mean``, ``--std``, ``--rules``).

Only parsing happens here; :func:`lrp_cli.config.resolve_config` validates the result with the same
checks and messages as a config file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from .config import NULL, ConfigError


def yaml_value(text: str, where: str) -> Any:
    """``text`` as YAML (``0.25`` a number, ``true`` a bool, ``[1, 2]`` a list, ``null`` None)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        detail = str(error).splitlines()[0]
        raise ConfigError(f"command line: {where} = {text!r} is not valid YAML ({detail})") from None


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``["rules.conv.rule=gamma", "topk=0.05"]`` to ``{"rules.conv.rule": "gamma", "topk": 0.05}``;
    later items win, as options given twice do; ``key=null`` becomes :data:`NULL`."""
    values: dict[str, Any] = {}
    for item in items:
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(
                f"command line: --set {item!r} is not KEY=VALUE; e.g. --set topk=0.05 or --set rules.conv.rule=gamma"
            )
        value = yaml_value(text, f"--set {key}")
        values[key] = NULL if value is None else value
    return values


def channel_values(text: str, option: str) -> Any:
    """``--mean 0.5,0.5,0.5`` (or ``[0.5, 0.5, 0.5]``, or ``null``) as YAML."""
    stripped = text.strip()
    if stripped.startswith("[") or stripped.lower() in ("null", "none", "~"):
        return yaml_value("null" if stripped.lower() == "none" else stripped, option)
    return yaml_value(f"[{stripped}]", option)


def command_line_overrides(given: dict[str, Any], sets: Iterable[str] = ()) -> dict[str, Any]:
    """The dedicated options' values (None = not given) plus ``--set`` items, as config overrides."""
    overrides = {key: value for key, value in given.items() if value is not None}
    for key in ("mean", "std"):
        if isinstance(overrides.get(key), str):
            value = channel_values(overrides[key], f"--{key}")
            overrides[key] = NULL if value is None else value  # --mean null: the weights' own again
    if isinstance(overrides.get("rules"), str):
        value = yaml_value(overrides["rules"], "--rules")
        overrides["rules"] = NULL if value is None else value
    if isinstance(overrides.get("target"), str) and overrides["target"].isdigit():
        overrides["target"] = int(overrides["target"])
    return overrides | parse_sets(sets)
