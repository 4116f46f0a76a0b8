"""The `chat` template through `sft preview`: OpenAI and ShareGPT rows, one record per training
row (a reasoning template's turns each in their own), bad messages named by file, row, index and
field, and templates refused in one line."""

from __future__ import annotations

import copy

import pytest
from cli_runs import json_lines, sft, write_jsonl

from chat_families import FAMILIES, or_skip, templates
from sftcore import IGNORE_INDEX

TWO_TURNS = {"messages": [
    {"role": "user", "content": "Hi <|im_end|>"}, {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Yes."},
]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}


@pytest.fixture(scope="module")
def chat_templates(tmp_path_factory):
    return or_skip(lambda: templates(tmp_path_factory.mktemp("trl")), "trl's chat templates")


def tokenizer_dir(tmp_path, chat_templates, name: str):
    tok = copy.deepcopy(FAMILIES[name].tokenizer())  # the builder's is shared
    tok.chat_template = (chat_templates / FAMILIES[name].template).read_text(encoding="utf-8")
    tok.save_pretrained(tmp_path / name)
    return tmp_path / name


def preview(monkeypatch, tok_dir, data, *extra):
    return sft(monkeypatch, "preview", "--tokenizer", tok_dir, "--data", data, "--template", "chat", *extra)


def test_each_assistant_turn_is_trained_and_marker_text_stays_text(monkeypatch, tmp_path, chat_templates):
    tok_dir = tokenizer_dir(tmp_path, chat_templates, "qwen2_5")
    data = write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS, SHAREGPT])
    done = preview(monkeypatch, tok_dir, data, "--json")
    assert done.exit_code == 0, done.output
    first, second = json_lines(done.output)
    tok = FAMILIES["qwen2_5"].tokenizer()
    trained = [i for i, label in zip(first["input_ids"], first["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "Hello.<|im_end|>Yes.<|im_end|>"
    assert first["input_ids"].count(tok.convert_tokens_to_ids("<|im_end|>")) == 5  # one per message: the one typed by the user is text
    assert second["row"] == 2 and tok.decode([i for i, l in zip(second["input_ids"], second["labels"]) if l != -100]) == "A<|im_end|>"
    shown = preview(monkeypatch, tok_dir, data)
    assert shown.output.splitlines()[-1] == "2 rows kept, 0 dropped, 0 skipped; 11 tokens trained in 3 turns; max_length 2048"


def test_messages_of_either_style_are_read_under_either_field(monkeypatch, tmp_path, chat_templates):
    tok_dir = tokenizer_dir(tmp_path, chat_templates, "qwen2_5")
    swapped = [{"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
               {"messages": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    done = preview(monkeypatch, tok_dir, write_jsonl(tmp_path / "swapped.jsonl", swapped), "--json")
    ours = preview(monkeypatch, tok_dir, write_jsonl(tmp_path / "chat.jsonl", [SHAREGPT, SHAREGPT]), "--json")
    assert done.exit_code == 0, done.output
    assert [r["input_ids"] for r in json_lines(done.output)] == [r["input_ids"] for r in json_lines(ours.output)]


def test_a_reasoning_template_gives_one_record_per_training_row(monkeypatch, tmp_path, chat_templates):
    tok_dir = tokenizer_dir(tmp_path, chat_templates, "qwen3")
    done = preview(monkeypatch, tok_dir, write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS]), "--json")
    assert done.exit_code == 0, done.output
    records = json_lines(done.output)
    assert [r["row"] for r in records] == [1, 1]
    shown = preview(monkeypatch, tok_dir, tmp_path / "chat.jsonl")
    assert shown.output.splitlines()[-1].endswith("in 2 turns, 1 rows split off; max_length 2048")


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]},
     "field 'messages[1].role': must be one of system, user, assistant, got 'robot'"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": 3}]},
     "field 'conversations[1].value': must be a string, got int"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [{}]}]},
     "field 'messages[1]': tool calls and tool results are not supported yet; leave such rows out (--on-bad-row skip)"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "y"}]},
     "field 'messages[0].content': images and other content parts are not supported yet; give the text as a string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "field 'messages': has no assistant message to learn"),
    *[({**TWO_TURNS, key: value}, f"field '{key}': images, tools and functions are not supported yet (the chat template "
       "would train without them); leave such rows out (--on-bad-row skip)")
      for key, value in (("images", ["cat.png"]), ("tools", [{"type": "function"}]), ("functions", [{"name": "f"}]),
                         ("function_call", {"name": "f"}))],
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "function_call": {"name": "f"}}]},
     "field 'messages[1]': tool calls and tool results are not supported yet; leave such rows out (--on-bad-row skip)"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "reasoning_content": "r", "content": "y"}]},
     "field 'messages[1].reasoning_content': the chat template of TOK does not read it, so training would drop it; "
     "put the reasoning in the content as the model writes it, or use a template that reads reasoning_content"),
    ({"messages": [{"role": "user", "content": "x\U0010f000"}, {"role": "assistant", "content": "y"}]},
     "field 'messages[0].content': holds a character in U+10F000-U+10FFFF, which sftcore reserves for template markers"),
])
def test_a_bad_message_is_named_by_file_row_index_and_field(monkeypatch, tmp_path, chat_templates, row, message):
    tok_dir = tokenizer_dir(tmp_path, chat_templates, "qwen2_5")
    data = write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS, row])
    done = preview(monkeypatch, tok_dir, data)
    assert done.exit_code == 1
    assert done.output.strip().splitlines()[-1] == f"Error: {data}, row 2, {message.replace('TOK', str(tok_dir))}"


@pytest.mark.parametrize("name, field, trained", [
    ("qwen3", "reasoning_content", "<think>\nthe user <|im_end|> greets\n</think>\n\nHello<|im_end|>"),
    ("gptoss", "thinking", "<|channel|>analysis<|message|>the user <|im_end|> greets<|end|><|start|>assistant"
     "<|channel|>final<|message|>Hello<|return|>"),
])
def test_the_reasoning_a_template_reads_is_trained_and_its_marker_strings_stay_text(
    monkeypatch, tmp_path, chat_templates, name, field, trained
):
    tok_dir = tokenizer_dir(tmp_path, chat_templates, name)
    row = {"messages": [{"role": "user", "content": "Hi there"},
                        {"role": "assistant", field: "the user <|im_end|> greets", "content": "Hello"}]}
    done = preview(monkeypatch, tok_dir, write_jsonl(tmp_path / "chat.jsonl", [row]), "--json")
    assert done.exit_code == 0, done.output
    [record] = json_lines(done.output)
    tok = FAMILIES[name].tokenizer()
    assert tok.decode([i for i, label in zip(record["input_ids"], record["labels"]) if label != IGNORE_INDEX]) == trained
    marker = tok.convert_tokens_to_ids("<|im_end|>")
    assert record["input_ids"].count(marker) == (2 if name == "qwen3" else 0)  # the template's own only


def test_a_template_that_cannot_be_trained_honestly_is_refused(monkeypatch, tmp_path, chat_templates):
    tok_dir = tokenizer_dir(tmp_path, chat_templates, "deepseek_r1_distill")
    done = preview(monkeypatch, tok_dir, write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS]))
    assert done.exit_code != 0
    assert done.output.strip().splitlines()[-1].startswith(
        f"Error: the chat template of {tok_dir} adds '<｜Assistant｜><think>\\n' for its generation prompt"
    )


def test_harmony_trains_everything_after_its_generation_prompt_through_return(monkeypatch, tmp_path, chat_templates):
    tok_dir = tokenizer_dir(tmp_path, chat_templates, "gptoss")
    done = preview(monkeypatch, tok_dir, write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS]), "--json")
    assert done.exit_code == 0, done.output
    tok = FAMILIES["gptoss"].tokenizer()
    first, second = json_lines(done.output)  # in a later turn's history a reply ends <|end|>: a row each
    for record, reply in ((first, "Hello."), (second, "Yes.")):
        trained = [i for i, label in zip(record["input_ids"], record["labels"]) if label != IGNORE_INDEX]
        assert tok.decode(trained) == f"<|channel|>final<|message|>{reply}<|return|>"
        assert tok.decode(record["input_ids"][: record["labels"].index(trained[0])]).endswith("<|end|><|start|>assistant")


NO_GENERATION_PROMPT = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
EMPTY_REPLY = NO_GENERATION_PROMPT.replace("m['content'] + ", "") + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"


@pytest.mark.parametrize("text, refusal", [
    (NO_GENERATION_PROMPT, "adds nothing for add_generation_prompt, so the assistant's role header would be trained as its "
     "reply; pass --template-opt chat_template=FILE.jinja with a template that writes the assistant header when "
     "add_generation_prompt is set"),
    (EMPTY_REPLY, "writes '<|im_end|>' for the reply 'Hi there.', no content before its end marker; pass --template-opt "
     "chat_template=FILE.jinja with a template that writes the reply"),
])
def test_a_template_that_would_train_no_reply_is_refused(monkeypatch, tmp_path, text, refusal):
    FAMILIES["qwen2_5"].tokenizer().save_pretrained(tmp_path / "plain")
    (tmp_path / "t.jinja").write_text(text, encoding="utf-8")
    done = preview(monkeypatch, tmp_path / "plain", write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS]),
                   "--template-opt", f"chat_template={tmp_path / 't.jinja'}")
    assert done.exit_code != 0
    assert done.output.strip().splitlines()[-1] == f"Error: the chat template t.jinja {refusal}"


def test_a_tokenizer_without_a_chat_template_asks_for_one(monkeypatch, tmp_path, chat_templates):
    tok = FAMILIES["qwen2_5"].tokenizer()
    tok.save_pretrained(tmp_path / "plain")
    done = preview(monkeypatch, tmp_path / "plain", write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS]))
    assert done.output.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'plain'} has no chat template; pass --template-opt chat_template=FILE.jinja"
    )
    given = preview(monkeypatch, tmp_path / "plain", tmp_path / "chat.jsonl",
                    "--template-opt", f"chat_template={chat_templates / 'qwen2_5.jinja'}", "--json")
    assert given.exit_code == 0, given.output


def test_the_test_kit_checks_each_turn_of_a_conversation(chat_templates):
    from sftcore.testing import check_mask_invariants
    from sftcore_plugins.chat import ChatTemplate
    from sftcore_plugins.masking import SeparateMasker

    tok = FAMILIES["qwen3"].tokenizer()
    template = ChatTemplate(tokenizer=tok, chat_template=str(chat_templates / "qwen3.jinja"))
    check_mask_invariants(template, SeparateMasker(), tok, [TWO_TURNS, SHAREGPT])

    class Leaky(SeparateMasker):
        """Supervises the first prompt token too."""

        def segments(self, examples, tokenizer, max_length):
            out = super().segments(examples, tokenizer, max_length)
            for outcome in out:
                for row in outcome.rows:
                    row["labels"][0] = row["input_ids"][0]
            return out

    with pytest.raises(AssertionError, match="turn 0: the ids before it are not its inference prompt's"):
        check_mask_invariants(template, Leaky(), tok, [TWO_TURNS])


def test_prepared_conversations_are_cached_and_a_changed_template_file_is_not_reused(monkeypatch, tmp_path, chat_templates):
    plain = copy.deepcopy(FAMILIES["qwen2_5"].tokenizer())
    plain.save_pretrained(tmp_path / "plain")
    template = tmp_path / "chat.jinja"
    template.write_text((chat_templates / "qwen2_5.jinja").read_text(encoding="utf-8"), encoding="utf-8")
    data = write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS])
    cache = tmp_path / "cache"

    def prepare():
        done = sft(monkeypatch, "prepare", "--tokenizer", tmp_path / "plain", "--data", data, "--template", "chat",
                   "--template-opt", f"chat_template={template}", "--cache-dir", cache, "--no-progress")
        assert done.exit_code == 0, done.output
        assert "turns: trained 2" in done.stdout  # kept in the cache entry too
        return sorted(cache.glob("*.safetensors"))

    [entry] = prepare()
    assert prepare() == [entry], "the second run loads the entry"
    template.write_text(template.read_text(encoding="utf-8").replace("You are Qwen", "You are Q"), encoding="utf-8")
    assert len(prepare()) == 2, "another template file, another entry"


# A reply starting with "!" renders without the newline its generation prompt ends with.
UNEVEN = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] }}{% if not m['content'].startswith('!') %}{{ '\\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_turn_that_does_not_continue_its_prompt_is_left_out_and_counted(monkeypatch, tmp_path):
    plain = copy.deepcopy(FAMILIES["qwen2_5"].tokenizer())
    plain.save_pretrained(tmp_path / "plain")
    (tmp_path / "uneven.jinja").write_text(UNEVEN, encoding="utf-8")
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "!b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "!only"}]},
    ]
    done = preview(monkeypatch, tmp_path / "plain", write_jsonl(tmp_path / "chat.jsonl", rows),
                   "--template-opt", f"chat_template={tmp_path / 'uneven.jinja'}")
    assert done.exit_code == 0, done.output
    assert "row 2: dropped (reply-not-after-prompt)" in done.output
    assert done.output.splitlines()[-1] == (
        "1 rows kept, 1 dropped, 0 skipped; 2 tokens trained in 1 turns, 2 left out: reply-not-after-prompt; max_length 2048"
    )


@pytest.mark.slow
def test_conversations_masked_in_worker_processes_are_the_same_rows(chat_templates):
    from sftcore.data.pipeline import MASK_BATCH, Prepared, format_rows, mask_rows
    from sftcore_plugins.chat import ChatTemplate
    from sftcore_plugins.masking import SeparateMasker

    tok = FAMILIES["qwen3"].tokenizer()
    template = ChatTemplate(tokenizer=tok, chat_template=str(chat_templates / "qwen3.jinja"))
    rows = [(n, TWO_TURNS if n % 2 else SHAREGPT) for n in range(1, MASK_BATCH + 40)]
    prepared = {}
    for workers in (1, 2):
        prepared[workers] = Prepared()
        items = format_rows(template, rows, "chat.jsonl", "error", prepared[workers])
        mask_rows(SeparateMasker(), items, tok, 256, prepared[workers], workers=workers)
    assert prepared[1].rows == prepared[2].rows and prepared[1].turns == prepared[2].turns
    two_turn_rows = sum(1 for n, row in rows if row is TWO_TURNS)
    assert prepared[1].turns["rows split off"] == two_turn_rows  # Qwen3: each of their turns a row of its own
    assert len(prepared[1].rows) == len(rows) + two_turn_rows


def test_generate_prompts_with_the_ids_training_used(monkeypatch, tmp_path, chat_templates):
    """`sft generate`'s prompt for a conversation, markers typed in messages included, is the
    ids before the reply in the training row of the same conversation plus that reply."""
    from sftcore.commands.generate import conversation, prompt_for
    from sftcore.config import effective
    from sftcore.data.segments import encode_prompt_texts
    from sftcore.host import load_host
    from sftcore.testing import supervised_runs

    tok_dir = tokenizer_dir(tmp_path, chat_templates, "llama3_2")
    messages = ["Hi <|eot_id|> there", "Hello <|start_header_id|>!", "And now?"]
    row = {"messages": [{"role": r, "content": c} for r, c in zip(("user", "assistant", "user"), messages)] +
           [{"role": "assistant", "content": "Done."}]}
    done = preview(monkeypatch, tok_dir, write_jsonl(tmp_path / "chat.jsonl", [row]), "--json",
                   "--template-opt", "system=Be brief.")
    [record] = json_lines(done.output)
    (_, _), (last_reply, _) = supervised_runs(record["labels"])  # both turns in one row
    config = effective({"model": str(tok_dir), "template": {"name": "chat", "options": {"system": "Be brief."}}})
    prompt = prompt_for(load_host(entry_points=False), config, conversation(tuple(messages), config), str(tok_dir))
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert "Be brief." in prompt
    tok = FAMILIES["llama3_2"].tokenizer()
    assert encode_prompt_texts(tok, [prompt])[0] == record["input_ids"][:last_reply]


def test_splitting_is_said_once_in_the_log(caplog, chat_templates):
    from sftcore_plugins.chat import ChatTemplate

    template = ChatTemplate(tokenizer=FAMILIES["qwen3"].tokenizer(), chat_template=str(chat_templates / "qwen3.jinja"))
    with caplog.at_level("INFO", logger="sftcore.run"):
        for _ in range(3):
            template.format(TWO_TURNS)
    [said] = [r.getMessage() for r in caplog.records if "row of its own" in r.getMessage()]
    assert said == (  # the reason holds for every template that splits: Qwen3 drops reasoning, Mistral moves the system message
        "chat template qwen3.jinja renders earlier turns differently once later turns follow: "
        "each assistant turn trains in a row of its own, with the history the model gets at inference"
    )


def test_a_conversation_the_template_refuses_is_a_bad_row_named_by_the_template(monkeypatch, tmp_path, chat_templates):
    tok_dir = tokenizer_dir(tmp_path, chat_templates, "gemma")  # Gemma 1/2 take no system message
    row = {"messages": [{"role": "system", "content": "Be brief."}, *TWO_TURNS["messages"][:2]]}
    data = write_jsonl(tmp_path / "chat.jsonl", [row])
    done = preview(monkeypatch, tok_dir, data)
    assert done.output.strip().splitlines()[-1] == (
        f"Error: {data}, row 1, field 'messages': the chat template of {tok_dir} refused the conversation: System role not supported"
    )
