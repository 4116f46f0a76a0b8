"""Config values as a run takes them: checked once (`config.problems`) by `sft validate` and `sft run`
alike, typed by their TrainingArguments field, the flags' names in a file, paths from the file's
directory; every mistake one line and exit 2 before any model loads."""

from __future__ import annotations

import shutil

import pytest
import yaml
from cli_runs import ROWS, forbid_model_loading, sft, write_jsonl

from sftcore import config as cfg
from sftcore.run import arguments
from sftcore import hookimpl
from sftcore.commands.run import config_from_cli

# (flags of `sft run`, the same in a config file's training, the one problem both report)
BAD_VALUES = [
    pytest.param(("--batch-size", 0), "per_device_train_batch_size: 0",
                 "training: 'per_device_train_batch_size' must be >= 1, got 0", id="batch-size-0"),
    pytest.param(("--grad-accum", 0), "gradient_accumulation_steps: 0",
                 "training: 'gradient_accumulation_steps' must be >= 1, got 0", id="grad-accum-0"),
    pytest.param(("--grad-accum", -1), "gradient_accumulation_steps: -1",
                 "training: 'gradient_accumulation_steps' must be >= 1, got -1", id="grad-accum-negative"),
    pytest.param(("--lr", -0.5), "learning_rate: -0.5", "training: 'learning_rate' must be >= 0, got -0.5", id="lr-negative"),
    pytest.param(("--seed", -1), "seed: -1", "training: 'seed' must be >= 0 and <= 4294967295, got -1", id="seed-negative"),
    pytest.param(("--epochs", 0), "num_train_epochs: 0.0",
                 "training: 'num_train_epochs' must be > 0 (or max_steps > 0), got 0.0", id="epochs-0"),
    pytest.param(("--epochs", -1), "num_train_epochs: -1.0",
                 "training: 'num_train_epochs' must be > 0 (or max_steps > 0), got -1.0", id="epochs-negative"),
    pytest.param(("--max-steps", 0), "max_steps: 0",
                 "training: 'max_steps' must be > 0, or -1 to train for num_train_epochs; got 0", id="max-steps-0"),
    pytest.param(("--max-steps", -5), "max_steps: -5",
                 "training: 'max_steps' must be > 0, or -1 to train for num_train_epochs; got -5", id="max-steps-negative"),
    pytest.param(("--set", "logging_steps=0"), "logging_steps: 0",
                 "training: 'logging_steps' must be > 0 when logging_strategy is 'steps', got 0", id="logging-steps-0"),
    pytest.param(("--set", "save_steps=2.5"), "save_steps: 2.5",
                 "training: 'save_steps' must be a whole number of steps (or below 1, a fraction of all steps), got 2.5",
                 id="save-steps-fraction"),
    pytest.param(("--set", "report_to=[[1]]"), "report_to: [[1]]",
                 "training: 'report_to' must be None | str | list, got [[1]]", id="report-to-items"),
    pytest.param(("--set", "output_dir=elsewhere"), "output_dir: elsewhere",
                 "training: 'output_dir' is set by sftcore: give --output (or output: in the config file)", id="output-dir"),
]


@pytest.fixture
def run_files(monkeypatch, tmp_path, tiny_model_dir):
    forbid_model_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    return tiny_model_dir, write_jsonl(tmp_path / "train.jsonl", ROWS)


@pytest.mark.parametrize(("flags", "training", "message"), BAD_VALUES)
def test_validate_and_run_refuse_the_same_value_in_one_line(monkeypatch, tmp_path, run_files, flags, training, message):
    model, data = run_files
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: {model}\ndata: {data}\ntraining: {{{training}}}\n", encoding="utf-8")
    checked = sft(monkeypatch, "validate", config_file)
    assert (checked.exit_code, checked.stderr) == (2, f"{config_file}: 1 problem\n  - {message}\n")

    ran = sft(monkeypatch, "run", "--model", model, "--data", data, "--output", tmp_path / "out", *flags, "--no-progress")
    assert (ran.exit_code, ran.stderr.splitlines()[-1]) == (2, f"Error: {message}"), ran.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("training: [1, 2]\n", "Error: training must be a mapping of TrainingArguments fields, got list"),
        ("template: {name: alpaca, options: [1]}\n", "Error: template options must be a mapping, got list"),
    ],
)
def test_run_reports_a_config_of_the_wrong_shape_with_flags_given(monkeypatch, tmp_path, run_files, text, message):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(text, encoding="utf-8")
    result = sft(monkeypatch, "run", "--config", config_file, "--lr", 0.1, "--template-opt", "output_field=a", "--no-progress")
    assert (result.exit_code, result.stderr.splitlines()[-1]) == (2, message)


def test_ranges_depend_on_the_other_fields():
    assert arguments.training_problems({"num_train_epochs": 0, "max_steps": 3}) == [], "max_steps > 0 decides the length"
    assert arguments.training_problems({"max_steps": -1}) == [], "-1: train for num_train_epochs"
    assert arguments.training_problems({"logging_steps": 0, "logging_strategy": "epoch"}) == []
    assert arguments.training_problems({"save_steps": 0.25, "eval_steps": 0.5, "eval_strategy": "steps"}) == []
    assert arguments.training_problems({"eval_steps": 0, "eval_strategy": "steps"}) == [
        "training: 'eval_steps' must be > 0 when eval_strategy is 'steps', got 0"
    ]
    assert arguments.training_problems({"adam_beta2": 1.0, "weight_decay": -0.1}) == [
        "training: 'adam_beta2' must be >= 0 and < 1, got 1.0",
        "training: 'weight_decay' must be >= 0, got -0.1",
    ]


def test_values_are_typed_by_their_field_as_written():
    assert arguments.typed("save_strategy", False, "no") == "no"
    assert arguments.typed("save_strategy", False, "off") == "off", "the word written, refused as such"
    assert arguments.typed("report_to", False) is False, "free text keeps a boolean, for the type check"
    assert arguments.typed("fsdp", False, "false") is False, "TrainingArguments takes fsdp=False; 'false' is no fsdp option"
    assert arguments.typed("include_num_input_tokens_seen", False, "no") is False, "the field takes a bool"
    assert arguments.typed("learning_rate", "2e-5") == 2e-5
    assert arguments.typed("seed", "7") == 7
    assert arguments.typed("bf16", "yes") == "yes", "text for a bool field is refused, not guessed"
    assert arguments.typed("seed", "1.5") == "1.5"
    assert arguments.typed("not_a_field", "2e-5") == "2e-5"


def test_yaml_and_set_values_reach_the_effective_config_typed(monkeypatch, tmp_path, run_files):
    model, data = run_files
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"model: {model}\ndata: {data}\ntraining: {{save_strategy: no, learning_rate: 2e-5, logging_strategy: Off}}\n"
    )
    checked = sft(monkeypatch, "validate", config_file)
    assert checked.stderr.splitlines()[1:] == [
        "  - training: 'logging_strategy' does not accept 'off'. One of: no, steps, epoch"
    ]
    training = cfg.effective(config_from_cli(str(config_file), {}, ("logging_strategy=no", "adam_epsilon=1e-6")))["training"]
    assert (training["save_strategy"], training["learning_rate"]) == ("no", 2e-5)
    assert (training["logging_strategy"], training["adam_epsilon"]) == ("no", 1e-6)


@pytest.mark.slow
def test_set_save_strategy_no_trains_and_saves_no_checkpoint(monkeypatch, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    output = tmp_path / "out"
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", output, "--max-steps", 2,
        "--set", "save_strategy=no", "--set", "save_steps=1", "--set", "learning_rate=2e-5", "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert not list(output.glob("checkpoint-*")), "save_strategy no: not one checkpoint at save_steps 1"
    saved = yaml.safe_load((output / "sft_config.yaml").read_text())["training"]
    assert (saved["save_strategy"], saved["learning_rate"]) == ("no", 2e-5)
    assert "save_strategy: 'no'" in (output / "sft_config.yaml").read_text(), "quoted: it reads back as the word"


def test_the_flags_names_work_in_a_config_file(monkeypatch, tmp_path, run_files):
    model, data = run_files
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"model: {model}\ndata: {data}\nepochs: 2\nlr: 2e-5\nbatch_size: 4\ngrad_accum: 2\nseed: 7\nmax_steps: 3\n"
    )
    assert sft(monkeypatch, "validate", config_file).stdout == f"{config_file}: OK\n"
    config = cfg.effective(config_from_cli(str(config_file), {}, ()))
    assert not set(cfg.FLAG_TO_TRAINING) & set(config)
    training = config["training"]
    assert [training[field] for field in cfg.FLAG_TO_TRAINING.values()] == [2, 2e-5, 4, 2, 7, 3]
    assert config_from_cli(str(config_file), {"lr": 0.5}, ())["training"]["learning_rate"] == 0.5, "a flag beats the file"


def test_a_flag_name_beside_its_field_is_refused(monkeypatch, tmp_path, run_files):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lr: 1.0e-4\ntraining: {learning_rate: 2.0e-5}\nepoch: 3\n")
    result = sft(monkeypatch, "validate", config_file)
    assert result.stderr.splitlines()[1:] == [
        "  - give lr or training.learning_rate, not both",
        "  - unknown key 'epoch'. Did you mean 'epochs'?",
    ]
    ran = sft(monkeypatch, "run", "--config", config_file, "--set", "learning_rate=0.1", "--no-progress")
    assert ran.stderr.splitlines()[-1] == "Error: unknown key 'epoch'. Did you mean 'epochs'?", "--set overrides both names"


def test_a_model_directory_needs_a_config_and_weights(monkeypatch, tmp_path, run_files):
    model, data = run_files
    unweighted = tmp_path / "no-weights"
    shutil.copytree(model, unweighted, ignore=shutil.ignore_patterns("*.safetensors"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for directory, message in [
        (unweighted, f"model directory {unweighted} has no weights (*.safetensors or pytorch_model.bin): "
                     "give a checkpoint saved with save_pretrained"),
        (bare, f"model directory {bare} has no config.json: give a checkpoint saved with save_pretrained"),
    ]:
        config_file = tmp_path / "run.yaml"
        config_file.write_text(f"model: {directory}\ndata: {data}\n")
        result = sft(monkeypatch, "validate", config_file)
        assert (result.exit_code, result.stderr) == (2, f"{config_file}: 1 problem\n  - {message}\n")
        ran = sft(monkeypatch, "run", "--model", directory, "--data", data, "--no-progress")
        assert (ran.exit_code, ran.stderr.splitlines()[-1]) == (2, f"Error: {message}")
    assert cfg.model_problems(str(unweighted), weights=False) == [], "preview and prepare read no weights"


def test_a_config_files_paths_are_read_from_its_directory(monkeypatch, tmp_path, run_files):
    model, data = run_files
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copy(data, conf / "rows.jsonl")
    (conf / "run.yaml").write_text("model: builtin:tiny-llama\ndata: rows.jsonl\noutput: ../runs/a\ncache_dir: cache\n")
    assert sft(monkeypatch, "validate", "conf/run.yaml").stdout == "conf/run.yaml: OK\n"
    config = config_from_cli("conf/run.yaml", {}, ())
    assert (config["model"], config["data"], config["output"], config["cache_dir"]) == (
        "builtin:tiny-llama", "conf/rows.jsonl", "runs/a", "conf/cache",
    )
    assert config_from_cli("conf/run.yaml", {"data": "train.jsonl"}, ())["data"] == "train.jsonl", "a flag: from here"


@pytest.mark.slow
def test_a_run_from_a_config_elsewhere_saves_absolute_paths_and_is_recognised_again(monkeypatch, tmp_path, tiny_model_dir):
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copytree(tiny_model_dir, conf / "model")
    write_jsonl(conf / "rows.jsonl", ROWS)
    (conf / "run.yaml").write_text("model: model\ndata: rows.jsonl\noutput: ../out\nmax_steps: 1\n")
    monkeypatch.chdir(tmp_path)
    first = sft(monkeypatch, "run", "--config", "conf/run.yaml", "--no-progress")
    assert first.exit_code == 0, first.output
    saved = cfg.load_yaml(str(tmp_path / "out" / "sft_config.yaml"))
    assert (saved["model"], saved["data"], saved["output"]) == (str(conf / "model"), str(conf / "rows.jsonl"), str(tmp_path / "out"))
    again = sft(monkeypatch, "run", "--config", "conf/run.yaml", "--no-progress")
    assert again.stderr.splitlines()[-1] == (
        "Error: output out holds this run, finished; choose another --output, or pass --overwrite to train it again"
    ), "the same command is the same run: its saved config matches"
    checked = sft(monkeypatch, "validate", "out/sft_config.yaml")
    assert (checked.exit_code, checked.stdout) == (0, "out/sft_config.yaml: OK\n"), checked.stderr


def test_a_config_that_is_not_utf8_is_named_in_one_line(monkeypatch, tmp_path, run_files):
    config_file = tmp_path / "run.yaml"
    config_file.write_bytes(b"data: train.jsonl\nmodel: caf\xe9\n")
    message = f"Error: {config_file}, line 2: byte 0xe9 is not UTF-8; save the config as UTF-8 text\n"
    for args in (("validate", config_file), ("run", "--config", config_file)):
        result = sft(monkeypatch, *args)
        assert (result.exit_code, result.stderr) == (2, message)


@pytest.mark.parametrize("where", ["file", "--set"])
def test_fsdp_and_deepspeed_false_stay_booleans_as_training_arguments_takes_them(monkeypatch, tmp_path, run_files, where):
    from transformers import TrainingArguments

    model, data = run_files
    config_file = tmp_path / "run.yaml"
    training = "{fsdp: false, deepspeed: false, save_strategy: no}"
    config_file.write_text(f"model: {model}\ndata: {data}\n" + (f"training: {training}\n" if where == "file" else ""))
    sets = ("fsdp=false", "deepspeed=false", "save_strategy=no") if where == "--set" else ()
    values = config_from_cli(str(config_file), {}, sets)["training"]
    assert (values["fsdp"], values["deepspeed"], values["save_strategy"]) == (False, False, "no")
    assert arguments.training_problems(values) == []
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, **values)  # "false" was an unknown fsdp option
    assert (args.fsdp, args.deepspeed, str(args.save_strategy.value)) == (False, False, "no")
    if where == "file":
        assert sft(monkeypatch, "validate", config_file).stdout == f"{config_file}: OK\n"


def test_a_boolean_is_refused_where_training_arguments_would_read_it_as_a_path(monkeypatch, tmp_path, run_files):
    model, data = run_files
    config_file = tmp_path / "run.yaml"
    # TrainingArguments opens a false accelerator_config as file descriptor 0; true is no deepspeed config either.
    config_file.write_text(f"model: {model}\ndata: {data}\ntraining: {{accelerator_config: false, deepspeed: true}}\n")
    result = sft(monkeypatch, "validate", config_file)
    assert (result.exit_code, result.stderr) == (2, (
        f"{config_file}: 2 problems\n"
        "  - training: 'accelerator_config' must be dict | str | None, got False\n"
        "  - training: 'deepspeed' must be dict | str | None, got True\n"
    ))


@pytest.mark.parametrize(("debug", "problem"), [
    ("[underflow_overflow]", None),
    ("underflow_overflow tpu_metrics_debug", None),
    ("[nonsense]", "training: 'debug' does not accept 'nonsense'. One of: underflow_overflow, tpu_metrics_debug"),
    ("[underflow_overflow, underflow_overflw]", "training: 'debug' does not accept 'underflow_overflw'. Did you mean 'underflow_overflow'?"),
    ("nonsense", "training: 'debug' does not accept 'nonsense'. One of: underflow_overflow, tpu_metrics_debug"),
])
def test_a_list_of_choices_is_checked_item_by_item(monkeypatch, tmp_path, run_files, debug, problem):
    model, data = run_files
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: {model}\ndata: {data}\ntraining:\n  debug: {debug}\n")
    result = sft(monkeypatch, "validate", config_file)
    if problem is None:
        assert (result.exit_code, result.stdout) == (0, f"{config_file}: OK\n"), result.stderr
    else:
        assert (result.exit_code, result.stderr) == (2, f"{config_file}: 1 problem\n  - {problem}\n")


def test_a_config_files_path_found_only_from_the_current_directory_says_so(monkeypatch, tmp_path, run_files):
    _model, _data = run_files  # train.jsonl in the current directory
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "run.yaml").write_text("model: builtin:tiny-llama\ndata: train.jsonl\n")
    result = sft(monkeypatch, "validate", "conf/run.yaml")
    assert (result.exit_code, result.stderr) == (2, (
        "conf/run.yaml: 1 problem\n  - data file not found: conf/train.jsonl (paths in a config file are read from "
        "its directory; for the train.jsonl in the current directory write ../train.jsonl)\n"
    ))
    (conf / "run.yaml").write_text("model: builtin:tiny-llama\ndata: elsewhere.jsonl\n")
    assert sft(monkeypatch, "validate", "conf/run.yaml").stderr.splitlines()[-1] == (
        "  - data file not found: conf/elsewhere.jsonl"
    ), "no hint where the current directory has no such file either"


def test_preview_reads_a_tokenizer_only_directory(monkeypatch, tmp_path):
    from sftcore.assets import TINY_LLAMA

    monkeypatch.chdir(tmp_path)
    tokenizer = tmp_path / "tok"
    shutil.copytree(TINY_LLAMA, tokenizer, ignore=shutil.ignore_patterns("config.json"))
    data = write_jsonl(tmp_path / "train.jsonl", ROWS[:1])
    result = sft(monkeypatch, "preview", "--tokenizer", tokenizer, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    assert [yaml.safe_load(line)["response"] for line in result.stdout.splitlines()] == [ROWS[0]["output"]]
    missing = sft(monkeypatch, "preview", "--tokenizer", tmp_path / "nothing", "--data", data)
    assert (missing.exit_code, missing.stderr) == (2, f"Error: tokenizer directory not found: {tmp_path / 'nothing'}\n")


class FileLoader:
    """A third-party loader whose model is one file (as a GGUF is), not a save_pretrained directory."""

    @hookimpl
    def register_model_loaders(self, register):
        register("gguf", lambda: None, description="one model file")


def test_only_the_builtin_loader_needs_a_checkpoint_directory(monkeypatch, tmp_path, run_files):
    _model, data = run_files
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: {weights}\ndata: {data}\nloader: gguf\n")
    assert sft(monkeypatch, "validate", config_file, extra={"gguf": FileLoader()}).stdout == f"{config_file}: OK\n"
    config_file.write_text(f"model: {tmp_path / 'missing.gguf'}\ndata: {data}\nloader: gguf\n")
    result = sft(monkeypatch, "validate", config_file, extra={"gguf": FileLoader()})
    assert result.stderr == f"{config_file}: 1 problem\n  - model not found: {tmp_path / 'missing.gguf'}\n"
    config_file.write_text(f"model: {weights}\ndata: {data}\n")
    result = sft(monkeypatch, "validate", config_file, extra={"gguf": FileLoader()})
    assert result.stderr == f"{config_file}: 1 problem\n  - model directory not found: {weights}\n", "flash reads a directory"
