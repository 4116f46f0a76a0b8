"""`sft run --template chat` on the built-in tiny Llama (given a chat template file, as it has
none) trains, and `sft generate --message` answers with the prompt ids training used."""

from __future__ import annotations

import json

import pytest
from cli_runs import json_lines, sft, write_jsonl

from sftcore import IGNORE_INDEX
from sftcore.assets import BUILTIN_MODEL
from sftcore.commands.generate import chat_loop

# Role headers as text (the tiny tokenizer has no turn tokens), the reply ended by EOS, a token.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROWS = [
    {"messages": [{"role": "user", "content": "Opposite of hot?"}, {"role": "assistant", "content": "cold"},
                  {"role": "user", "content": "Of up?"}, {"role": "assistant", "content": "down"}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
] * 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    directory = tmp_path_factory.mktemp("chat-run")
    (directory / "chat.jinja").write_text(TEMPLATE, encoding="utf-8")
    data = write_jsonl(directory / "chat.jsonl", ROWS)
    done = sft(
        monkeypatch, "run", "--model", BUILTIN_MODEL, "--data", data, "--output", directory / "out",
        "--template", "chat", "--template-opt", f"chat_template={directory / 'chat.jinja'}",
        "--max-steps", "4", "--batch-size", "2", "--lr", "1e-3", "--no-progress",
    )
    monkeypatch.undo()
    assert done.exit_code == 0, done.output
    return directory / "out"


@pytest.mark.slow
def test_a_chat_run_trains_and_answers_a_message_on_its_training_prompt(monkeypatch, trained):
    from transformers import GenerationMixin

    summary = json.loads((trained / "summary.json").read_text(encoding="utf-8"))
    assert summary["rows_used"] == len(ROWS) and summary["turns"] == {"trained": 9}  # two turns share a row
    assert summary["last_loss"] < summary["first_loss"]
    fed = []
    original = GenerationMixin.generate

    def spy(self, **kwargs):
        fed.append((kwargs["input_ids"], original(self, **kwargs)))
        return fed[-1][1]

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    answer = sft(monkeypatch, "generate", "--model", trained, "--message", "Opposite of hot?", "--max-new-tokens", 4, "--no-progress")
    assert answer.exit_code == 0, answer.output
    [(prompt, out)] = fed
    assert out.shape[1] > prompt.shape[1], "the model generated tokens"
    # The ids fed are the training row's ids before its first trained token.
    row = json_lines(sft(monkeypatch, "preview", "--config", trained / "sft_config.yaml", "--json", "-n", 1).stdout)[0]
    first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    assert prompt[0].tolist() == row["input_ids"][:first]


def test_the_chat_loop_keeps_the_conversation():
    lines = iter(["Hi", "Again", ""])
    seen, shown = [], []
    chat_loop(lambda history: seen.append(history) or f"answer {len(history)}", read=lambda _: next(lines), write=shown.append)
    assert seen == [("Hi",), ("Hi", "answer 1", "Again")]
    assert shown == ["answer 1", "answer 3"]


@pytest.mark.slow
def test_the_chat_bench_runs_and_both_paths_train_every_turn():
    import re
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "chat.py"
    done = subprocess.run([sys.executable, str(bench), "--rows", "40", "--vocab", "400"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^sftcore chat \(batched\) .* rows/s +[\d.]+x$", done.stdout, re.M), done.stdout
