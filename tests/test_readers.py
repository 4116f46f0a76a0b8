"""The `json` and `jsonl` readers: rows numbered as a user finds them, bad rows and files located."""

from __future__ import annotations

import json

import pytest

from sftcore.errors import DataError, UsageError
from sftcore.data.pipeline import pick_reader, read_rows
from sftcore_plugins.readers import JsonLinesReader, JsonReader

ROWS = [{"instruction": "a", "output": "b"}, {"instruction": "ç 中", "input": "", "output": "- d"}]


def read(reader, path):
    return list(reader.read(str(path)))


def test_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    assert read(JsonReader(), path) == [(1, ROWS[0]), (2, ROWS[1])]


def test_json_wrapped_in_one_key(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"train": ROWS}), encoding="utf-8")
    assert [row for _, row in read(JsonReader(), path)] == ROWS


def test_json_not_an_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"instruction": "a", "output": "b"}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON array of objects, got dict"):
        read(JsonReader(), path)


def test_jsonl_numbers_lines_and_skips_blank_ones(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1], ensure_ascii=False) + "\n", encoding="utf-8")
    assert read(JsonLinesReader(), path) == [(1, ROWS[0]), (4, ROWS[1])]


@pytest.mark.parametrize(("reader", "suffix"), [(JsonReader(), ".json"), (JsonLinesReader(), ".jsonl")])
def test_utf8_bom_is_accepted(tmp_path, reader, suffix):
    path = tmp_path / f"bom{suffix}"
    if suffix == ".json":
        text = json.dumps(ROWS, ensure_ascii=False)
    else:
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert [row for _, row in read(reader, path)] == ROWS


@pytest.mark.parametrize(("reader", "suffix"), [(JsonReader(), ".json"), (JsonLinesReader(), ".jsonl")])
@pytest.mark.parametrize("content", ["", "\n  \n", "\ufeff"])
def test_empty_file(tmp_path, reader, suffix, content):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read(reader, path)
    assert info.value.reason == "empty-file"
    assert str(info.value) == f"{path}: the file is empty"


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read(JsonReader(), path)
    assert info.value.reason == "bad-json" and info.value.row == 3
    assert str(info.value).startswith(f"{path}, line 3: invalid JSON: Expecting ',' delimiter")


def test_invalid_jsonl_line_is_yielded_in_place(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + '\n{"instruction": \n' + json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    rows = read(JsonLinesReader(), path)
    assert [n for n, _ in rows] == [1, 2, 3]
    assert rows[0][1] == rows[2][1] == ROWS[0]
    error = rows[1][1]
    assert isinstance(error, DataError) and error.reason == "bad-json" and error.row == 2
    assert str(error).startswith(f"{path}, line 2: invalid JSON")


@pytest.mark.parametrize(
    ("reader", "suffix", "text", "unit", "kind"),
    [
        (JsonReader(), ".json", json.dumps([ROWS[0], ["a", "b"], "text"]), "row", "list"),
        (JsonLinesReader(), ".jsonl", json.dumps(ROWS[0]) + "\n[1, 2]\n\"text\"\n", "line", "list"),
    ],
)
def test_non_object_rows_are_data_errors(tmp_path, reader, suffix, text, unit, kind):
    path = tmp_path / f"rows{suffix}"
    path.write_text(text, encoding="utf-8")
    rows = read(reader, path)
    assert rows[0] == (1, ROWS[0])
    for number, expected in ((2, kind), (3, "str")):
        got_number, error = rows[number - 1]
        assert got_number == number and isinstance(error, DataError)
        assert error.reason == "not-an-object" and error.row == number
        assert str(error) == f"{path}, {unit} {number}: expected a JSON object, got {expected}"


@pytest.mark.parametrize(("reader", "suffix"), [(JsonReader(), ".json"), (JsonLinesReader(), ".jsonl")])
def test_non_utf8_bytes_name_the_line(tmp_path, reader, suffix):
    path = tmp_path / f"latin1{suffix}"
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[0]), '{"instruction": "caf\xe9", "output": "x"}']
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DataError) as info:
        read(reader, path)
    assert info.value.reason == "not-utf8" and info.value.row == 3
    assert str(info.value) == f"{path}, line 3: not valid UTF-8 (byte 0xe9); re-save the file as UTF-8"


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(DataError) as info:
        read(JsonLinesReader(), tmp_path)  # a directory
    assert info.value.reason == "unreadable"
    with pytest.raises(DataError, match="no such file") as info:
        list(read_rows(JsonLinesReader(), str(tmp_path / "missing.jsonl")))
    assert info.value.reason == "missing-file"


def test_reader_is_picked_by_suffix(builtin_host, tmp_path):
    assert isinstance(pick_reader(builtin_host.registry, "data.JSONL"), JsonLinesReader)
    assert isinstance(pick_reader(builtin_host.registry, "data.ndjson"), JsonLinesReader)
    assert isinstance(pick_reader(builtin_host.registry, "data.json"), JsonReader)
    assert isinstance(pick_reader(builtin_host.registry, "data.txt", "jsonl"), JsonLinesReader)
    with pytest.raises(UsageError, match=r"data.csv: no reader for '.csv' files; known: .json, .jsonl, .ndjson"):
        pick_reader(builtin_host.registry, "data.csv")


# ---- the JSON array, read an element at a time ----------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sftcore.data.jsonstream as readers  # noqa: E402  (its BLOCK sets the block size)

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # "中", "é", emoji: split across blocks
# Literals, numbers and escapes cut by a block's end must be read on, not reported.
VALUE = st.one_of(st.booleans(), st.none(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), TEXT)
ROW = st.fixed_dictionaries(
    {"instruction": TEXT, "output": TEXT}, optional={"input": TEXT, "n": VALUE, "tags": st.lists(VALUE, max_size=4)}
)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(ROW, max_size=12), block=st.integers(1, 64), indent=st.sampled_from([None, 0, 2]),
       ascii_only=st.booleans())
def test_a_json_array_read_in_blocks_gives_what_a_whole_parse_gives(tmp_path_factory, rows, block, indent, ascii_only):
    path = tmp_path_factory.mktemp("blocks") / "rows.json"
    path.write_bytes(json.dumps(rows, indent=indent, ensure_ascii=ascii_only).encode("utf-8"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(readers, "BLOCK", block)
        assert read(JsonReader(), path) == list(enumerate(rows, start=1))


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
@pytest.mark.parametrize(
    "text",
    [
        '[\n  {"instruction": "a", "output": "b"},\n' * 1 + '  {"instruction": "c" "output": "d"}\n]',
        '[\n' + '  {"instruction": "a", "output": "b"},\n' * 40 + '  {"instruction": "c", "output": "d"},\n]',
        '[\n' + '  {"instruction": "a", "output": "b"},\n' * 40 + '  {"instruction": "c", "output": \n',
        '[\n' + '  {"instruction": "a", "output": "b"},\n' * 40 + '  {"instruction": "c", "output": "d"}\n]\n{}',
        '[\n' + '  {"instruction": "a", "output": "b"},\n' * 40 + '  {"instruction": "c", "output": "d"} ; \n]',
        "[" + '{"instruction": "a", "output": "b"}, ' * 40 + '{"instruction": "c" "output": "d"}]',
        "[" + '{"instruction": "a", "output": "b"}, ' * 40 + '{"instruction": "c", "output": "d"}, ]',
    ],
    ids=["missing-comma", "trailing-comma", "cut-short", "extra-data", "bad-delimiter", "one-line", "one-line-trailing"],
)
def test_a_json_array_error_names_the_line_a_whole_parse_names(tmp_path, monkeypatch, block, text):
    monkeypatch.setattr(readers, "BLOCK", block)
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as whole:
        json.loads(text)
    with pytest.raises(DataError) as info:
        read(JsonReader(), path)
    assert info.value.reason == "bad-json" and info.value.row == whole.value.lineno, str(info.value)
    assert str(info.value).startswith(f"{path}, line {whole.value.lineno}: invalid JSON: ")
    assert str(info.value).endswith(f"(column {whole.value.colno})")


def test_a_non_utf8_byte_deep_in_a_json_array_names_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BLOCK", 16)
    path = tmp_path / "late.json"
    lines = ["["] + [json.dumps(ROWS[0]) + "," for _ in range(30)] + ['{"instruction": "caf\xe9", "output": "x"}', "]"]
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DataError) as info:
        read(JsonReader(), path)
    assert (info.value.reason, info.value.row) == ("not-utf8", 32)


@pytest.mark.parametrize("separator", [",\n", ", "], ids=["a-row-a-line", "one-line"])
def test_a_large_json_array_is_never_held_whole(tmp_path, separator):
    """24 MB of rows read with memory for a few blocks, not the file, also when it is one line."""
    import tracemalloc

    path = tmp_path / "large.json"
    row = json.dumps({"instruction": "Describe the sea. " * 20, "output": "Blue and wide. " * 40})
    count = 24_000_000 // len(row)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[" + separator.join([row] * count) + "]")
    tracemalloc.start()
    try:
        seen = sum(1 for _ in JsonReader().read(str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count
    assert peak < 8 * readers.BLOCK, f"peak {peak / 2**20:.1f} MiB"


def test_a_syntax_error_early_in_a_large_json_array_is_reported_without_reading_on(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(readers, "BLOCK", 4096)
    path = tmp_path / "early.json"
    row = json.dumps(ROWS[0])
    path.write_text("[\n" + row + ",\n" + '{"instruction": "c" "output": "d"},\n' + ",\n".join([row] * 100_000) + "\n]", encoding="utf-8")
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            read(JsonReader(), path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.value.reason, info.value.row) == ("bad-json", 3)
    assert peak < 64 * 4096, f"peak {peak} bytes: the file was read on past the error"


JSON_VALUE = st.recursive(
    st.one_of(st.booleans(), st.none(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(JSON_VALUE, max_size=8), block=st.integers(1, 16), indent=st.sampled_from([None, 1]))
def test_any_array_read_in_blocks_gives_the_values_of_a_whole_parse(values, block, indent):
    """Bare numbers as elements too: "12" at a block's end must not be taken for the "12345" it starts."""
    import io

    text = json.dumps(values, indent=indent, ensure_ascii=False)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(readers, "BLOCK", block)
        got = [value for _, value, _ in readers.array_elements("f.json", io.BytesIO(text.encode("utf-8")))]
    assert got == json.loads(text)


@pytest.mark.parametrize("wrapped", [False, True], ids=["array", "wrapped-array"])
def test_a_bad_byte_after_a_bom_is_named_with_its_line(tmp_path, monkeypatch, wrapped):
    monkeypatch.setattr(readers, "BLOCK", 16)  # past the first block: a wrapped array is then parsed whole
    path = tmp_path / "bom.json"
    rows = [json.dumps(ROWS[0]) + ",\n" for _ in range(5)] + ['{"instruction": "caf\xe9", "output": "x"}']
    body = "[\n" + "".join(rows) + "]"
    text = '{"train": ' + body + "}" if wrapped else body
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("latin-1"))
    with pytest.raises(DataError) as info:
        read(JsonReader(), path)
    assert (info.value.reason, info.value.row) == ("not-utf8", 7)
    assert "(byte 0xe9)" in str(info.value)


def test_a_bad_byte_on_the_first_line_of_json_lines_after_a_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError) as info:
        read(JsonLinesReader(), path)
    assert (info.value.row, str(info.value).endswith("(byte 0xe9); re-save the file as UTF-8")) == (1, True)
