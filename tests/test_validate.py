"""`sft validate`: every problem of a run config at once, in one pass, without loading a model;
and no config, however malformed, gets a traceback out of it."""

from __future__ import annotations

import pytest
import yaml
from cli_runs import forbid_model_loading, sft
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftcore.config import TOP_KEYS


def validate(monkeypatch, tmp_path, text: str):
    forbid_model_loading(monkeypatch)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(text, encoding="utf-8")
    return config_file, sft(monkeypatch, "validate", config_file)


def test_every_kind_of_problem_in_one_report(monkeypatch, tmp_path):
    config_file, result = validate(
        monkeypatch, tmp_path,
        "model: 5\ndata: missing.jsonl\noutput: [a]\ncollator: paad\n"
        "template: {name: alpaca, options: {instruction_field: [q], colour: red}}\n"
        "masker: {name: response-only, options: [truncation]}\n"
        "on_bad_row: ignore\nmax_length: 1\n"
        "training: {lr_scheduler_type: cosin, optim: adamw_torchh, seed: 1.5, num_train_epochs: .nan,"
        " report_to: 5, save_strategy: sometimes, bf16: 'yes', learning_rat: 0.1}\n",
    )
    assert result.exit_code == 2
    expected = [
        "model must be a path, got 5",
        "output must be a path, got ['a']",
        f"data file not found: {tmp_path / 'missing.jsonl'}",  # read from the config file's directory
        "max_length must be an integer >= 2, got 1",
        "on_bad_row must be 'error' or 'skip', got 'ignore'",
        "Unknown collator 'paad'. Did you mean 'pad'?",
        "template 'alpaca' option 'instruction_field' must be str, got ['q']",
        "template 'alpaca' has no option 'colour'",
        "masker options must be a mapping, got list",
        "training: 'lr_scheduler_type' does not accept 'cosin'. Did you mean 'cosine'?",
        "training: 'optim' does not accept 'adamw_torchh'. Did you mean 'adamw_torch'?",
        "training: 'seed' must be int, got 1.5",
        "training: 'num_train_epochs' must be a finite number, got nan",
        "training: 'report_to' must be None | str | list, got 5",
        "training: 'save_strategy' does not accept 'sometimes'. One of: no, steps, epoch, best",
        "training: 'bf16' must be true or false, got 'yes'",
        "training: 'learning_rat' is not a TrainingArguments field. Did you mean 'learning_rate'?",
    ]
    lines = result.stderr.splitlines()
    assert lines[0] == f"{config_file}: {len(expected)} problems", result.stderr
    for message in expected:
        assert sum(message in line for line in lines[1:]) == 1, message


def test_a_valid_config_with_checked_training_values_is_ok(monkeypatch, tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    config_file, result = validate(
        monkeypatch, tmp_path,
        f"model: {tiny_model_dir}\ndata: {data}\nmasker: {{name: response-only, options: {{truncation: drop}}}}\n"
        "training: {lr_scheduler_type: constant_with_warmup, optim: adamw_torch, report_to: [none], seed: 3,"
        " save_strategy: epoch, warmup_steps: 0.1, max_steps: 10}\n",
    )
    assert (result.exit_code, result.stdout) == (0, f"{config_file}: OK\n"), result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("training: [1, 2]\n", "training must be a mapping of TrainingArguments fields, got list"),
        ("- model\n- data\n", "expected a mapping of keys at the top, got list"),
        ("template: {name: alpaca, options: 3}\n", "template options must be a mapping, got int"),
    ],
)
def test_structural_mistakes_are_problems_not_tracebacks(monkeypatch, tmp_path, text, message):
    _, result = validate(monkeypatch, tmp_path, text)
    assert result.exit_code == 2
    assert message in result.stderr


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | st.sampled_from(["name", "options"]), inner, max_size=3),
    max_leaves=8,
)
training_keys = st.sampled_from(["learning_rate", "seed", "lr_scheduler_type", "optim", "report_to", "bf16", "fsdp", "debug"])
configs = st.dictionaries(
    st.sampled_from(sorted(TOP_KEYS)) | st.text(max_size=6),
    yaml_values | st.dictionaries(training_keys, yaml_values, max_size=3),
    max_size=5,
)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs)
def test_any_config_is_ok_or_problems_never_a_traceback(monkeypatch, tmp_path, config):
    # catch_exceptions=False: an exception other than an SftError fails here with its traceback.
    _, result = validate(monkeypatch, tmp_path, yaml.safe_dump(config))
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        assert result.stderr.startswith(f"{tmp_path / 'run.yaml'}: ") or result.stderr.startswith("Error: ")


@pytest.mark.parametrize("key", ["on_bad_row", "on_duplicate"])
def test_row_policy_flags_defaults_and_checks_agree(key):
    from sftcore.commands.run import command as run
    from sftcore.config import effective
    from sftcore.data.pipeline import ROW_POLICIES

    flag = next(p for p in run.params if p.name == key)
    assert tuple(flag.type.choices) == ROW_POLICIES[key]
    assert effective({})[key] == ROW_POLICIES[key][0] == {"on_bad_row": "error", "on_duplicate": "keep"}[key]
