"""`sft preview` shows exactly the ids and labels the Trainer's collator receives."""

from __future__ import annotations

import pytest
import torch
from cli_runs import LONG_ROW, ROWS, json_lines, sft, write_jsonl

from sftcore import IGNORE_INDEX, hookimpl
from sftcore.assets import DEMO_DATA
from sftcore_plugins.pad import PadCollator

# Small enough that LONG_ROW cannot fit; every row of ROWS does.
MAX_LENGTH = 96
MASKING = ("--max-length", MAX_LENGTH, "--masker-opt", "truncation=drop")


class RecordBatches:
    """A plugin whose collator `recording` pads as `pad` does and keeps every batch it makes."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[int], dict]] = []

    @hookimpl
    def register_collators(self, register):
        def factory(pad_token_id: int = 0):
            pad = PadCollator(pad_token_id=pad_token_id)

            def collate(features):
                batch = pad(features)
                self.batches.append(([f["row"] for f in features], batch))
                return batch

            return collate

        register("recording", factory, description="pad, keeping every batch")


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [ROWS[0], LONG_ROW, *ROWS[1:]])


@pytest.mark.slow
def test_preview_json_is_what_the_collator_received(monkeypatch, tmp_path, tiny_model_dir, data):
    recorder = RecordBatches()
    trained = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "out", *MASKING,
        "--collator", "recording", "--epochs", 1, "--batch-size", 3, "--no-progress",
        extra={"recorder": recorder},
    )
    assert trained.exit_code == 0, trained.output
    shown = {r["row"]: r for r in json_lines(sft(monkeypatch, "preview", "--model", tiny_model_dir, "--data", data, *MASKING, "--json").stdout)}

    assert shown[2]["dropped"] == "too-long" and "input_ids" not in shown[2]
    seen = []
    for rows, batch in recorder.batches:
        for i, row in enumerate(rows):
            n = int(batch["attention_mask"][i].sum())
            assert batch["input_ids"][i, :n].tolist() == shown[row]["input_ids"], row
            assert batch["labels"][i, :n].tolist() == shown[row]["labels"], row
            assert torch.all(batch["labels"][i, n:] == IGNORE_INDEX)
            seen.append(row)
    assert sorted(seen) == [row for row, record in shown.items() if "dropped" not in record], "one epoch, every kept row once"


def test_preview_limits_rows_and_marks_dropped_ones(monkeypatch, caplog, tiny_model_dir, data):
    result = sft(monkeypatch, "preview", "--model", tiny_model_dir, "--data", data, *MASKING, "-n", 3, "--json")
    assert result.exit_code == 0, result.output
    assert not [r for r in caplog.records if "indexing errors" in r.getMessage()], "no false alarm for the long row"
    records = json_lines(result.stdout)
    assert [r["row"] for r in records] == [1, 2, 3]
    assert records[1] == {"row": 2, "prompt": records[1]["prompt"], "response": LONG_ROW["output"], "dropped": "too-long"}
    for record in (records[0], records[2]):
        assert len(record["input_ids"]) == len(record["labels"]) <= MAX_LENGTH
        assert IGNORE_INDEX in record["labels"] and set(record["labels"]) != {IGNORE_INDEX}


def test_terminal_output_marks_the_supervised_span(monkeypatch, tiny_model_dir, data):
    result = sft(monkeypatch, "preview", "--model", tiny_model_dir, "--data", data, *MASKING, "-n", 2)
    assert result.exit_code == 0, result.output
    out = result.stdout
    # The response and its EOS are supervised; the prompt, up to and including the marker, is not.
    assert f"### Response:\n[[{ROWS[0]['output']}</s>]]\n" in out
    assert out.count("[[") == 1 and "<s>[[" not in out
    assert "row 2: dropped (too-long)" in out
    assert out.rstrip().endswith(f"1 rows kept, 1 dropped, 0 skipped; max_length {MAX_LENGTH}")


def test_full_masker_marks_every_token(monkeypatch, tiny_model_dir, data):
    result = sft(monkeypatch, "preview", "--model", tiny_model_dir, "--data", data, "--masker", "full", "-n", 1)
    assert result.exit_code == 0, result.output
    body = result.stdout.splitlines()[1:-2]
    assert "\n".join(body).startswith("[[<s>Below is an instruction")
    assert "\n".join(body).endswith(f"{ROWS[0]['output']}</s>]]")


def test_preview_takes_data_and_model_from_a_config(monkeypatch, tmp_path, tiny_model_dir, data):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {data}\nmax_length: {MAX_LENGTH}\nmasker: {{name: response-only, options: {{truncation: drop}}}}\n")
    direct = sft(monkeypatch, "preview", "--model", tiny_model_dir, "--data", data, *MASKING, "--json")
    configured = sft(monkeypatch, "preview", "--config", config, "--json")
    assert configured.exit_code == 0, configured.output
    assert json_lines(configured.stdout) == json_lines(direct.stdout)


def test_preview_with_no_arguments_shows_the_demo(monkeypatch):
    result = sft(monkeypatch, "preview", "-n", 1, "--json")
    assert result.exit_code == 0, result.output
    [record] = json_lines(result.stdout)
    first = json_lines(DEMO_DATA.read_text())[0]
    assert record["row"] == 1 and record["response"] == first["output"]
    assert first["instruction"] in record["prompt"]


@pytest.fixture(scope="module")
def trl_templates(tmp_path_factory):
    from chat_families import or_skip, templates

    return or_skip(lambda: templates(tmp_path_factory.mktemp("trl")), "trl's chat templates")


def test_a_split_conversations_records_each_carry_their_own_turn(monkeypatch, tmp_path, trl_templates):
    from test_chat import TWO_TURNS, tokenizer_dir

    tok_dir = tokenizer_dir(tmp_path, trl_templates, "qwen3")  # Qwen3 renders each turn in a row of its own
    data = write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS])
    done = sft(monkeypatch, "preview", "--tokenizer", tok_dir, "--data", data, "--template", "chat", "--json")
    assert done.exit_code == 0, done.output
    first, second = json_lines(done.output)
    # Qwen3 writes an empty reasoning block before the reply it trains, the model's own to generate.
    assert (first["response"], second["response"]) == ("<think>\n\n</think>\n\nHello.<|im_end|>", "<think>\n\n</think>\n\nYes.<|im_end|>")
    assert first["prompt"].endswith("<|im_start|>assistant\n") and "Yes." not in first["prompt"]
    assert second["prompt"].count("<|im_start|>user") == 2
