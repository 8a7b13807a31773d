"""The manifest: one JSON record per line, appended whole, readable from any folder and lossless for any
file name, so that ``--resume`` can always tell what is done."""

from __future__ import annotations

import base64
import json
import os
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import disk_failure

MANIFEST = "manifest.jsonl"


def json_path(path: str | Path) -> tuple[str, str | None]:
    """A path as JSON can hold it: its text, plus its raw bytes in base64 when the name is not valid
    UTF-8 (the text then shows U+FFFD where the bytes were)."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(text)
        return raw.decode("utf-8", "replace"), base64.b64encode(raw).decode("ascii")
    return text, None


def add_paths(record: dict[str, Any], path: Path, name: Path, outputs: dict[str, Path]) -> dict[str, Any]:
    """Fill a record's ``path``, ``path_bytes``, ``name``, ``outputs`` and ``outputs_bytes`` (absolute
    paths, so the manifest reads the same from any working directory)."""
    record["path"], record["path_bytes"] = json_path(path)
    record["name"] = json_path(name)[0]
    texts = {kind: json_path(file) for kind, file in outputs.items()}
    record["outputs"] = {kind: text for kind, (text, _) in texts.items()}
    raw = {kind: data for kind, (_, data) in texts.items() if data is not None}
    record["outputs_bytes"] = raw or None
    return record


def _stored_path(text: str, raw: str | None) -> str:
    return os.fsdecode(base64.b64decode(raw)) if raw else text


@dataclass
class ManifestState:
    """What a previous run left: finished inputs, and the damage found on the way."""

    done: set[str] = field(
        default_factory=set
    )  # absolute input paths recorded without error, outputs present
    whole_bytes: int = 0  # size up to the end of the last complete line
    torn_bytes: int = 0  # an incomplete last line (a crash or a full disk cut it)
    bad_lines: list[int] = field(default_factory=list)  # 1-based numbers of lines that are not records


def read_manifest(path: Path) -> ManifestState:
    """Parse a manifest for ``--resume`` without changing it; damaged lines are counted, not fatal."""
    state = ManifestState()
    if not path.exists():
        return state
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    state.whole_bytes, state.torn_bytes = whole, len(data) - whole
    for number, line in enumerate(data[:whole].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            source = _stored_path(record["path"], record.get("path_bytes"))
            raw = record.get("outputs_bytes") or {}
            outputs = [Path(_stored_path(text, raw.get(kind))) for kind, text in record["outputs"].items()]
            finished = record.get("error") is None and all(file.exists() for file in outputs)
            if finished:
                state.done.add(os.path.abspath(source))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            state.bad_lines.append(number)
    return state


class ManifestWriter:
    """Appends records, each in one write; a write that fails (disk full) is cut back off, so the file
    only ever holds whole lines."""

    def __init__(self, path: Path, *, fresh: bool, keep_bytes: int | None = None) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0)
        try:
            self.fd = os.open(path, flags, 0o644)
            if keep_bytes is not None:
                os.ftruncate(self.fd, keep_bytes)
        except OSError as error:
            raise disk_failure(error, str(path)) or error from None

    def append(self, record: dict[str, Any]) -> str:
        """Write one record and return its JSON line (without the newline)."""
        line = json.dumps(record, ensure_ascii=False)
        data = (line + "\n").encode("utf-8")
        size = os.fstat(self.fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(self.fd, data[written:])
        except OSError as error:
            os.ftruncate(self.fd, size)
            raise disk_failure(error, str(self.path)) or error from None
        return line

    def close(self) -> None:
        with suppress(OSError):  # some file systems cannot sync; the data is written either way
            os.fsync(self.fd)
        os.close(self.fd)
