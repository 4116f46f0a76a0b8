"""Data readers `json` (one array of objects) and `jsonl` (one object per line), UTF-8.

Rows are numbered from 1: the Nth element of the array, or line N of a JSON Lines file.
A bad row is yielded as a `DataError` in place of the row, so a skip policy can go on; a bad
file raises (after the rows before the fault, which a caller must not act on before the file
is read to its end, as `sft run` does not). Neither reader holds the file in memory: JSON
Lines is read a line at a time, a JSON array an element at a time from blocks of text
(`sftcore.data.jsonstream`; only an array wrapped in an object, ``{"train": [...]}``, is parsed whole).
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from sftcore import hookimpl
from sftcore.errors import DataError
from sftcore.data.jsonstream import NOT_AN_ARRAY, array_elements, not_utf8

# A JSON escape that may decode to half a UTF-16 surrogate pair; only then are strings checked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(path, None, None, f"cannot read file: {exc.strerror or exc}", reason="unreadable") from None


def _read_text(path: str) -> str:
    with _open(path) as handle:
        try:
            raw = handle.read()
        except OSError as exc:
            raise DataError(path, None, None, f"cannot read file: {exc.strerror or exc}", reason="unreadable") from None
    return _decode(path, raw.removeprefix(codecs.BOM_UTF8), 0)


def _decode(path: str, raw: bytes, lines_before: int) -> str:
    """UTF-8 text of ``raw`` (a BOM already dropped, so offsets are ``raw``'s), or the error's line and byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, lines_before + raw[: exc.start].count(b"\n") + 1, raw[exc.start]) from None


def _parse(text: str) -> tuple[Any, str | None, int | None]:
    """``(value, problem, line_in_text)``: what ``json.loads`` raises besides a syntax error is a problem too."""
    try:
        return json.loads(text), None, None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} (column {exc.colno})", exc.lineno
    except RecursionError:
        return None, "invalid JSON: nested too deeply", None
    except ValueError as exc:  # an integer of more than 4300 digits; Python's advice after ';' is not for users
        return None, f"invalid JSON: {str(exc).split(';')[0]}", None


def _has_surrogate(value: Any) -> bool:
    """True when a string anywhere in ``value`` holds an unpaired surrogate, which is not text.

    Iterative: rows nest as deep as the JSON parser allows, deeper than a recursive walk could go.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _broken_field(row: Mapping[str, Any]) -> str | None:
    """The top-level field of ``row`` that holds a surrogate, named printably, if any."""
    for key, item in row.items():
        if _has_surrogate(key):
            return key.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        if _has_surrogate(item):
            return key
    return None


def _object(path: str, index: int, value: Any, unit: str, escaped: bool) -> Mapping[str, Any] | DataError:
    if not isinstance(value, dict):
        return DataError(path, index, None, f"expected a JSON object, got {type(value).__name__}", reason="not-an-object", unit=unit)
    field = _broken_field(value) if escaped else None
    if field is not None:
        return DataError(path, index, field, "has an unpaired \\uD800-\\uDFFF escape, which is not text", reason="not-unicode", unit=unit)
    return value


class JsonReader:
    suffixes = (".json",)

    def read(self, path: str) -> Iterator[tuple[int, Mapping[str, Any] | DataError]]:
        with _open(path) as handle:
            elements = array_elements(path, handle)
            try:
                first = next(elements)
            except StopIteration:
                return  # []
            if first is not NOT_AN_ARRAY:
                for index, value, raw in itertools.chain([first], elements):
                    yield index, _object(path, index, value, "row", bool(_SURROGATE_ESCAPE.search(raw)))
                return
        yield from self._whole(path)  # a wrapper object, or not an array: the messages of a whole parse

    @staticmethod
    def _whole(path: str) -> Iterator[tuple[int, Mapping[str, Any] | DataError]]:
        text = _read_text(path)
        if not text.strip():
            raise DataError(path, None, None, "the file is empty", reason="empty-file")
        data, problem, line = _parse(text)
        if problem:
            raise DataError(path, line, None, problem, reason="bad-json", unit="line")
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"train": [...]} style wrappers
        if not isinstance(data, list):
            raise DataError(path, None, None, f"expected a JSON array of objects, got {type(data).__name__}", reason="bad-json")
        escaped = bool(_SURROGATE_ESCAPE.search(text))
        del text
        for index, value in enumerate(data, start=1):
            yield index, _object(path, index, value, "row", escaped)


class JsonLinesReader:
    suffixes = (".jsonl", ".ndjson")

    def read(self, path: str) -> Iterator[tuple[int, Mapping[str, Any] | DataError]]:
        seen = False
        with _open(path) as handle:
            # Split on b"\n" only: str.splitlines() would also break a row at a U+2028 inside a string.
            for number, raw in enumerate(handle, start=1):
                line = _decode(path, raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw, number - 1)
                if not line.strip():
                    continue
                seen = True
                value, problem, _ = _parse(line)
                if problem:
                    yield number, DataError(path, number, None, problem, reason="bad-json", unit="line")
                    continue
                yield number, _object(path, number, value, "line", bool(_SURROGATE_ESCAPE.search(line)))
        if not seen:
            raise DataError(path, None, None, "the file is empty", reason="empty-file")


@hookimpl
def register_data_readers(register):
    register("json", JsonReader, description="a JSON array of row objects (.json)")
    register("jsonl", JsonLinesReader, description="JSON Lines, one row object per line (.jsonl)")
