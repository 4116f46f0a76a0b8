"""One test per known bug of the reference SFT scripts (stanford_alpaca train.py, LLMBook/LLMBox).

Each docstring names the bug it guards; research/anchors.md section 1 describes them.
"""

from __future__ import annotations

import math

import pytest

from sftcore import IGNORE_INDEX, RowDropped
from sftcore.errors import UsageError
from sftcore.data.pipeline import Formatted, Prepared, check_masked, mask_rows
from sftcore.tokens import encode_prompts, encode_texts, special_affixes
from sftcore_plugins.alpaca import AlpacaTemplate, alpaca_output
from sftcore_plugins.flash import FlashLoader
from sftcore_plugins.masking import SeparateMasker
from sftcore_plugins.pad import PadCollator
from toy_tokenizers import STANFORD_INPUT, STANFORD_NO_INPUT

ROW = {"instruction": "List three colors.", "input": "", "output": "- red\n- green\n- blue"}


def split_row(row: dict) -> tuple[list[int], list[int]]:
    labels = row["labels"]
    k = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return row["input_ids"][:k], row["input_ids"][k:]


@pytest.mark.parametrize("family", ["gpt2", "sentencepiece", "llama3"])
def test_token_boundary_output_starting_with_dash(toks, family):
    """Alpaca 1a.1: with the tail `Response:` an output starting with '-' tokenizes as ':-', so the
    first response token is masked and training sees ids that inference never produces."""
    tok = toks.BUILDERS[family]()
    stanford = STANFORD_NO_INPUT.format(instruction=ROW["instruction"])
    source = tok(stanford)["input_ids"]
    joined = tok(stanford + ROW["output"])["input_ids"]
    assert joined[: len(source)] != source, "the test tokenizer must reproduce the reference bug"

    prompt, response = AlpacaTemplate().format(ROW)
    assert prompt.endswith("### Response:\n")
    row = SeparateMasker()(prompt, response, tok, 512)
    prompt_ids, response_ids = split_row(row)
    assert prompt_ids == tok(prompt)["input_ids"], "training prompt == inference prompt"
    assert response_ids == tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(response_ids[:-1]).strip() == response


def test_eos_off_by_one_when_tokenizer_appends_eos(toks):
    """Alpaca 1a.2 (PR #229, alpaca-lora PR #306): a tokenizer that appends EOS itself inflates the
    prompt length by one, masking the first response token."""
    tok = toks.sentencepiece(add_eos=True)
    prompt, response = AlpacaTemplate().format(ROW)
    source = tok(prompt)["input_ids"]
    assert source[-1] == tok.eos_token_id, "the test tokenizer must append EOS by itself"
    assert special_affixes(tok) == ([tok.bos_token_id], [tok.eos_token_id])

    row = SeparateMasker()(prompt, response, tok, 512)
    prompt_ids, response_ids = split_row(row)
    assert len(prompt_ids) == len(source) - 1
    assert prompt_ids == source[:-1]
    assert response_ids == encode_texts(tok, [response])[0] + [tok.eos_token_id]
    assert row["input_ids"].count(tok.eos_token_id) == 1


@pytest.mark.parametrize("family", ["gpt2", "llama3", "tiny"])
def test_eos_appended_for_fast_tokenizers(toks, family):
    """LLMBook 1b.2: `add_eos_token=True` only works for Llama/Gemma tokenizer classes, so with a
    PreTrainedTokenizerFast (Qwen2, Llama-3) no EOS was appended and the model never stops."""
    tok = toks.BUILDERS[family]()
    assert tok(ROW["output"])["input_ids"][-1] != tok.eos_token_id, "the tokenizer adds no EOS itself"
    prompt, response = AlpacaTemplate().format(ROW)
    row = SeparateMasker()(prompt, response, tok, 512)
    assert row["input_ids"][-1] == tok.eos_token_id
    assert row["labels"][-1] == tok.eos_token_id


@pytest.mark.parametrize("family", ["gpt2", "sentencepiece", "llama3", "tiny"])
def test_sequences_never_start_with_eos(toks, family):
    """Alpaca 1a.3 (#193): for 'llama' models eos = bos = unk = '</s>', so every sequence started
    with EOS. GPT-2 names `<|endoftext|>` as BOS too but never adds it: it must not be prepended."""
    tok = toks.BUILDERS[family]()
    prompt, response = AlpacaTemplate().format(ROW)
    ids = SeparateMasker()(prompt, response, tok, 512)["input_ids"]
    assert ids[0] != tok.eos_token_id
    assert ids.count(tok.eos_token_id) == 1
    if family == "gpt2":
        assert tok.bos_token_id == tok.eos_token_id
        assert ids[: len(tok(prompt)["input_ids"])] == tok(prompt)["input_ids"]
    else:
        assert ids[0] == tok.bos_token_id != tok.eos_token_id
        assert ids.count(tok.bos_token_id) == 1


def test_pad_equal_to_eos_keeps_eos_attended(toks):
    """Alpaca 1a.4: with pad == eos, `attention_mask = ids.ne(pad)` hides the real EOS and the
    prompt length counted from it is wrong."""
    tok = toks.llama3()
    assert tok.pad_token_id == tok.eos_token_id
    masker, template = SeparateMasker(), AlpacaTemplate()
    rows = [masker(*template.format(r), tok, 512) for r in (ROW, {**ROW, "output": "Red."})]
    batch = PadCollator(pad_token_id=tok.pad_token_id)(rows)
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert batch["input_ids"][short, n - 1].item() == tok.eos_token_id
    assert batch["attention_mask"][short, n - 1].item() == 1
    assert batch["labels"][short, n - 1].item() == tok.eos_token_id
    assert batch["attention_mask"][short].sum().item() == n
    reference = batch["input_ids"].ne(tok.pad_token_id)
    assert not reference[short, n - 1], "the reference mask would have hidden this EOS"


@pytest.mark.parametrize("family", ["sentencepiece", "llama3"])
def test_truncation_keeps_eos(toks, family):
    """Alpaca 1a.5 / LLMBook 1b.4: right-truncating the whole sequence drops EOS (and can delete the
    response), so the model never learns to stop on long samples."""
    tok = toks.BUILDERS[family]()
    long_input = " ".join(["the river city has a great old tree"] * 40)
    prompt, response = AlpacaTemplate().format({**ROW, "input": long_input})
    full = encode_prompts(tok, [prompt])[0] + encode_texts(tok, [response])[0] + [tok.eos_token_id]
    max_length = 64
    assert len(full) > 2 * max_length

    row = SeparateMasker()(prompt, response, tok, max_length)
    assert row["truncated"] == "prompt"
    assert len(row["input_ids"]) == max_length
    assert row["input_ids"][0] == tok.bos_token_id
    assert row["input_ids"][-1] == tok.eos_token_id
    _, response_ids = split_row(row)
    assert response_ids == encode_texts(tok, [response])[0] + [tok.eos_token_id]
    marker = encode_texts(tok, ["### Response:\n"])[0]
    assert tok.decode(split_row(row)[0][-len(marker) :]).endswith("Response:\n")

    right = SeparateMasker(truncation="right")
    with pytest.raises(RowDropped):
        right(prompt, response, tok, max_length)


@pytest.mark.parametrize("family", ["gpt2", "llama3"])
def test_prompt_longer_than_max_length(toks, family):
    """Alpaca 1a.5: a prompt of max_length tokens or more left every label at -100 (NaN or 0 loss).
    prompt-left keeps the response; `right` drops the row with a reason; no masker returns it."""
    tok = toks.BUILDERS[family]()
    prompt, response = AlpacaTemplate().format({**ROW, "input": "one two three " * 200})
    max_length = 48
    assert len(encode_prompts(tok, [prompt])[0]) >= max_length

    row = SeparateMasker()(prompt, response, tok, max_length)
    assert any(label != IGNORE_INDEX for label in row["labels"])
    assert row["labels"][-1] == tok.eos_token_id

    items = [Formatted(7, prompt, response), Formatted(8, *AlpacaTemplate().format(ROW))]
    prepared = Prepared()
    mask_rows(SeparateMasker(truncation="right"), items, tok, max_length, prepared)
    assert prepared.dropped == {"prompt-too-long": 1}
    assert prepared.dropped_rows == {7: "prompt-too-long"}
    assert [r["row"] for r in prepared.rows] == [8]
    assert all(any(label != IGNORE_INDEX for label in r["labels"]) for r in prepared.rows)

    with pytest.raises(UsageError, match="no supervised token"):
        check_masked({"input_ids": [1, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX]}, max_length, 9)


def test_empty_input_uses_no_input_template():
    """LLMBook 1b.1: `'input' in example` is always true for Alpaca JSON, so the with-input prompt
    was used even for `input: ""`."""
    prompt, _ = AlpacaTemplate().format({**ROW, "input": ""})
    assert prompt == STANFORD_NO_INPUT.format(instruction=ROW["instruction"]) + "\n"
    assert "### Input:" not in prompt and "paired with an input" not in prompt


def test_input_gets_its_own_section_in_alpaca_output():
    """LLMBook 1b.1/1b.6: a non-empty input was glued to the instruction with no delimiter and no
    `### Input:` header; the `### Output:` variant must still give it its own section."""
    prompt, response = alpaca_output().format({**ROW, "input": "a rainbow"})
    expected = STANFORD_INPUT.format(instruction=ROW["instruction"], input="a rainbow")
    assert prompt == expected.replace("### Response:", "### Output:") + "\n"
    assert "\n\n### Input:\na rainbow\n\n### Output:\n" in prompt
    assert response == ROW["output"]


def test_missing_pad_token_gets_one(toks, checkpoint_for):
    """LLMBook 1b.3: Llama-2/3 checkpoints have no pad token, so `pad_sequence(..., None)` fails."""
    path = checkpoint_for(toks.sentencepiece())
    model, tok = FlashLoader().load(str(path))
    assert tok.pad_token_id is not None
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    assert model.config.pad_token_id == tok.pad_token_id
    rows = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 5], "labels": [-100, 5]}]
    batch = PadCollator(pad_token_id=tok.pad_token_id)(rows)
    assert batch["input_ids"][1, 2].item() == tok.pad_token_id


def test_trainer_takes_processing_class(tiny_model_dir, tmp_path):
    """LLMBook 1b.5: `Trainer(tokenizer=...)` was removed in transformers v5 (PR #41128) and raises a
    TypeError; sftcore builds the Trainer with `processing_class=` and it trains."""
    from transformers import Trainer, TrainingArguments

    model, tok = FlashLoader().load(str(tiny_model_dir))
    template, masker = AlpacaTemplate(), SeparateMasker()
    data = [masker(*template.format({**ROW, "output": f"- item {i}"}), tok, 128) for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    with pytest.raises(TypeError, match="tokenizer"):
        Trainer(model=model, args=args, tokenizer=tok)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=PadCollator(pad_token_id=tok.pad_token_id),
        processing_class=tok,
    )
    assert trainer.processing_class is tok
    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.training_loss > 0
