"""Run configuration: a YAML file with flags laid over it, reaching the Trainer, saved and reloadable;
every mistake a usage error (exit 2) before any model loads."""

from __future__ import annotations

import copy
import os
import subprocess

import pytest
from cli_runs import ROWS, SFT, forbid_model_loading, sft, write_jsonl

from sftcore import config as cfg
from sftcore.run import arguments
from sftcore import hookimpl
from sftcore.commands.run import config_from_cli


def test_flags_override_the_yaml_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "model: m\ndata: d.jsonl\nmax_length: 256\nmasker: response-only\n"
        "template: {name: alpaca, options: {instruction_field: q, output_field: a}}\n"
        "training: {learning_rate: 1.0e-4, num_train_epochs: 2, lr_scheduler_type: linear}\n"
    )
    values = {"data": "other.jsonl", "lr": 5e-4, "masker_name": "full", "template_opts": ("output_field=answer",)}
    config = cfg.effective(config_from_cli(str(config_file), values, ("weight_decay=0.1", "warmup_steps=0.05")))

    # The file's paths are read from its directory, the flags' from the current one.
    assert (config["model"], config["data"], config["max_length"]) == (str(tmp_path / "m"), "other.jsonl", 256)
    assert config["template"] == {"name": "alpaca", "options": {"instruction_field": "q", "output_field": "answer"}}
    assert config["masker"] == {"name": "full", "options": {}}
    assert config["collator"] == {"name": "pad", "options": {}}, "registry.yaml's default fills an unnamed stage"
    training = config["training"]
    assert (training["learning_rate"], training["num_train_epochs"], training["lr_scheduler_type"]) == (5e-4, 2, "linear")
    assert (training["weight_decay"], training["warmup_steps"]) == (0.1, 0.05)
    assert training["per_device_train_batch_size"] == arguments.TRAINING_DEFAULTS["per_device_train_batch_size"]


class Spy:
    """A plugin that records the TrainingArguments the Trainer got and the config the hook saw."""

    def __init__(self) -> None:
        self.args = self.config = None

    @hookimpl
    def trainer_callbacks(self, config):
        from transformers import TrainerCallback

        self.config = copy.deepcopy(dict(config))
        spy = self

        class Record(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                spy.args = args

        return [Record()]


@pytest.mark.slow
def test_yaml_flags_and_set_reach_the_trainer_and_the_saved_config_reloads(monkeypatch, tmp_path, tiny_model_dir):
    rows = [{"question": r["instruction"], "answer": r["output"]} for r in ROWS]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"model: {tiny_model_dir}\ndata: {data}\n"
        "template: {name: alpaca, options: {instruction_field: question}}\n"
        "training: {learning_rate: 1.0e-4, lr_scheduler_type: constant, per_device_train_batch_size: 4}\n"
    )
    output = tmp_path / "out"
    spy = Spy()
    result = sft(
        monkeypatch, "run", "--config", config_file, "--output", output, "--lr", 5e-4, "--max-steps", 1,
        "--set", "weight_decay=0.125", "--set", "adam_beta2=0.99", "--template-opt", "output_field=answer",
        "--no-progress", extra={"spy": spy},
    )
    # The data has no 'instruction' or 'output' column: the run trains only if both template options arrived.
    assert result.exit_code == 0, result.output

    args = spy.args
    assert args.learning_rate == 5e-4, "a flag beats the file"
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "constant"
    assert args.per_device_train_batch_size == 4
    assert (args.weight_decay, args.adam_beta2, args.max_steps) == (0.125, 0.99, 1)

    saved = cfg.load_yaml(str(output / "sft_config.yaml"))
    assert saved == spy.config, "what is saved is the config the run used"
    assert saved["template"] == {"name": "alpaca", "options": {"instruction_field": "question", "output_field": "answer"}}
    assert saved["training"]["weight_decay"] == 0.125 and saved["max_length"] == 512
    assert cfg.effective(config_from_cli(str(output / "sft_config.yaml"), {}, ())) == saved
    checked = sft(monkeypatch, "validate", output / "sft_config.yaml")
    assert (checked.exit_code, checked.stdout) == (0, f"{output / 'sft_config.yaml'}: OK\n")


USAGE_ERRORS = [
    pytest.param(("--collator", "padd"), "Unknown collator 'padd'. Did you mean 'pad'? Available: packed, pad", id="collator"),
    pytest.param(
        ("--template", "alpacca"), "Unknown template 'alpacca'. Did you mean 'alpaca'? Available: alpaca, alpaca-output",
        id="template",
    ),
    pytest.param(
        ("--template-opt", "instruction_fild=q"),
        "template 'alpaca' has no option 'instruction_fild'. Did you mean 'instruction_field'? Accepted: instruction_field, input_field, output_field, response_marker",
        id="template-option",
    ),
    pytest.param(
        ("--masker-opt", "truncation=middle"),
        "masker 'response-only' option 'truncation' must be one of 'prompt-left', 'right', 'drop', got 'middle'",
        id="masker-option",
    ),
    pytest.param(
        ("--set", "learning_rat=0.1"),
        "training: 'learning_rat' is not a TrainingArguments field. Did you mean 'learning_rate'?",
        id="set-field",
    ),
    pytest.param(("--set", "warmup"), "--set expects key=value, got 'warmup'", id="set-syntax"),
    pytest.param(("--model", "."), "give both --model and --data (or neither, to train the bundled demo)", id="model-no-data"),
    pytest.param(("--data", "x.jsonl"), "give both --model and --data", id="data-no-model"),
    pytest.param(("--output", "train.jsonl"), "output must be a directory, but train.jsonl is a file", id="output-file"),
]


@pytest.mark.parametrize(("args", "message"), USAGE_ERRORS)
def test_usage_errors_exit_2_before_any_model_loads(monkeypatch, tmp_path, args, message):
    forbid_model_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    result = sft(monkeypatch, "run", *args, "--no-progress")
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "sft-runs").exists()


def test_unknown_component_in_a_real_process(tmp_path):
    env = {**os.environ, "SFT_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([SFT, "run", "--collator", "padd"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == "Error: Unknown collator 'padd'. Did you mean 'pad'? Available: packed, pad"
    assert "attention:" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists(), "the demo model was never made"


def test_validate_reports_every_problem_at_once(monkeypatch, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "model: nowhere\nmax_lenght: 512\ncollator: padd\n"
        "template: {name: alpaca, options: {instruction_fild: q}}\n"
        "training: {learning_rat: 1.0e-4, num_train_epochs: many}\n"
    )
    result = sft(monkeypatch, "validate", config_file)
    assert result.exit_code == 2
    expected = [
        "unknown key 'max_lenght'. Did you mean 'max_length'?",
        "give both --model and --data (or neither, to train the bundled demo)",
        f"model directory not found: {tmp_path / 'nowhere'}",
        "template 'alpaca' has no option 'instruction_fild'",
        "Unknown collator 'padd'. Did you mean 'pad'?",
        "training: 'learning_rat' is not a TrainingArguments field. Did you mean 'learning_rate'?",
        "training: 'num_train_epochs' must be a number, got 'many'",
    ]
    lines = result.stderr.splitlines()
    assert lines[0] == f"{config_file}: {len(expected)} problems"
    for message in expected:
        assert sum(message in line for line in lines[1:]) == 1, message


def test_validate_accepts_the_demo_and_rejects_broken_yaml(monkeypatch, tmp_path):
    empty = tmp_path / "demo.yaml"
    empty.write_text("# nothing: the bundled demo\n")
    assert sft(monkeypatch, "validate", empty).stdout == f"{empty}: OK\n"
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    result = sft(monkeypatch, "validate", broken)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {broken}, line 2, column 1: invalid YAML: expected ',' or ']', but got '<stream end>'\n"


def test_the_demo_names_the_model_the_run_builds():
    from sftcore.data import prepare
    from sftcore.assets import BUILTIN_MODEL, TINY_LLAMA

    demo = cfg.effective({})
    assert demo["model"] == BUILTIN_MODEL == prepare.BUILTIN_MODEL
    assert prepare.tokenizer_source(demo) == str(TINY_LLAMA), "the built-in tokenizer, no weights made"


def test_commands_lay_flags_over_the_config_one_way():
    from sftcore.commands import common, run

    assert config_from_cli is common.config_from_cli is run.config_from_cli
    assert config_from_cli.__module__ == "sftcore.commands.common", "preview, prepare and validate need not import run"
