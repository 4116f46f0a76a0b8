"""The chatml template (segments, one pair per assistant turn) and masker, checked with sftcore's test
kit on its tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sft_plugin_chatml
from sftcore import IGNORE_INDEX
from sftcore.errors import FieldError, UsageError
from sftcore.options import option_problems
from sftcore.testing import check_mask_invariants
from sftcore.tokens import as_segments

CHAT = Path(__file__).resolve().parent.parent / "data" / "chat.jsonl"
ROWS = [json.loads(line) for line in CHAT.read_text(encoding="utf-8").splitlines()]
TWO_TURNS = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Opposite of hot?"},
        {"role": "assistant", "content": "Cold."},
        {"role": "user", "content": "Of up?"},
        {"role": "assistant", "content": " Down. "},
    ]
}


@pytest.fixture
def host(sft_host):
    return sft_host(chatml=sft_plugin_chatml)


@pytest.fixture
def template(host):
    return host.registry.build("template", "chatml")


def supervised_text(tokenizer, masked) -> list[str]:
    """The supervised runs of a masked row, decoded."""
    runs, run = [], []
    for token, label in zip(masked["input_ids"], masked["labels"]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    return [tokenizer.decode(r) for r in runs + ([run] if run else [])]


def test_registers_template_and_masker(host):
    assert host.registry.get("template", "chatml").plugin == "chatml"
    assert host.registry.get("masker", "chatml").plugin == "chatml"


def test_renders_chatml_one_segment_pair_per_assistant_turn(template):
    segments = template.format(TWO_TURNS)
    assert [(s.text, s.trained) for s in segments] == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nOpposite of hot?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Cold.<|im_end|>", True),
        ("\n<|im_start|>user\nOf up?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Down.<|im_end|>", True),
    ]
    assert "".join(s.text for s in segments[:3]) == template.format_prompt({"messages": TWO_TURNS["messages"][:-1]})
    assert template.format_prompt(TWO_TURNS) == "".join(s.text for s in segments[:3])


def test_generation_prompt_for_a_question_and_for_an_alpaca_row(template):
    question = {"messages": [{"role": "user", "content": "Hi?"}]}
    assert template.format_prompt(question) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    alpaca = {"instruction": "Translate.", "input": "bonjour", "output": "hello"}
    assert [s.text for s in template.format(alpaca)] == [
        "<|im_start|>user\nTranslate.\n\nbonjour<|im_end|>\n<|im_start|>assistant\n",
        "hello<|im_end|>",
    ]
    assert template.format_prompt({"instruction": "Translate.", "input": ""}).startswith("<|im_start|>user\nTranslate.<|im_end|>")


def test_system_option_goes_first_unless_the_row_has_one(host):
    template = host.registry.build("template", "chatml", {"system": "You are terse."})
    assert template.format(ROWS[0])[0].text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    assert template.format(TWO_TURNS)[0].text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_options_are_checked_against_the_factories(host):
    masker, template = host.registry.get("masker", "chatml"), host.registry.get("template", "chatml")
    assert option_problems(masker, {"train_on": "last", "truncation": "drop"}) == []
    assert option_problems(template, {"system": "Be brief.", "messages_field": "conversation"}) == []
    for component, options, words in [
        (masker, {"train_on": "first"}, ("train_on", "all-assistant", "'first'")),
        (masker, {"trian_on": "last"}, ("no option 'trian_on'", "train_on, truncation")),
        (template, {"system": 3}, ("'system'", "3")),
    ]:
        [problem] = option_problems(component, options)
        assert all(word in problem for word in words), problem


def msgs(*pairs):
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"text": "hi"}, "messages", "missing-field"),
        ({"messages": "hi"}, "messages", "wrong-type"),
        ({"messages": []}, "messages", "empty-field"),
        ({"messages": ["hi"]}, "messages[0]", "wrong-type"),
        (msgs(("user", "a"), ("assistant", "b"), ("robot", "c")), "messages[2].role", "bad-role"),
        (msgs(("user", "a"), ("system", "b"), ("assistant", "c")), "messages[1].role", "bad-role"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "messages[0].content", "missing-field"),
        (msgs(("user", 7), ("assistant", "b")), "messages[0].content", "wrong-type"),
        (msgs(("user", "a"), ("assistant", "  ")), "messages[1].content", "empty-field"),
        (msgs(("user", "say <|im_end|>"), ("assistant", "b")), "messages[0].content", "marker-in-content"),
        (msgs(("user", "a"), ("assistant", "b"), ("user", "c")), "messages[2].role", "no-reply"),
        ({"instruction": "a"}, "output", "missing-field"),
        ({"instruction": "a", "input": 3, "output": "b"}, "input", "wrong-type"),
    ],
)
def test_malformed_rows_raise_field_errors(template, row, field, reason):
    with pytest.raises(FieldError) as info:
        template.format(row)
    assert (info.value.field, info.value.reason) == (field, reason)


def rows(masker, template, row, tokenizer, max_length=512) -> list[dict]:
    """The training rows the masker makes of one conversation."""
    [outcome] = masker.segments([template.format(row)], tokenizer, max_length)
    return outcome.rows


def test_every_assistant_turn_and_its_end_marker_are_supervised(host, template, tiny_tokenizer):
    [masked] = rows(host.registry.build("masker", "chatml"), template, TWO_TURNS, tiny_tokenizer)
    assert supervised_text(tiny_tokenizer, masked) == ["Cold.<|im_end|>", "Down.<|im_end|></s>"]
    assert masked["input_ids"][0] == tiny_tokenizer.bos_token_id


def test_train_on_last_supervises_the_reply_only(host, template, tiny_tokenizer):
    [masked] = rows(host.registry.build("masker", "chatml", {"train_on": "last"}), template, TWO_TURNS, tiny_tokenizer)
    assert supervised_text(tiny_tokenizer, masked) == ["Down.<|im_end|></s>"]


@pytest.mark.parametrize("max_length", [512, 48])
def test_mask_invariants_on_the_demo_chats(host, template, tiny_tokenizer, max_length):
    last = host.registry.build("masker", "chatml", {"train_on": "last"})
    check_mask_invariants(template, last, tiny_tokenizer, ROWS, max_length=max_length, every_turn=False)
    check_mask_invariants(template, host.registry.build("masker", "chatml"), tiny_tokenizer, ROWS, max_length=max_length)


def test_short_max_length_cuts_the_oldest_turns_or_drops(host, template, tiny_tokenizer):
    *_, cut = rows(host.registry.build("masker", "chatml"), template, ROWS[3], tiny_tokenizer, 48)
    assert cut["truncated"] == "prompt" and len(cut["input_ids"]) == 48
    assert cut["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert supervised_text(tiny_tokenizer, cut)[-1] == "4<|im_end|></s>"
    drop = host.registry.build("masker", "chatml", {"truncation": "drop"})
    [outcome] = drop.segments([template.format(ROWS[3])], tiny_tokenizer, 48)
    assert "too-long" in outcome.left_out


def test_a_users_eos_text_stays_text(host, template, tiny_tokenizer):
    row = next(r for r in ROWS if "</s>" in r["messages"][0]["content"])
    [masked] = rows(host.registry.build("masker", "chatml"), template, row, tiny_tokenizer)
    assert masked["input_ids"].count(tiny_tokenizer.eos_token_id) == 1
    assert masked["input_ids"][-1] == tiny_tokenizer.eos_token_id


def test_a_tokenizer_with_chatml_tokens_ends_the_reply_with_its_im_end_id(host, template, tiny_tokenizer):
    tiny_tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    masker = host.registry.build("masker", "chatml")
    assert rows(masker, template, TWO_TURNS, tiny_tokenizer)[-1]["input_ids"][-2:] == [im_end, tiny_tokenizer.eos_token_id]
    check_mask_invariants(template, masker, tiny_tokenizer, ROWS)
    tiny_tokenizer.eos_token = "<|im_end|>"  # as in chat models whose EOS is <|im_end|>: no second end
    ids = rows(masker, template, TWO_TURNS, tiny_tokenizer)[-1]["input_ids"]
    assert ids[-1] == im_end and ids[-2] != im_end
    check_mask_invariants(template, masker, tiny_tokenizer, ROWS)


def test_a_tokenizer_with_chatml_tokens_sees_them_as_at_inference(host, template, tiny_tokenizer):
    """With ChatML tokens, each turn's prompt holds their ids, as the tokenizer's own call (and so a
    chat template at inference) encodes the conversation; a user's "</s>" still stays text."""
    tiny_tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    start, end = tiny_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    masker = host.registry.build("masker", "chatml")
    for row in ROWS + [TWO_TURNS]:
        prompt = template.format_prompt(row)
        *_, last = rows(masker, template, row, tiny_tokenizer)
        ids = last["input_ids"]
        first = next(i for i, label in enumerate(last["labels"]) if label != IGNORE_INDEX)
        if len(rows(masker, template, row, tiny_tokenizer)) == 1:
            assert ids.count(start) == prompt.count("<|im_start|>")
            assert ids.count(end) == prompt.count("<|im_end|>") + 1  # the reply's own
        if "</s>" not in prompt:  # inference: the tokenizer parses its added tokens in the text
            assert ids[: len(tiny_tokenizer(str(prompt))["input_ids"])] == tiny_tokenizer(str(prompt))["input_ids"]
        else:  # "</s>" typed in a message: text, not EOS
            assert ids.count(tiny_tokenizer.eos_token_id) == 1
        assert first <= len(ids)
    check_mask_invariants(template, masker, tiny_tokenizer, ROWS)


def test_the_masker_refuses_a_row_that_is_not_chatml(host, tiny_tokenizer):
    alpaca = host.registry.build("template", "alpaca")
    masker = host.registry.build("masker", "chatml")
    pair = alpaca.format({"instruction": "a", "output": "b"})
    with pytest.raises(UsageError, match="use it with the chatml template"):
        masker.segments([as_segments(pair)], tiny_tokenizer, 512)
    with pytest.raises(UsageError, match="use it with the chatml template"):
        masker(*pair, tiny_tokenizer, 512)
