"""Data readers `json` (one array of objects) and `jsonl` (one object per line), UTF-8.

Rows are numbered from 1: the Nth element of the array, or line N of a JSON Lines file.
A bad row is yielded as a `DataError` in place of the row, so a skip policy can go on; a bad
file raises.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from sftcore import hookimpl
from sftcore.errors import DataError


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise DataError(path, None, None, f"cannot read file: {exc.strerror or exc}", reason="unreadable") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            path, line, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8",
            reason="not-utf8", unit="line",
        ) from None


def _object(path: str, index: int, value: Any, unit: str) -> Mapping[str, Any] | DataError:
    if not isinstance(value, dict):
        return DataError(path, index, None, f"expected a JSON object, got {type(value).__name__}", reason="not-an-object", unit=unit)
    return value


class JsonReader:
    suffixes = (".json",)

    def read(self, path: str) -> Iterator[tuple[int, Mapping[str, Any] | DataError]]:
        text = _read_text(path)
        if not text.strip():
            raise DataError(path, None, None, "the file is empty", reason="empty-file")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(path, exc.lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})", reason="bad-json", unit="line") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"train": [...]} style wrappers
        if not isinstance(data, list):
            raise DataError(path, None, None, f"expected a JSON array of objects, got {type(data).__name__}", reason="bad-json")
        for index, value in enumerate(data, start=1):
            yield index, _object(path, index, value, "row")


class JsonLinesReader:
    suffixes = (".jsonl", ".ndjson")

    def read(self, path: str) -> Iterator[tuple[int, Mapping[str, Any] | DataError]]:
        text = _read_text(path)
        if not text.strip():
            raise DataError(path, None, None, "the file is empty", reason="empty-file")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, DataError(path, number, None, f"invalid JSON: {exc.msg} (column {exc.colno})", reason="bad-json", unit="line")
                continue
            yield number, _object(path, number, value, "line")


@hookimpl
def register_data_readers(register):
    register("json", JsonReader, description="a JSON array of row objects (.json)")
    register("jsonl", JsonLinesReader, description="JSON Lines, one row object per line (.jsonl)")
