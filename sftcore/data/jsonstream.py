"""A JSON array read an element at a time from blocks of a UTF-8 file, for data readers.

Memory holds a block or two of text and the element being parsed, not the file. An error names
the line and column a whole parse (``json.loads``) would name, and a syntax error is reported
where it is, without reading the rest of the file; an element cut by a block's end is read on.
Errors raise `DataError` (reason ``bad-json``, ``not-utf8`` or ``unreadable``).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import Any

from sftcore.errors import DataError

BLOCK = 1 << 20  # bytes read at a time
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
            raise not_utf8(self.path, self._raw_lines + data[: exc.start].count(b"\n") + 1, data[exc.start]) from None
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
                value, end = _DECODER.raw_decode(self.text, start)
                # A number near the text's end may go on in the next block: "12" of "12345",
                # "-1.5" of "-1.5e3". Nothing else JSON holds can parse whole and be cut short.
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if number and len(self.text) - end <= _LOOKAHEAD and self.more():
                    continue
                self.pos = end
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


def not_utf8(path: str, line: int, byte: int) -> DataError:
    # Raised, not yielded, even under --on-bad-row skip: a file saved in another encoding would
    # otherwise lose every row with an accent, silently.
    return DataError(
        path, line, None, f"not valid UTF-8 (byte 0x{byte:02x}); re-save the file as UTF-8",
        reason="not-utf8", unit="line",
    )


NOT_AN_ARRAY = object()
"""What `array_elements` yields first, and alone, when the file's first character is not ``[``."""


def array_elements(path: str, handle: Any) -> Iterator[Any]:
    """``(index, value, raw)`` for each element of the JSON array in ``handle`` (binary, UTF-8,
    a BOM allowed), numbered from 1, ``raw`` its JSON text; `NOT_AN_ARRAY` alone for anything
    but an array. An empty file raises `DataError` (reason ``empty-file``).
    """
    source = _Text(path, handle)
    first = source.next_char()
    if not first:
        raise DataError(path, None, None, "the file is empty", reason="empty-file")
    if first != "[":
        yield NOT_AN_ARRAY
        return
    source.pos += 1  # "["
    index = 0
    if source.next_char() == "]":
        source.pos += 1
    else:
        while True:
            value, start = source.value()
            index += 1
            yield index, value, source.text[start : source.pos]
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

