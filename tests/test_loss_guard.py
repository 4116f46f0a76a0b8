"""No silent zero or NaN loss: prompts longer than max_length under every truncation policy never
make a batch without a supervised token, and the logged loss stays finite and above zero."""

from __future__ import annotations

import json
import math
import re

import pytest
from cli_runs import ROWS, forbid_model_loading, loss_points, sft, write_jsonl

from sftcore import IGNORE_INDEX, RowDropped, hookimpl
from sftcore_plugins.pad import PadCollator

MAX_LENGTH = 96
# Prompts far over MAX_LENGTH on their own, with short answers: the reference recipe's all -100 rows.
LONG_PROMPTS = [
    {"instruction": " ".join(["Read this twice and think."] * 40), "input": "", "output": f"answer {i}"}
    for i in range(4)
]


class RecordingCollator:
    """The `pad` collator, keeping the labels of every batch it makes for the test to inspect."""

    batches: list = []

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad = PadCollator(pad_token_id)

    def __call__(self, features):
        batch = self.pad(features)
        RecordingCollator.batches.append(batch["labels"].clone())
        return batch


class Recorder:
    @hookimpl
    def register_collators(self, register):
        register("recording", RecordingCollator, description="pad, recording every batch's labels")


EXPECTED = {
    # policy: (rows used, dropped, truncated) for 4 long prompts and 2 ordinary rows
    "prompt-left": (6, {}, {"prompt": 4}),
    "right": (2, {"prompt-too-long": 4}, {}),
    "drop": (2, {"too-long": 4}, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("truncation", list(EXPECTED))
def test_prompts_longer_than_max_length_never_make_an_unsupervised_batch(monkeypatch, tmp_path, tiny_model_dir, truncation):
    RecordingCollator.batches = []
    # Long prompts side by side: with batch size 2 they would fill whole batches if they survived as all -100.
    data = write_jsonl(tmp_path / "long.jsonl", LONG_PROMPTS + ROWS[:2])
    output = tmp_path / "out"
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", output,
        "--max-length", MAX_LENGTH, "--masker-opt", f"truncation={truncation}", "--collator", "recording",
        "--batch-size", 2, "--epochs", 2, "--set", "lr_scheduler_type=constant", "--seed", 3, "--no-progress",
        extra={"recorder": Recorder()},
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["rows_used"], summary["dropped"], summary["truncated"]) == EXPECTED[truncation]

    batches = RecordingCollator.batches
    assert len(batches) == summary["steps"] == 2 * math.ceil(summary["rows_used"] / 2)
    for labels in batches:
        assert labels.shape[1] <= MAX_LENGTH
        supervised_per_row = (labels != IGNORE_INDEX).sum(dim=1)
        assert (supervised_per_row > 0).all(), "every row of every batch carries at least one supervised token"

    logged = [loss for _, loss in loss_points(output)]
    assert len(logged) == summary["steps"]
    assert all(math.isfinite(loss) and loss > 0 for loss in logged), logged


def test_no_row_left_is_an_error_not_a_zero_loss(monkeypatch, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "long.jsonl", LONG_PROMPTS)
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "out",
        "--max-length", MAX_LENGTH, "--masker-opt", "truncation=right", "--no-progress",
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {data}: no row left to train on (4 read;")
    assert "prompt-too-long" in result.stderr and len(result.stderr.splitlines()) == 1


class AllMaskedMasker:
    """A faulty third-party masker: returns rows with every label -100 instead of raising RowDropped."""

    def __call__(self, prompt, response, tokenizer, max_length):
        ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"][:max_length]
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)}


class Faulty:
    @hookimpl
    def register_maskers(self, register):
        register("all-masked", AllMaskedMasker)


def test_a_masker_returning_all_minus_100_stops_the_run_before_the_model_loads(monkeypatch, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    forbid_model_loading(monkeypatch)
    monkeypatch.setattr("sftcore_plugins.flash.FlashLoader.load_tokenizer", lambda self, path, **kw: _tokenizer())
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "out",
        "--masker", "all-masked", "--no-progress", extra={"faulty": Faulty()},
    )
    assert result.exit_code == 2
    assert result.stderr == "Error: masker output for row 1 has no supervised token; a masker must raise RowDropped instead\n"


def _tokenizer():
    from transformers import AutoTokenizer

    from sftcore.assets import TINY_LLAMA

    return AutoTokenizer.from_pretrained(TINY_LLAMA)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([-100, -100, -100], "masker output for row 4 has no supervised token; a masker must raise RowDropped instead"),
        ([7, -100, -100], "masker output for row 4 supervises only its first token, which is never predicted"),
    ],
)
def test_a_row_that_trains_nothing_is_refused(labels, message):
    """The loss shifts labels by one: a label at position 0 is never a target, so it alone trains nothing."""
    from sftcore.errors import UsageError
    from sftcore.data.pipeline import check_masked

    with pytest.raises(UsageError, match=re.escape(message)):
        check_masked({"input_ids": [7, 8, 9], "labels": labels}, 16, 4)
    check_masked({"input_ids": [7, 8, 9], "labels": [-100, 8, -100]}, 16, 4)  # one target: accepted


def test_right_truncation_keeps_a_full_row_whose_prompt_fills_the_budget():
    """`full` supervises the prompt too, so cutting the response away still leaves tokens to learn."""
    from sftcore_plugins.masking import SeparateMasker, full_masker

    tokenizer = _tokenizer()
    prompt, response = "a long prompt " * 20, "ok"
    row = full_masker(truncation="right")(prompt, response, tokenizer, 16)
    assert len(row["input_ids"]) == 16 and row["labels"] == row["input_ids"] and row["truncated"] == "response"
    with pytest.raises(RowDropped, match="no room left for the response"):
        SeparateMasker(truncation="right")(prompt, response, tokenizer, 16)  # response-only: nothing to learn


def test_a_clipped_response_never_ends_in_eos_even_when_it_fits(monkeypatch):
    """clip_text cuts multi-megabyte texts before tokenizing; should a normalizer fold the cut text
    under max_length, the row is still a cut response: no EOS, counted as truncated."""
    from sftcore_plugins import masking

    tokenizer = _tokenizer()
    monkeypatch.setattr(masking, "clip_text", lambda tok, text, max_length, keep: text[:40] if keep == "head" else text[-40:])
    prompt, response = "Say it.", "word " * 100
    row = masking.SeparateMasker()(prompt, response, tokenizer, 512)
    assert row["truncated"] == "response" and row["input_ids"][-1] != tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in row["input_ids"]
    whole = masking.SeparateMasker()("Say it.", "word", tokenizer, 512)  # not clipped: ends in EOS
    assert whole["input_ids"][-1] == tokenizer.eos_token_id and "truncated" not in whole
