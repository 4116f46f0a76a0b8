"""Data readers `json` (one array of objects) and `jsonl` (one object per line), UTF-8.

Rows are numbered from 1: the Nth element of the array, or line N of a JSON Lines file.
A bad row is yielded as a `DataError` in place of the row, so a skip policy can go on; a bad
file raises (after the rows before the fault, which a caller must not act on before the file
is read to its end, as `sft run` does not). Neither reader holds the file in memory: JSON
Lines is read a line at a time, a JSON array an element at a time from blocks of text (only
an array wrapped in an object, ``{"train": [...]}``, is parsed whole).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from sftcore import hookimpl
from sftcore.errors import DataError

# A JSON escape that may decode to half a UTF-16 surrogate pair; only then are strings checked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(path, None, None, f"cannot read file: {exc.strerror or exc}", reason="unreadable") from None


def _not_utf8(path: str, line: int, byte: int) -> DataError:
    # Raised, not yielded, even under --on-bad-row skip: a file saved in another encoding would
    # otherwise lose every row with an accent, silently.
    return DataError(
        path, line, None, f"not valid UTF-8 (byte 0x{byte:02x}); re-save the file as UTF-8",
        reason="not-utf8", unit="line",
    )


def _read_text(path: str) -> str:
    with _open(path) as handle:
        try:
            raw = handle.read()
        except OSError as exc:
            raise DataError(path, None, None, f"cannot read file: {exc.strerror or exc}", reason="unreadable") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, raw[: exc.start].count(b"\n") + 1, raw[exc.start]) from None


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


BLOCK = 1 << 20  # bytes read at a time by the streaming JSON array reader
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


# Text that parsing could still reach past an error: "tru" of a `true` at a block's end fails at
# the literal's start, "\\u00" of an escape at the escape; nothing JSON holds is longer.
_LOOKAHEAD = 16


def _maybe_cut_short(exc: json.JSONDecodeError, length: int) -> bool:
    """Whether a parse error could come from the text ending too soon, not from the JSON itself.

    An unterminated string can run on into the next block; any other error that lies more than
    `_LOOKAHEAD` characters before the end is in the text itself, so the file is not read on.
    """
    return exc.msg.startswith("Unterminated string") or length - exc.pos <= _LOOKAHEAD


class _Text:
    """A UTF-8 file as text, read a block at a time: ``text[pos:]`` is what is not parsed yet.

    Parsed text is dropped at the start of a value once it is over a block, counting its lines
    and the columns of a line it cuts, so an error anywhere names its line and column.
    """

    def __init__(self, path: str, handle: Any) -> None:
        self.path, self.handle = path, handle
        self.text, self.pos, self.lines_before, self.columns_before, self.eof = "", 0, 0, 0, False
        self._raw_lines, self._carry, self._started = 0, b"", False

    def more(self) -> bool:
        """Append the next block's text; False once the file is read to its end."""
        if self.eof:
            return False
        try:
            block = self.handle.read(BLOCK)
        except OSError as exc:
            raise DataError(self.path, None, None, f"cannot read file: {exc.strerror or exc}", reason="unreadable") from None
        data = self._carry + block
        if not self._started:
            self._started = True
            if data.startswith(codecs.BOM_UTF8):
                data = data[len(codecs.BOM_UTF8):]
        self.eof = not block
        try:
            text, used = codecs.utf_8_decode(data, "strict", self.eof)  # an unfinished character waits for the next block
        except UnicodeDecodeError as exc:
            raise _not_utf8(self.path, self._raw_lines + data[: exc.start].count(b"\n") + 1, data[exc.start]) from None
        self._raw_lines += data[:used].count(b"\n")
        self._carry = data[used:]
        self.text += text
        return True

    def drop_parsed(self) -> None:
        """Forget the text before ``pos`` once it is over a block, keeping count of lines and columns."""
        cut = self.pos
        if cut <= BLOCK:
            return
        newlines = self.text.count("\n", 0, cut)
        self.lines_before += newlines
        # Characters of the line `cut` falls in that are dropped: columns still count them.
        self.columns_before = cut - self.text.rfind("\n", 0, cut) - 1 if newlines else self.columns_before + cut
        self.text, self.pos = self.text[cut:], 0

    def line(self, pos: int) -> int:
        return self.lines_before + self.text.count("\n", 0, pos) + 1

    def column(self, pos: int) -> int:
        newline = self.text.rfind("\n", 0, pos)
        return pos - newline if newline >= 0 else self.columns_before + pos + 1

    def next_char(self) -> str:
        """The next character that is not whitespace ("" at the end of the file), not consumed."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def value(self) -> tuple[Any, int]:
        """The JSON value at ``pos`` and where it starts; more is read until it parses or the file ends.

        Each retry first doubles the text after the value's start, so a value of many blocks is
        parsed a few times, not once per block.
        """
        self.drop_parsed()
        start = self.pos
        while True:
            try:
                value, self.pos = _DECODER.raw_decode(self.text, start)
                return value, start
            except json.JSONDecodeError as exc:
                if self.eof or not _maybe_cut_short(exc, len(self.text)):
                    raise self.error(f"invalid JSON: {exc.msg}", exc.pos) from None
                target = 2 * (len(self.text) - start)
                while self.more() and len(self.text) - start < target:
                    pass
            except RecursionError:
                raise self.error("invalid JSON: nested too deeply", start) from None
            except ValueError as exc:  # an integer of more than 4300 digits
                raise self.error(f"invalid JSON: {str(exc).split(';')[0]}", start) from None

    def error(self, message: str, pos: int) -> DataError:
        message = f"{message} (column {self.column(pos)})"
        return DataError(self.path, self.line(pos), None, message, reason="bad-json", unit="line")


class JsonReader:
    suffixes = (".json",)

    def read(self, path: str) -> Iterator[tuple[int, Mapping[str, Any] | DataError]]:
        with _open(path) as handle:
            source = _Text(path, handle)
            first = source.next_char()
            if not first:
                raise DataError(path, None, None, "the file is empty", reason="empty-file")
            if first == "[":
                yield from self._elements(path, source)
                return
        yield from self._whole(path)  # a wrapper object, or not an array: the messages of a whole parse

    @staticmethod
    def _elements(path: str, source: _Text) -> Iterator[tuple[int, Mapping[str, Any] | DataError]]:
        source.pos += 1  # "["
        index = 0
        if source.next_char() == "]":
            source.pos += 1
        else:
            while True:
                value, start = source.value()
                index += 1
                escaped = bool(_SURROGATE_ESCAPE.search(source.text, start, source.pos))
                yield index, _object(path, index, value, "row", escaped)
                after = source.next_char()
                source.pos += 1
                if after == "]":
                    break
                if after != ",":
                    raise source.error("invalid JSON: Expecting ',' delimiter" if after else "invalid JSON: unterminated array", source.pos - 1)
                if source.next_char() == "]":
                    raise source.error("invalid JSON: Illegal trailing comma before end of array", source.pos)
        if source.next_char():
            raise source.error("invalid JSON: Extra data", source.pos)

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
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(path, number, raw[exc.start]) from None
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
