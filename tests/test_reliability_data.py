"""Bad and awkward data: duplicates, rows the JSON parser chokes on, multi-megabyte rows, streaming."""

from __future__ import annotations

import json
import random

import pytest
from cli_runs import ROWS, forbid_model_loading, json_lines, sft, write_jsonl

from sftcore import tokens
from sftcore.errors import DataError
from sftcore.data.pipeline import Prepared, format_rows, read_rows
from sftcore_plugins.alpaca import AlpacaTemplate
from sftcore_plugins.masking import SeparateMasker
from sftcore_plugins.readers import JsonLinesReader, JsonReader

# Rows 3 and 5 repeat row 1 (5 only up to whitespace the template strips); row 4 differs in its answer.
DUPLICATED = [
    {"instruction": "Say hi.", "output": "hi"},
    {"instruction": "Say bye.", "output": "bye"},
    {"instruction": "Say hi.", "output": "hi"},
    {"instruction": "Say hi.", "output": "hello"},
    {"instruction": "Say hi.", "input": "", "output": "hi  \n"},
]


def formatted(rows, on_duplicate, path="data.jsonl"):
    prepared = Prepared()
    items = format_rows(AlpacaTemplate(), enumerate(rows, start=1), path, "error", prepared, on_duplicate)
    return [item.row for item in items], prepared


def test_duplicates_are_kept_and_counted_by_default():
    kept, prepared = formatted(DUPLICATED, "keep")
    assert kept == [1, 2, 3, 4, 5]
    assert prepared.duplicates == 2 and not prepared.skipped


def test_duplicates_can_be_skipped_and_counted_as_skipped():
    kept, prepared = formatted(DUPLICATED, "skip")
    assert kept == [1, 2, 4]
    assert prepared.duplicates == 2 and prepared.skipped == {"duplicate": 2}


def test_a_duplicate_under_error_names_the_file_the_row_and_the_first_row():
    with pytest.raises(DataError) as info:
        formatted(DUPLICATED, "error")
    assert info.value.reason == "duplicate"
    assert str(info.value) == (
        "data.jsonl, row 3: same prompt and response as row 1; pass --on-duplicate keep or skip to allow it"
    )


def test_duplicate_keys_cannot_collide_across_the_seam():
    """("ab", "c") and ("a", "bc") concatenate alike; they are different rows."""

    class Raw:
        def format(self, row):
            return row["p"], row["r"]

    prepared = Prepared()
    rows = [{"p": "ab", "r": "c"}, {"p": "a", "r": "bc"}, {"p": "ab", "r": "c"}]
    items = format_rows(Raw(), enumerate(rows, start=1), "d.jsonl", "error", prepared, "skip")
    assert [i.row for i in items] == [1, 2] and prepared.duplicates == 1


def test_preview_applies_the_duplicate_policy(monkeypatch, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", DUPLICATED)
    shown = sft(monkeypatch, "preview", "--model", tiny_model_dir, "--data", data, "--json", "--on-duplicate", "skip")
    assert shown.exit_code == 0, shown.output
    assert [r["row"] for r in json_lines(shown.stdout)] == [1, 2, 4]


def test_duplicate_error_stops_run_with_one_line_before_the_model_loads(monkeypatch, tmp_path, tiny_model_dir):
    forbid_model_loading(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", DUPLICATED)
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "out",
        "--on-duplicate", "error", "--no-progress",
    )
    assert result.exit_code == 1
    assert result.stderr == f"Error: {data}, row 3: same prompt and response as row 1; pass --on-duplicate keep or skip to allow it\n"


def test_validate_rejects_an_unknown_duplicate_policy(monkeypatch, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("on_duplicate: drop\n")
    result = sft(monkeypatch, "validate", config_file)
    assert result.exit_code == 2
    assert "on_duplicate must be 'keep', 'skip' or 'error', got 'drop'" in result.stderr


@pytest.mark.slow
def test_run_summary_counts_kept_duplicates(monkeypatch, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", DUPLICATED)
    output = tmp_path / "out"
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", output,
        "--max-steps", 1, "--batch-size", 2, "--no-progress",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["rows_used"], summary["duplicates"]) == (5, 2)
    assert result.stdout.splitlines()[0].endswith("truncated: none; duplicates: 2")


# What json.loads raises besides JSONDecodeError, and strings that are not text: each is one bad row.
AWKWARD_LINES = [
    pytest.param("[" * 100_000 + "]" * 100_000, None, "invalid JSON: nested too deeply", id="deep-nesting"),
    pytest.param('{"instruction": ' + "7" * 5000 + "}", None, "invalid JSON: Exceeds the limit", id="huge-integer"),
    pytest.param('{"instruction": "a", "output": "b\\ud800"}', "output", "has an unpaired", id="lone-surrogate"),
    pytest.param(
        '{"instruction": "a", "output": ' + '{"x": [' * 300 + '"\\udfff"' + "]}" * 300 + "}",
        "output", "has an unpaired", id="nested-lone-surrogate",
    ),
    pytest.param('{"instruction": "a", "output": "b", "k\\udc00": 1}', "k\\udc00", "has an unpaired", id="surrogate-key"),
]


@pytest.mark.parametrize(("line", "field", "message"), AWKWARD_LINES)
def test_rows_the_json_parser_chokes_on_are_located_bad_rows(tmp_path, line, field, message):
    path = tmp_path / "awkward.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    rows = list(JsonLinesReader().read(str(path)))
    assert [n for n, _ in rows] == [1, 2, 3]
    assert rows[0][1] == ROWS[0] and rows[2][1] == ROWS[1]
    error = rows[1][1]
    assert isinstance(error, DataError) and error.row == 2 and error.field == field
    assert message in str(error)
    assert str(error).startswith(f"{path}, line 2{'' if field is None else f', field {chr(39)}{field}{chr(39)}'}: ")
    str(error).encode("utf-8")  # printable: the message itself carries no surrogate

    # Under --on-bad-row skip the run goes on without the row and counts it.
    prepared = Prepared()
    items = format_rows(AlpacaTemplate(), iter(rows), str(path), "skip", prepared)
    assert [i.row for i in items] == [1, 3] and sum(prepared.skipped.values()) == 1


def test_json_array_with_a_lone_surrogate_names_the_row(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "\\ud83d", "output": "b"}]', encoding="utf-8")
    rows = list(JsonReader().read(str(path)))
    assert rows[0][1] == {"instruction": "a", "output": "b"}
    assert str(rows[1][1]).startswith(f"{path}, row 2, field 'instruction': has an unpaired")


def test_paired_surrogate_escapes_are_ordinary_text(tmp_path):
    path = tmp_path / "emoji.jsonl"
    path.write_text('{"instruction": "\\ud83d\\ude00", "output": "b"}\n', encoding="utf-8")
    assert list(JsonLinesReader().read(str(path))) == [(1, {"instruction": "\U0001f600", "output": "b"})]


def test_line_separator_inside_a_string_does_not_split_the_row(tmp_path):
    path = tmp_path / "ls.jsonl"
    row = {"instruction": "one\u2028two\u0085three", "output": "b\x1cc"}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n" + json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    assert list(JsonLinesReader().read(str(path))) == [(1, row), (2, ROWS[0])]


def test_jsonl_is_streamed(tmp_path):
    """The first rows arrive before the reader has seen the rest of the file."""
    path = tmp_path / "stream.jsonl"
    path.write_bytes((json.dumps(ROWS[0]) + "\n").encode() + b'{"instruction": "caf\xe9"}\n')
    rows = JsonLinesReader().read(str(path))
    assert next(rows) == (1, ROWS[0])
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8 \(byte 0xe9\)"):
        next(rows)


def test_non_utf8_stops_even_when_skipping_bad_rows(tmp_path):
    """A file in another encoding would otherwise silently lose every row with an accent."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(ROWS[0]) + "\n").encode() + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as info:
        format_rows(AlpacaTemplate(), read_rows(JsonLinesReader(), str(path)), str(path), "skip", Prepared())
    assert info.value.reason == "not-utf8"


def huge_text(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "épsilon", "中文", "-", "12345", "\n", "  "]
    parts, size = [], 0
    while size < chars:
        word = rng.choice(words)
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)


def outcome(result):
    """A masked row, or the reason it was dropped (RowDropped compares by identity)."""
    return result if isinstance(result, dict) else ("dropped", result.reason)


@pytest.mark.parametrize("truncation", ["prompt-left", "right", "drop"])
@pytest.mark.parametrize("long_side", ["instruction", "output"])
def test_a_multi_megabyte_row_is_never_tokenized_whole(monkeypatch, tiny_tokenizer, truncation, long_side):
    """The masker clips text to what max_length can use before tokenizing; the result is the same."""
    text = huge_text(4_000_000)
    masker = SeparateMasker(truncation=truncation)
    longest = []
    real = tokens.encode_texts

    def spy(tokenizer, texts):
        longest.append(max(map(len, texts)))
        return real(tokenizer, texts)

    def mask(long_text):
        prompt, response = AlpacaTemplate().format({"instruction": "Summarise.", "output": "ok", long_side: long_text})
        return outcome(masker.batch([prompt], [response], tiny_tokenizer, 64)[0])

    monkeypatch.setattr("sftcore.tokens.encode_texts", spy)  # what encode_prompts calls
    monkeypatch.setattr("sftcore_plugins.masking.encode_texts", spy)
    clipped = mask(text)
    assert longest and max(longest) < 20_000, longest
    if truncation == "drop":
        assert clipped == ("dropped", "too-long")
    elif truncation == "right" and long_side == "instruction":
        assert clipped == ("dropped", "prompt-too-long")
    else:
        assert len(clipped["input_ids"]) == 64 and any(label != -100 for label in clipped["labels"])

    # 300 kB of the text (the part truncation keeps), with and without clipping: the same ids and labels.
    keeps_tail = long_side == "instruction" and truncation != "right"
    shorter = text[-300_000:] if keeps_tail else text[:300_000]
    with_clip = mask(shorter)
    monkeypatch.setattr(tokens, "CLIP_MARGIN", 10**9)
    without = mask(shorter)
    assert max(longest) >= 300_000, "the second call tokenized the whole text"
    assert with_clip == without == clipped


def test_a_multi_megabyte_row_trains_through_preview(monkeypatch, tmp_path, tiny_model_dir):
    rows = [ROWS[0], {"instruction": huge_text(3_000_000, seed=1), "output": "short answer"}, ROWS[1]]
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    assert data.stat().st_size > 3_000_000
    shown = sft(monkeypatch, "preview", "--model", tiny_model_dir, "--data", data, "--json", "--max-length", 128)
    assert shown.exit_code == 0, shown.output[-2000:]
    records = json_lines(shown.stdout)
    assert [r["row"] for r in records] == [1, 2, 3]
    big = records[1]
    assert big["truncated"] == "prompt" and len(big["input_ids"]) == 128
    assert sum(label != -100 for label in big["labels"]) >= 3, "the answer and EOS are still trained"
