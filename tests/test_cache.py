"""Prepared data: the batched, multi-process and cached paths give exactly the row-by-row masker's
rows; the cache key follows every input; a damaged entry is ignored and rebuilt; `sft prepare`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from cli_runs import LONG_ROW, ROWS, sft, write_jsonl

import sftcore
from sftcore import config as cfg
from sftcore.data import pipeline
from sftcore.assets import DEMO_DATA, TINY_LLAMA
from sftcore.data.cache import FlatRows, entry_path, key_parts, load, make_key
from sftcore.errors import FieldError, RowDropped
from sftcore.tokens import _backend_encode, encode_texts
from sftcore.data.prepare import build_stage, load_tokenizer, prepare_data
from sftcore_plugins.flash import FlashLoader

EDGE_ROWS = [
    *ROWS,
    ROWS[0],  # an exact duplicate: encoded once, must come out twice
    {"instruction": "Quote the tag.", "input": "", "output": "It is </s> and <s>, then <pad> as text."},
    {"instruction": "Répondez en français, s'il vous plaît 🙂", "input": "日本語の入力", "output": "D'accord — voilà."},
    {"instruction": "  ", "output": "an empty instruction is a bad row"},
    {"instruction": "Summarise.", "input": " ".join(["context"] * 150), "output": "Short."},  # prompt cut
    LONG_ROW,  # response cut (or dropped under truncation=drop)
    {"instruction": "Leading spaces and newlines.", "input": "\n\n", "output": "\n  indented\n\nanswer  "},
]
TEXTS = ["Hello </s> world <s> <|endoftext|> x", "  leading", "", "\n\n### Response:\n- a", "héllo 你好 🙂", "Hello </s> world <s> <|endoftext|> x"]


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path / "sft-cache"))
    for var in ("SFT_DISABLE_PLUGINS", "SFT_STRICT_PLUGINS", "SFT_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "sft-cache" / "prepared"


def run_config(data, model=TINY_LLAMA, **extra) -> dict:
    return cfg.effective({"model": str(model), "data": str(data), **extra})


def row_by_row(host, config) -> tuple[list[dict], dict]:
    """What the masker makes of each row called alone: the reference every path must equal."""
    reader = pipeline.pick_reader(host.registry, config["data"])
    template, masker = build_stage(host, config, "template"), build_stage(host, config, "masker")
    tokenizer = load_tokenizer(host, config, config["model"])
    rows, dropped, skipped = [], {}, {}
    for number, row in reader.read(config["data"]):
        try:
            prompt, response = template.format(row)
        except FieldError as exc:
            skipped[number] = exc.reason
            continue
        try:
            masked = masker(prompt, response, tokenizer, config["max_length"])
        except RowDropped as exc:
            dropped[number] = exc.reason
            continue
        rows.append({**masked, "row": number})
    return rows, {"dropped": dropped, "skipped": skipped}


def assert_same_rows(prepared, reference) -> None:
    rows, counts = reference
    assert [dict(r) for r in prepared.rows] == rows
    assert prepared.dropped_rows == counts["dropped"]
    assert sum(prepared.skipped.values()) == len(counts["skipped"])
    assert prepared.rows_read == len(rows) + len(counts["dropped"]) + len(counts["skipped"])
    assert prepared.tokens == sum(len(r["input_ids"]) for r in rows)
    assert prepared.supervised_tokens == sum(label != -100 for r in rows for label in r["labels"])


@pytest.mark.parametrize("family", ["tiny", "gpt2", "llama3", "sentencepiece"])
def test_backend_encoding_is_the_tokenizer_call(toks, family):
    tok = getattr(toks, family)()
    expected = [list(ids) for ids in tok(TEXTS, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
    tok.backend_tokenizer.encode_special_tokens = False  # transformers' call above leaves it on
    assert _backend_encode(tok, TEXTS) is not None, "the fast path is taken for a plain fast tokenizer"
    assert encode_texts(tok, TEXTS) == expected
    assert tok.backend_tokenizer.encode_special_tokens is False, "the tokenizer is left as it was"


def test_duplicates_come_back_as_separate_lists(toks):
    first, second = encode_texts(toks.tiny(), ["same text", "same text"])
    assert first == second and first is not second


@pytest.mark.parametrize("family", ["tiny", "gpt2", "llama3"])
def test_demo_data_batched_and_cached_equal_row_by_row(builtin_host, cache_env, toks, checkpoint_for, family):
    model = TINY_LLAMA if family == "tiny" else checkpoint_for(getattr(toks, family)())
    config = run_config(DEMO_DATA, model, max_length=64)
    reference = row_by_row(builtin_host, config)
    assert any("truncated" in r for r in reference[0]), "max_length 64 cuts some demo rows"

    cold = prepare_data(builtin_host, dict(config), progress=False)
    assert_same_rows(cold, reference)
    warm = prepare_data(builtin_host, dict(config), progress=False)
    assert isinstance(warm.rows, FlatRows) and warm.rows is not cold.rows
    assert_same_rows(warm, reference)
    assert warm.truncated == cold.truncated and sum(warm.truncated.values()) > 0


@pytest.mark.parametrize("masker_options", [{}, {"truncation": "right"}, {"truncation": "drop"}], ids=["prompt-left", "right", "drop"])
def test_edge_rows_batched_in_workers_and_cached_equal_row_by_row(builtin_host, cache_env, tmp_path, monkeypatch, masker_options):
    data = write_jsonl(tmp_path / "edge.jsonl", EDGE_ROWS)
    config = run_config(data, max_length=80, on_bad_row="skip", masker={"name": "response-only", "options": masker_options})
    reference = row_by_row(builtin_host, config)
    assert reference[1]["skipped"] == {10: "empty-field"}

    monkeypatch.setattr(pipeline, "MASK_BATCH", 4)  # several batches, so two workers share them
    cold = prepare_data(builtin_host, dict(config), progress=False, workers=2)
    assert_same_rows(cold, reference)
    warm = prepare_data(builtin_host, dict(config), progress=False)
    assert_same_rows(warm, reference)
    assert (warm.skipped, warm.dropped, warm.truncated) == (cold.skipped, cold.dropped, cold.truncated)


def test_second_run_loads_the_cache_without_a_tokenizer(builtin_host, cache_env, tmp_path, monkeypatch, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    config = run_config(data)
    first = prepare_data(builtin_host, dict(config), progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded for a cached entry")

    monkeypatch.setattr(FlashLoader, "load_tokenizer", refuse)
    second_config = dict(config)
    with caplog.at_level(logging.INFO, logger="sftcore"):
        second = prepare_data(builtin_host, second_config, progress=False)
    lines = [r.getMessage() for r in caplog.records if "cache" in r.getMessage()]
    assert lines == [f"prepared data: {len(ROWS)} rows loaded from the cache, {next(cache_env.glob('*.safetensors'))}"]
    assert list(second.rows) == list(first.rows)
    assert second_config["max_length"] == 512, "the max_length the entry was made with (the tiny model's)"


def key_of(host, data, model=TINY_LLAMA, **extra) -> str:
    return make_key(key_parts(host, run_config(data, model, **extra), model))


def test_the_key_follows_every_input(builtin_host, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    base = key_of(builtin_host, data)
    assert key_of(builtin_host, data) == base

    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(data, moved)
    assert key_of(builtin_host, moved) == base, "keyed by content, not by path"
    assert key_of(builtin_host, data, collator={"name": "pad", "options": {"pad_to_multiple_of": 8}}) == base

    changed = tmp_path / "changed.jsonl"
    changed.write_bytes(data.read_bytes().replace(b"hola", b"hole"))
    tokenizer = tmp_path / "tok"
    shutil.copytree(TINY_LLAMA, tokenizer)
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 256}))
    variants = {
        "one data byte": key_of(builtin_host, changed),
        "max_length": key_of(builtin_host, data, max_length=256),
        "masker option": key_of(builtin_host, data, masker={"name": "response-only", "options": {"truncation": "drop"}}),
        "masker": key_of(builtin_host, data, masker="full"),
        "template option": key_of(builtin_host, data, template={"name": "alpaca", "options": {"output_field": "instruction"}}),
        "template": key_of(builtin_host, data, template="alpaca-output"),
        "loader option": key_of(builtin_host, data, loader={"name": "flash", "options": {"max_length": 128}}),
        "on_bad_row": key_of(builtin_host, data, on_bad_row="skip"),
        "tokenizer file": key_of(builtin_host, data, tokenizer),
    }
    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants), variants


def test_the_key_follows_plugin_versions_and_code(builtin_host, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    base = key_of(builtin_host, data)
    masker = builtin_host.registry.get("masker", "response-only")
    import dataclasses

    bumped = dataclasses.replace(masker, version="9.9")
    monkeypatch.setitem(builtin_host.registry._components["masker"], "response-only", bumped)
    assert key_of(builtin_host, data) != base
    monkeypatch.setattr("sftcore.data.cache.source_digest", lambda obj: "edited")
    monkeypatch.setitem(builtin_host.registry._components["masker"], "response-only", masker)
    assert key_of(builtin_host, data) != base


def test_the_key_covers_every_module_of_sftcore_without_a_list(tmp_path):
    from sftcore.data.cache import package_digest

    digest = package_digest.__wrapped__  # uncached: the copy changes under the test
    copy = tmp_path / "sftcore"
    shutil.copytree(Path(sftcore.__file__).resolve().parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert digest(copy) == package_digest()
    (copy / "tokens.py").write_text((copy / "tokens.py").read_text() + "\n# edited\n")
    edited = digest(copy)
    assert edited != package_digest(), "a module outside the data path shapes rows too (tokens)"
    (copy / "data" / "new_step.py").write_text("X = 1\n")
    assert digest(copy) not in (edited, package_digest()), "a new module counts with no list to update"


def damage_truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_flip_last_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def damage_garbage(path):
    path.write_bytes(b"not a safetensors file")


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_last_byte, damage_garbage])
def test_a_damaged_entry_is_ignored_and_rebuilt(builtin_host, cache_env, tmp_path, damage, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    config = run_config(data)
    good = prepare_data(builtin_host, dict(config), progress=False)
    (entry,) = cache_env.glob("*.safetensors")
    intact = entry.read_bytes()
    damage(entry)
    key = entry.stem
    with caplog.at_level(logging.WARNING, logger="sftcore"):
        assert load(cache_env, key) is None
    assert "ignoring the damaged cache entry" in caplog.text

    rebuilt = prepare_data(builtin_host, dict(config), progress=False)
    assert list(rebuilt.rows) == list(good.rows)
    assert entry.read_bytes() == intact, "the rebuilt entry replaced the damaged one"
    assert load(cache_env, key) is not None


def test_a_killed_write_leaves_no_entry(builtin_host, cache_env, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    config = run_config(data)

    def killed(arrays, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.numpy.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(builtin_host, dict(config), progress=False)
    assert list(cache_env.iterdir()) == [], "neither an entry nor a temporary is left"
    key = make_key(key_parts(builtin_host, config, TINY_LLAMA))
    assert not entry_path(cache_env, key).exists()


def test_cache_dir_false_writes_nothing(builtin_host, cache_env, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    prepared = prepare_data(builtin_host, run_config(data, cache_dir=False), progress=False)
    assert len(prepared.rows) == len(ROWS)
    assert not cache_env.exists()


def test_sft_prepare_then_again(monkeypatch, cache_env, tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", [*ROWS, LONG_ROW, {"instruction": "x"}])
    args = ("prepare", "--data", data, "--tokenizer", TINY_LLAMA, "--max-length", 96, "--masker-opt", "truncation=drop", "--on-bad-row", "skip", "--cache-dir", cache_env, "--no-progress")
    with caplog.at_level(logging.INFO, logger="sftcore"):
        first = sft(monkeypatch, *args)
        assert first.exit_code == 0, first.output
        assert first.stdout.splitlines()[0] == (
            f"rows: {len(ROWS)} prepared of {len(ROWS) + 2} read; skipped: missing-field 1; dropped: too-long 1; truncated: none"
        )
        assert "rows tokenized and cached" in caplog.text
        caplog.clear()
        second = sft(monkeypatch, *args)
        assert second.exit_code == 0, second.output
        assert second.stdout.splitlines()[0] == first.stdout.splitlines()[0]
        assert "rows loaded from the cache" in caplog.text
    assert len(list(cache_env.glob("*.safetensors"))) == 1


def test_sft_prepare_reports_a_bad_row(monkeypatch, cache_env, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], {"instruction": "x"}])
    result = sft(monkeypatch, "prepare", "--data", data, "--tokenizer", TINY_LLAMA, "--cache-dir", cache_env, "--no-progress")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {data}, row 2, field 'output': is missing"
    assert not cache_env.exists()


@pytest.mark.slow
def test_sft_run_trains_on_what_sft_prepare_cached(monkeypatch, cache_env, tmp_path, tiny_model_dir, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    options = ("--data", data, "--model", tiny_model_dir, "--max-length", 128, "--cache-dir", cache_env, "--no-progress")
    prepared = sft(monkeypatch, "prepare", *options)
    assert prepared.exit_code == 0, prepared.output
    with caplog.at_level(logging.INFO, logger="sftcore"):
        trained = sft(monkeypatch, "run", *options, "--output", tmp_path / "out", "--max-steps", 1)
    assert trained.exit_code == 0, trained.output
    assert [r.getMessage() for r in caplog.records if "prepared data" in r.getMessage()] == [
        f"prepared data: {len(ROWS)} rows loaded from the cache, {next(cache_env.glob('*.safetensors'))}"
    ]
    assert trained.stdout.splitlines()[0] == f"rows: {len(ROWS)} used of {len(ROWS)} read; skipped: none; dropped: none; truncated: none"
