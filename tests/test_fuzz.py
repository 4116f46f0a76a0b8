"""Random bytes and random JSON through the readers, the template, the masker and `sft preview`.

Whatever the file holds, the only thing that may escape is an `SftError` (one line, no
traceback), and every row that gets through is real text the tokenizer accepts.
"""

from __future__ import annotations

import json

import pytest
from cli_runs import sft
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sftcore.errors import SftError
from sftcore.data.pipeline import Prepared, format_rows, read_rows
from sftcore_plugins.alpaca import AlpacaTemplate
from sftcore_plugins.masking import SeparateMasker
from sftcore_plugins.readers import JsonLinesReader, JsonReader

FIELDS = ("instruction", "input", "output")
# Characters of every category, lone surrogates included: json.dumps escapes them as \udXXX.
any_text = st.text(st.characters(exclude_categories=()), max_size=24)
scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | any_text
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS) | any_text, inner, max_size=3),
    max_leaves=12,
)
# Rows that are mostly Alpaca-shaped: the template path gets exercised, not only the parser.
rows = st.fixed_dictionaries({}, optional={name: any_text | values for name in FIELDS}) | values

# Byte strings spliced into a file: each has broken a JSON reader somewhere.
NASTY = [
    b"\xff", b"\xc3", b"\xef\xbb\xbf", b"\x00", b"\n", b"\r\n", b"\xe2\x80\xa8", b'"', b"\\", b"\\ud800",
    b"\\udfff\\ud800", b"[" * 3000, b'{"a":' * 1200, b"7" * 5000, b"NaN", b"-Infinity", b"1e999", b"]", b"}", b",",
]


@st.composite
def files(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".jsonl", ".json"]))
    drawn = draw(st.lists(rows, max_size=6))
    if suffix == ".jsonl":
        data = "".join(json.dumps(row) + "\n" for row in drawn).encode()
    else:
        top = draw(st.sampled_from(["list", "wrapped", "scalar"]))
        shaped = {"list": drawn, "wrapped": {"train": drawn}, "scalar": drawn[0] if drawn else None}[top]
        data = json.dumps(shaped).encode()
    for _ in range(draw(st.integers(0, 3))):  # splice: delete a run of bytes, insert something nasty or random
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 8))
        insert = draw(st.sampled_from(NASTY) | st.binary(max_size=6))
        data = data[:at] + insert + data[at + cut :]
    if draw(st.booleans()):
        data = draw(st.binary(max_size=64))  # and sometimes nothing but noise
    return suffix, data


READERS = {".jsonl": JsonLinesReader(), ".json": JsonReader()}


@settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=files())
def test_reader_template_and_masker_let_only_sft_errors_escape(tmp_path_factory, tiny_tokenizer_session, case):
    suffix, data = case
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    path.write_bytes(data)
    for on_bad_row in ("skip", "error"):
        prepared = Prepared()
        try:
            items = format_rows(AlpacaTemplate(), read_rows(READERS[suffix], str(path)), str(path), on_bad_row, prepared)
        except SftError as exc:
            assert "\n" not in str(exc)
            str(exc).encode("utf-8")  # the message can be printed
            continue
        assert prepared.rows_read == len(items) + sum(prepared.skipped.values())
        for item in items:
            (item.prompt + item.response).encode("utf-8")  # real text, nothing a tokenizer rejects
        results = SeparateMasker().batch([i.prompt for i in items], [i.response for i in items], tiny_tokenizer_session, 64)
        for result in results:
            assert isinstance(result, dict) or result.reason in ("too-long", "prompt-too-long")


@pytest.fixture(scope="session")
def tiny_tokenizer_session():
    from transformers import AutoTokenizer

    from sftcore.assets import TINY_LLAMA

    return AutoTokenizer.from_pretrained(TINY_LLAMA)


@settings(
    max_examples=100, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=files(), on_bad_row=st.sampled_from(["skip", "error"]))
def test_preview_answers_any_file_with_output_or_one_error_line(monkeypatch, tmp_path, tiny_model_dir, case, on_bad_row):
    suffix, data = case
    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    # catch_exceptions=False in `sft`: anything but an SftError fails the test with its traceback.
    result = sft(monkeypatch, "preview", "--model", tiny_model_dir, "--data", path, "--json", "--on-bad-row", on_bad_row)
    event(f"exit code {result.exit_code}")  # --hypothesis-show-statistics: how often each outcome came up
    if result.exit_code == 0:
        for line in result.stdout.splitlines():
            record = json.loads(line)
            assert "dropped" in record or any(label != -100 for label in record["labels"])
    else:
        assert result.exit_code in (1, 2)
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
