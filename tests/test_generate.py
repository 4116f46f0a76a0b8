"""`sft generate` prompts a trained model exactly as its training rows were prompted."""

from __future__ import annotations

import json

import pytest
from cli_runs import ROWS, json_lines, sft, write_jsonl

from sftcore import IGNORE_INDEX
from sftcore.tokens import encode_prompts
from sftcore_plugins.alpaca import alpaca_output

# Columns other than Alpaca's, named through the template's options at training.
COLUMNS = {"instruction_field": "question", "input_field": "context", "output_field": "answer"}
ROW = {"question": ROWS[1]["instruction"], "context": ROWS[1]["input"], "answer": ROWS[1]["output"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A tiny run on renamed columns with the `alpaca-output` template (2 steps: its answers are noise)."""
    directory = tmp_path_factory.mktemp("generate")
    rows = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in ROWS]
    data = write_jsonl(directory / "train.jsonl", rows)
    options = [arg for key, column in COLUMNS.items() for arg in ("--template-opt", f"{key}={column}")]
    with pytest.MonkeyPatch.context() as monkeypatch:
        result = sft(
            monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", directory / "out",
            "--template", "alpaca-output", *options, "--max-steps", 2, "--batch-size", 2, "--no-progress",
        )
    assert result.exit_code == 0, result.output
    return directory / "out"


@pytest.fixture
def generate_calls(monkeypatch):
    """Every ``model.generate`` call: the ids it was fed and the ids it returned."""
    from transformers.generation.utils import GenerationMixin

    calls = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append((kwargs["input_ids"], out))
        return out

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


@pytest.mark.slow
def test_generate_feeds_the_training_prompt(monkeypatch, trained, generate_calls):
    from transformers import AutoTokenizer

    result = sft(
        monkeypatch, "generate", "--model", trained, "--instruction", ROW["question"], "--input", ROW["context"],
        "--show-prompt", "--max-new-tokens", 6, "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.stderr, "--no-progress silences transformers' bar"
    prompt = alpaca_output(**COLUMNS).format_prompt(ROW)
    assert "### Output:" in prompt

    [(fed, out)] = generate_calls
    tokenizer = AutoTokenizer.from_pretrained(trained)
    answer = tokenizer.decode(out[0, fed.shape[1] :], skip_special_tokens=True).strip()
    assert result.stdout == f"{prompt}\n{answer}\n", "the prompt the template made, then the model's continuation"
    assert out.shape[1] > fed.shape[1], "the model generated tokens"

    # The ids fed to the model are the prompt part of the training row, as the run's config previews it.
    [shown] = [r for r in json_lines(sft(monkeypatch, "preview", "--config", trained / "sft_config.yaml", "--json").stdout) if r["prompt"] == prompt]
    first_trained = next(i for i, label in enumerate(shown["labels"]) if label != IGNORE_INDEX)
    assert fed[0].tolist() == shown["input_ids"][:first_trained] == encode_prompts(tokenizer, [prompt])[0]


@pytest.mark.slow
def test_row_json_gives_the_same_prompt(monkeypatch, trained, generate_calls):
    by_flags = sft(monkeypatch, "generate", "--model", trained, "--instruction", "Say hi.", "--show-prompt", "--max-new-tokens", 1)
    by_row = sft(monkeypatch, "generate", "--model", trained, "--row", json.dumps({"question": "Say hi."}), "--show-prompt", "--max-new-tokens", 1)
    assert by_flags.exit_code == by_row.exit_code == 0, by_flags.output + by_row.output
    prompt = alpaca_output(**COLUMNS).format_prompt({"question": "Say hi."})
    assert by_flags.stdout.startswith(prompt) and by_row.stdout.startswith(prompt)
    assert generate_calls[0][0].tolist() == generate_calls[1][0].tolist()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--instruction", "hi"), "has no sft_config.yaml: pass the output directory of `sft run`"),
        (("--instruction", "hi"), "its run did not finish (no summary.json), so it holds no final model; continue it with `sft run --resume`, or pass another --model"),
        ((), "give --instruction TEXT (and optionally --input TEXT), or --row JSON"),
        (("--row", "{not json"), "--row is not valid JSON"),
        (("--row", '{"instruction": "hi"}'), "cannot build a prompt from ['instruction']: field 'question': is missing"),
    ],
)
def test_usage_errors_need_no_model(monkeypatch, tmp_path, args, message):
    run = tmp_path / "run"
    run.mkdir()
    if "sft_config.yaml" not in message:
        (run / "sft_config.yaml").write_text(
            "template: {name: alpaca, options: {instruction_field: question}}\n", encoding="utf-8"
        )
    if "did not finish" not in message and "sft_config.yaml" not in message:
        (run / "model.safetensors").write_bytes(b"")  # never read: the command stops before loading
        (run / "summary.json").write_text("{}")
    result = sft(monkeypatch, "generate", "--model", run, *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr


def test_an_even_number_of_messages_leaves_nothing_to_answer():
    from sftcore.commands.generate import conversation
    from sftcore.errors import UsageError

    config = {"template": {"name": "chat", "options": {}}}
    assert conversation(("Hi", "Hello.", "More?"), config)["messages"][-1] == {"role": "user", "content": "More?"}
    with pytest.raises(UsageError, match=r"^--message was given 2 times: give an odd number, user first"):
        conversation(("Hi", "Hello."), config)


def test_generation_on_harmony_stops_at_the_end_of_the_turn_not_of_a_message():
    from chat_families import harmony, qwen

    from sftcore.data.chat import stop_ids
    from sftcore.data.segments import Rendered

    gptoss, chatml = harmony(), qwen()
    stops = stop_ids(gptoss, Rendered("<|start|>assistant", "", None))  # a chat prompt; its coded form unused here
    ids = {t: gptoss.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>", "<|end|>")}
    assert ids["<|return|>"] in stops and ids["<|call|>"] in stops and ids["<|end|>"] not in stops
    assert chatml.convert_tokens_to_ids("<|im_end|>") in stop_ids(chatml, Rendered("<|im_start|>assistant\n", "", None))
