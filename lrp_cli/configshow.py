"""``lrp-heatmap config show``: the configuration a command would run with, and where each value came
from (``default``, ``file PATH``, ``command line``)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from .config import Config


def _flow(value: Any) -> str:
    """One YAML line for ``value`` (mappings and lists in flow style), as a config file would take it."""
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
        .strip()
        .removesuffix("\n...")
    )


def show(config: Config, sources: dict[str, str], *, json_output: bool = False) -> str:
    """The effective config as YAML with each key's source as a comment, or as JSON
    (``{"key": {"value": ..., "source": ...}}``)."""
    values = config.to_dict()
    if json_output:
        document = {key: {"value": value, "source": sources[key]} for key, value in values.items()}
        return json.dumps(document, indent=2)
    rows = []  # (first line, lines below it)
    for key, value in values.items():
        if isinstance(value, dict) and value:
            block = yaml.safe_dump(value, default_flow_style=False, sort_keys=False).splitlines()
            rows.append((key, f"{key}:", [f"  {line}" for line in block]))
        else:
            rows.append((key, f"{key}: {_flow(value)}", []))
    width = max(len(first) for _, first, _ in rows if len(first) <= 40) + 2
    lines = []
    for key, first, below in rows:
        lines.append(f"{first:<{width}}# {sources[key]}")
        lines.extend(below)
    return "\n".join(lines)
