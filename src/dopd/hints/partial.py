"""The `.partial` file of the generated form of `dopd hints`: finished rows appended as they come, so that a crash
or Ctrl-C loses no request already paid for and the same command continues where it stopped; a partial file from
other settings or another input is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import TYPE_CHECKING

from ..config import ConfigError
from .client import HintResult
from .spec import DEFAULT_PREFIXES

if TYPE_CHECKING:
    from .spec import HintsSpec

# ------------------------------------------------------------------------------------------ the partial file


class PartialLog:
    """`OUT.partial`: a header line with the run's settings, then one JSON line per finished row
    {"index", "context", "kept", "rejected"}, flushed as it comes. A rerun with the same settings and input reads
    the finished rows back; a torn last line (a kill in mid-write) is cut off."""

    def __init__(self, path: str, settings: dict):
        self.path, self.settings = path, settings
        self.done: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._handle = None

    def open(self) -> None:
        if os.path.exists(self.path):
            self._read()
        else:
            self.open_new()
        self._handle = open(self.path, "a", encoding="utf-8")

    def open_new(self) -> None:
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"dopd_hints_partial": 1, "settings": self.settings}) + "\n")

    def _read(self) -> None:
        with open(self.path, "rb") as handle:
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        lines = complete.decode("utf-8").splitlines()
        if not lines:  # killed before the header was written: nothing to keep
            os.remove(self.path)
            self.open_new()
            return
        try:
            header, records = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
        except json.JSONDecodeError as error:
            raise ConfigError(f"{self.path} is damaged ({error}); delete it to start over") from None
        if header.get("settings") != self.settings:
            raise ConfigError(
                f"{self.path} holds rows made with other settings or another input "
                f"({_difference(header, self.settings)}); "
                "rerun with the same options to continue it, or delete it to start over"
            )
        self.done = {record["index"]: record for record in records}

    def append(self, index: int, result: HintResult, context: str) -> None:
        record = {"index": index, "context": context, "kept": result.kept, "rejected": result.rejected}
        with self._lock:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._handle.flush()
            self.done[index] = record

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _difference(header: dict, settings: dict) -> str:
    old = header.get("settings") or {}
    keys = [key for key in settings if old.get(key) != settings.get(key)]
    return ", ".join(f"{key}: {old.get(key)!r} then, {settings.get(key)!r} now" for key in keys[:3]) or "no header"


def run_settings(spec: HintsSpec, dataset) -> dict:
    """What the partial file must agree on with a rerun: the form's settings and a hash of the input rows."""
    keys = [
        "form",
        "prompt_column",
        "solution_column",
        "answer_column",
        "prefix",
        "model",
        "temperature",
        "max_tokens",
        "max_hints",
        "verify",
    ]
    settings = {key: getattr(spec, key) for key in keys}
    settings["prefix"] = DEFAULT_PREFIXES[spec.form] if spec.prefix is None else spec.prefix
    used = [c for c in (spec.prompt_column, spec.solution_column, spec.answer_column) if c in dataset.column_names]
    digest = hashlib.sha256()
    for column in used:
        digest.update(json.dumps(dataset[column], default=str, ensure_ascii=False).encode("utf-8"))
    settings.update(rows=len(dataset), input_sha256=digest.hexdigest())
    return settings
