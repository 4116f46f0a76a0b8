"""`sft run` end to end: the bundled demo, every built-in component, data errors, the summary."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from cli_runs import LONG_ROW, ROWS, SFT, forbid_model_loading, json_lines, loss_points, sft, write_jsonl

from sftcore import IGNORE_INDEX
from sftcore.data.segments import Outcome, as_segments
from sftcore.host import load_catalogue

OUTPUT_FILES = (
    "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
    "trainer_state.json", "sft_config.yaml", "summary.json", "loss.csv",
)
TRANSFORMERS_BARS = ("Loading weights", "Writing model shards")


def reload(output):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(output, use_safetensors=True)


@pytest.mark.slow
def test_demo_run_with_no_arguments(tmp_path):
    """`sft run` alone trains the tiny model on the demo set until it has learned it, then answers."""
    env = {**os.environ, "SFT_CACHE_DIR": str(tmp_path / "cache")}
    for var in ("SFT_DISABLE_PLUGINS", "SFT_STRICT_PLUGINS"):
        env.pop(var, None)
    result = subprocess.run([SFT, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = re.search(r"^saved to (.+)$", result.stdout, re.M)
    assert saved, result.stdout
    output = tmp_path / saved.group(1)
    assert output.parent == tmp_path / "sft-runs"
    log = result.stderr.splitlines()
    assert log.index(f"sft: output: {saved.group(1)}") < next(i for i, line in enumerate(log) if "attention:" in line)
    for name in OUTPUT_FILES:
        assert (output / name).is_file(), name
    assert not list(output.glob("checkpoint-*")), "no checkpoint beside the final model (save_steps 500, 480 steps)"

    points = loss_points(output)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == points[-1][0] > 100
    assert (summary["first_loss"], summary["last_loss"]) == pytest.approx((points[0][1], points[-1][1]))
    assert points[-1][1] < 0.5 * points[0][1], points[:: max(1, len(points) // 10)]
    assert reload(output).config.vocab_size == 512

    answer = subprocess.run(
        [SFT, "generate", "--model", str(output), "--instruction", "Give the opposite of the word 'hot'.", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert answer.returncode == 0, answer.stderr
    assert "cold" in answer.stdout, answer.stdout


TRAINED_STAGES = ("template", "masker", "collator", "loader")
# The chat template trains conversations on a chat template; the tiny model has none, so it gets one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def rows_for(template: str, tmp_path) -> tuple[list[dict], dict[str, str]]:
    """The rows a built-in template trains on (ROWS, as conversations for chat) and its options."""
    if template != "chat":
        return ROWS, {}
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    talks = [{"messages": [{"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()},
                           {"role": "assistant", "content": r["output"]}]} for r in ROWS]
    return talks, {"chat_template": str(tmp_path / "chat.jinja")}


def builtin_combos() -> list[tuple[str, ...]]:
    """As few component combinations as cover every built-in of registry.yaml at least once."""
    names = {s: sorted(c["name"] for c in load_catalogue().components if c["stage"] == s) for s in TRAINED_STAGES}
    return [tuple(names[s][i % len(names[s])] for s in TRAINED_STAGES) for i in range(max(map(len, names.values())))]


@pytest.mark.slow
@pytest.mark.parametrize("names", builtin_combos(), ids="-".join)
def test_each_builtin_component_trains_and_reloads(monkeypatch, tmp_path, tiny_model_dir, tiny_tokenizer, builtin_host, names):
    template, masker, collator, loader = names
    rows, options = rows_for(template, tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    output = tmp_path / "out"
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", output,
        "--template", template, "--masker", masker, "--collator", collator, "--loader", loader,
        "--max-steps", 3, "--batch-size", 2, "--max-length", 128, "--no-progress",
        *[arg for key, value in options.items() for arg in ("--template-opt", f"{key}={value}")],
    )
    assert result.exit_code == 0, result.output
    for name in OUTPUT_FILES:
        assert (output / name).is_file(), name
    for bar in TRANSFORMERS_BARS:
        assert bar not in result.stderr, "--no-progress silences transformers' bars too"
    saved = (output / "sft_config.yaml").read_text()
    for stage, name in zip(TRAINED_STAGES, names):
        assert re.search(rf"^{stage}:\n  name: {re.escape(name)}$", saved, re.M), (stage, saved)

    # What the run counted must be what these components make of the rows, computed here directly.
    if template == "chat":
        options["tokenizer"] = tiny_tokenizer
    built_template, built_masker = builtin_host.registry.build("template", template, options), builtin_host.registry.build("masker", masker)
    results = built_masker.segments([as_segments(built_template.format(row)) for row in rows], tiny_tokenizer, 128)
    masked = [row for result in results for row in (result.rows if isinstance(result, Outcome) else [result])]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["tokens"] == sum(len(m["input_ids"]) for m in masked)
    assert summary["supervised_tokens"] == sum(sum(label != IGNORE_INDEX for label in m["labels"]) for m in masked)
    assert (summary["supervised_tokens"] == summary["tokens"]) == (masker == "full")

    model = reload(output)
    assert model.config.vocab_size == 512
    assert sum(p.numel() for p in model.parameters()) > 0


DATA_ERRORS = [
    pytest.param(
        "bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "c"}]',
        "line 2: invalid JSON", id="malformed-json",
    ),
    pytest.param(
        "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": "a",\n',
        "line 3: invalid JSON", id="malformed-jsonl",
    ),
    pytest.param(
        "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n',
        "row 2, field 'output': is missing", id="missing-field",
    ),
    pytest.param(
        "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": " ", "output": "b"}\n',
        "row 3, field 'instruction': is empty", id="empty-field",
    ),
    pytest.param(
        "bad.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a", "input": 7, "output": "b"}]',
        "row 2, field 'input': must be a string, got int", id="mistyped-field",
    ),
    pytest.param(
        "bad.json", '[{"instruction": "a", "output": "b"}, ["a", "b"]]',
        "row 2: expected a JSON object, got list", id="not-an-object",
    ),
]


@pytest.mark.parametrize(("name", "text", "message"), DATA_ERRORS)
def test_bad_data_stops_with_one_line_before_the_model_loads(monkeypatch, tmp_path, tiny_model_dir, name, text, message):
    forbid_model_loading(monkeypatch)
    data = tmp_path / name
    data.write_text(text, encoding="utf-8")
    result = sft(monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "out", "--no-progress")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"Error: {data}, {message}"), result.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for a run that never started"


def test_bad_data_in_a_real_process_prints_no_traceback(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n', encoding="utf-8")
    result = subprocess.run(
        [SFT, "run", "--model", str(tiny_model_dir), "--data", "train.jsonl", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "Error: train.jsonl, row 2, field 'output': must be a string, got int"


@pytest.mark.slow
def test_skipped_and_dropped_rows_are_counted_in_the_summary(monkeypatch, tmp_path, tiny_model_dir):
    lines = [json.dumps(row) for row in ROWS[:4]] + [
        '{"instruction": "a"',  # bad-json
        json.dumps({"instruction": "a"}),  # missing-field
        json.dumps({"instruction": "a", "output": "  "}),  # empty-field
        json.dumps({"instruction": ["a"], "output": "b"}),  # wrong-type
        json.dumps(LONG_ROW),  # too long for --max-length under truncation=drop
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out"
    args = ("--model", tiny_model_dir, "--data", data, "--max-length", 96, "--masker-opt", "truncation=drop")
    result = sft(
        monkeypatch, "run", *args, "--on-bad-row", "skip", "--output", output,
        "--max-steps", 2, "--batch-size", 2, "--no-progress",
    )
    assert result.exit_code == 0, result.output

    summary = json.loads((output / "summary.json").read_text())
    assert summary["rows_read"] == 9
    assert summary["rows_used"] == 4
    assert summary["skipped"] == {"bad-json": 1, "missing-field": 1, "empty-field": 1, "wrong-type": 1}
    assert summary["dropped"] == {"too-long": 1}

    # Token counts agree with what `sft preview` shows for the same data and options.
    shown = [r for r in json_lines(sft(monkeypatch, "preview", *args, "--on-bad-row", "skip", "--json").stdout) if "input_ids" in r]
    tokens = sum(len(r["input_ids"]) for r in shown)
    supervised = sum(label != IGNORE_INDEX for r in shown for label in r["labels"])
    assert (summary["tokens"], summary["supervised_tokens"]) == (tokens, supervised)
    assert 0 < summary["padding_fraction"] < 1, "rows of different lengths share batches of 2"
    assert summary["tokens_per_second"] > 0

    points = loss_points(output)
    first, last = points[0][1], points[-1][1]
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "rows: 4 used of 9 read; skipped: bad-json 1, empty-field 1, missing-field 1, wrong-type 1; "
        "dropped: too-long 1; truncated: none"
    )
    assert lines[1] == (
        f"tokens: {tokens} per epoch, {supervised} supervised ({supervised / tokens:.0%}); "
        f"padding {summary['padding_fraction']:.1%} of batch positions"
    )
    total = summary["total_parameters"]
    assert total > 0 and lines[2] == f"parameters: {total:,} trainable of {total:,} (100.00%)"
    assert re.fullmatch(r"speed: [\d,]+ real tokens/s over 2 steps in [\d.]+s", lines[3]), lines[3]
    assert lines[4] == f"loss: first {first:.4f}, last {last:.4f}"
    assert lines[5] == f"saved to {output}"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (output / "loss.png").read_bytes().startswith(b"\x89PNG")
