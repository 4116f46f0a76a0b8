"""`sft run --adapter`, `sft merge` and the commands that read an adapter run, end to end on the tiny Llama.

Choosing and checking an adapter needs no PEFT; every test that trains one skips without it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from cli_runs import ROWS, forbid_model_loading, loss_points, pretend_packages, sft, write_jsonl
from test_resume import CtrlC, own_signal_handlers, sft_process, sigkill_once_written  # noqa: F401  (a fixture)

from sftcore import hookimpl
from sftcore.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter_model
from sftcore.testing import make_host

# Rows enough for a few steps of 2; the run every adapter test varies.
TRAIN = ("--batch-size", "2", "--lr", "1e-2", "--seed", "0", "--no-progress")
LORA_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json", "tokenizer_config.json", "sft_config.yaml", "summary.json"}
# Everything else an adapter run writes at its top level: the usual records, no model card, no model.
RECORDS = {"sft_data.json", "loss.csv", "trainer_state.json", "training_args.bin", ".sft-lock"}
# The tiny Llama: 106,816 parameters (lm_head tied to the embeddings); r=8 on its 14 linear layers.
TINY_TOTAL, LORA_TRAINABLE = 106_816, 16_384


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rows") / "train.jsonl", ROWS * 2)


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def run(monkeypatch, model, data, output, *args, extra=None):
    return sft(monkeypatch, "run", "--model", model, "--data", data, "--output", output, *TRAIN, *args, extra=extra)


def error_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


# Chosen and checked before anything loads (no PEFT needed).


def test_sft_plugins_lists_the_adapter_stage(monkeypatch):
    result = sft(monkeypatch, "plugins")
    assert result.exit_code == 0, result.output
    table = {tuple(line.split()[:3]) for line in result.stdout.splitlines()}
    for name, plugin in (("none", "full"), ("lora", "lora"), ("qlora", "lora")):
        assert ("adapter", name, plugin) in table, result.stdout
    assert "adapter lora:" in result.stdout
    listing = result.stdout.split("adapter lora:\n", 1)[1].splitlines()
    assert listing[0].split() == ["r", "=", "8", "int"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--adapter", "lroa"), "Error: Unknown adapter 'lroa'. Did you mean 'lora'? Available: lora, none, qlora"),
        (("--adapter", "lora", "--adapter-opt", "r=four"), "Error: adapter 'lora' option 'r' must be int, got 'four'"),
        (("--adapter", "lora", "--adapter-opt", "dropuot=0.1"), "Error: adapter 'lora' has no option 'dropuot'. Did you mean 'dropout'? Accepted: r, alpha,"),
    ],
)
def test_a_bad_adapter_or_option_is_one_line_before_anything_loads(monkeypatch, tmp_path, tiny_model_dir, rows, args, message):
    forbid_model_loading(monkeypatch)
    result = run(monkeypatch, tiny_model_dir, rows, tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert error_line(result).startswith(message), result.stderr


def test_a_bad_value_is_one_line_before_anything_loads(monkeypatch, tmp_path, tiny_model_dir, rows):
    forbid_model_loading(monkeypatch)
    result = run(monkeypatch, tiny_model_dir, rows, tmp_path / "out", "--adapter", "lora", "--adapter-opt", "r=0")
    assert result.exit_code == 1, result.output
    assert error_line(result) == "Error: adapter 'lora' rejected its options: r must be a positive integer, got 0"


def test_missing_peft_is_one_line_with_the_install_command(monkeypatch, tmp_path, tiny_model_dir, rows):
    pretend_packages(monkeypatch, missing=("peft",))
    forbid_model_loading(monkeypatch)
    result = run(monkeypatch, tiny_model_dir, rows, tmp_path / "out", "--adapter", "lora")
    assert result.exit_code == 1, result.output
    assert error_line(result) == "Error: adapter 'lora' needs the peft package, which is not installed: pip install 'sftcore[lora]'"
    assert not (tmp_path / "out" / "sft_config.yaml").exists()


def test_missing_peft_stops_nproc_before_torchrun_starts(monkeypatch, tmp_path, tiny_model_dir, rows):
    pretend_packages(monkeypatch, missing=("peft",))
    monkeypatch.setattr("sftcore.run.distributed.relaunch", lambda nproc: pytest.fail("torchrun was started"))
    result = run(monkeypatch, tiny_model_dir, rows, tmp_path / "out", "--adapter", "lora", "--nproc", "2")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        "Error: adapter 'lora' needs the peft package, which is not installed: pip install 'sftcore[lora]'"
    ]


def test_qlora_on_a_machine_without_cuda_is_one_line(monkeypatch, tmp_path, tiny_model_dir, rows):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    forbid_model_loading(monkeypatch)
    result = run(monkeypatch, tiny_model_dir, rows, tmp_path / "out", "--adapter", "qlora")
    assert result.exit_code == 1, result.output
    assert error_line(result) == (
        "Error: adapter 'qlora' loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU, and this machine "
        "has none; use --adapter lora"
    )


def test_the_config_file_names_the_adapter_and_validate_checks_its_options(monkeypatch, tmp_path, tiny_model_dir, rows):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {rows}\nadapter: {{name: lora, options: {{r: 4, alhpa: 8}}}}\n")
    result = sft(monkeypatch, "validate", config)
    assert result.exit_code == 2
    assert "  - adapter 'lora' has no option 'alhpa'. Did you mean 'alpha'? Accepted: r, alpha, dropout," in result.stderr


def test_a_run_saved_before_the_adapter_stage_is_the_same_run_without_one(tmp_path, tiny_model_dir, rows):
    from sftcore import config as cfg
    from sftcore.errors import UsageError
    from sftcore.run.outdir import CONFIG_FILE, check_output

    config = cfg.effective({"model": str(tiny_model_dir), "data": str(rows), "output": str(tmp_path)})
    older = {key: value for key, value in config.items() if key != "adapter"}
    cfg.dump(older, tmp_path / CONFIG_FILE)
    with pytest.raises(UsageError, match="already holds this run, stopped before its end"):  # not "another config"
        check_output(tmp_path, config, resume=False, overwrite=False, remove=False)
    lora = cfg.effective({**config, "adapter": "lora"})
    with pytest.raises(UsageError, match=r"holds a run with another config \(adapter.name: 'none' then, 'lora' now\)"):
        check_output(tmp_path, lora, resume=True, overwrite=False, remove=False)


# Training with an adapter.


@pytest.fixture(scope="module")
def base_digest(tiny_model_dir):
    """The base checkpoint's weights file as it was before any adapter run here trained on it."""
    import hashlib

    return hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, rows, base_digest):
    pytest.importorskip("peft")
    output = tmp_path_factory.mktemp("lora") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        result = run(monkeypatch, tiny_model_dir, rows, output, "--adapter", "lora", "--epochs", "4")
    assert result.exit_code == 0, result.output
    return output, result


@pytest.mark.slow
def test_an_adapter_run_saves_the_adapter_not_the_model(lora_run, tiny_model_dir):
    from safetensors.torch import load_file

    output, result = lora_run
    files = {p.name for p in output.iterdir() if not p.name.startswith("checkpoint-")}
    assert files == LORA_FILES | RECORDS, files  # never a copy of the base, nor PEFT's model card
    saved = load_file(output / ADAPTER_WEIGHTS)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["trainable_parameters"], summary["total_parameters"]) == (LORA_TRAINABLE, TINY_TOTAL + LORA_TRAINABLE)
    assert f"parameters: {LORA_TRAINABLE:,} trainable of {TINY_TOTAL + LORA_TRAINABLE:,} (13.30%)" in result.stdout
    assert summary["last_loss"] < summary["first_loss"] - 0.5
    checkpoints = sorted(p for p in output.iterdir() if p.name.startswith("checkpoint-"))
    assert all(not (c / "model.safetensors").exists() and (c / ADAPTER_WEIGHTS).is_file() for c in checkpoints)


@pytest.mark.slow
def test_the_base_checkpoint_is_untouched_and_the_run_reloads_with_peft(lora_run, tiny_model_dir, base_digest):
    import hashlib

    import torch
    from peft import AutoPeftModelForCausalLM

    output, _ = lora_run
    assert hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest() == base_digest
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_adapter_model(output, tiny_model_dir).eval()(input_ids=ids).logits
        theirs = AutoPeftModelForCausalLM.from_pretrained(output).eval()(input_ids=ids).logits
    assert ours.equal(theirs)


@pytest.mark.slow
def test_a_full_run_reports_every_parameter_trainable(monkeypatch, tmp_path, tiny_model_dir, rows):
    result = run(monkeypatch, tiny_model_dir, rows, tmp_path / "out", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert f"parameters: {TINY_TOTAL:,} trainable of {TINY_TOTAL:,} (100.00%)" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / ADAPTER_CONFIG).exists()


@pytest.mark.slow
def test_merge_writes_a_plain_model_with_the_adapter_models_logits(monkeypatch, lora_run, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    output, _ = lora_run
    result = sft(monkeypatch, "merge", output, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"merged {output} into {tmp_path / 'merged'}"
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and ADAPTER_CONFIG not in files
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
        adapted = load_adapter_model(output, tiny_model_dir).eval()(input_ids=ids).logits
    assert (merged - adapted).abs().max().item() < 1e-5
    again = sft(monkeypatch, "merge", output, "--output", tmp_path / "merged")
    assert again.exit_code == 2
    assert error_line(again) == f"Error: {tmp_path / 'merged'} already exists and is not an empty directory; choose another --output"
    # The merged model carries the run's records: sft generate prompts it as training did, no PEFT involved.
    from_merged = sft(monkeypatch, "generate", "--model", tmp_path / "merged", "--instruction", "Say hi.", "--max-new-tokens", "4", "--no-progress")
    from_run = sft(monkeypatch, "generate", "--model", output, "--instruction", "Say hi.", "--max-new-tokens", "4", "--no-progress")
    assert from_merged.exit_code == 0 and from_run.exit_code == 0, from_merged.output + from_run.output
    assert from_merged.stdout == from_run.stdout  # greedy: the same logits give the same answer


@pytest.mark.slow
def test_a_moved_base_is_named_and_base_finds_it(monkeypatch, lora_run, tiny_model_dir, tmp_path):
    import shutil

    output, _ = lora_run
    copy = tmp_path / "run"
    shutil.copytree(output, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = (copy / "sft_config.yaml").read_text()
    (copy / "sft_config.yaml").write_text(config.replace(str(tiny_model_dir), str(tmp_path / "gone")))
    expected = (
        f"Error: {copy}: its adapter goes on the model it was trained from, {tmp_path / 'gone'}, which is not there "
        "(moved or deleted?); restore it, or pass --base PATH"
    )
    for args in (("merge", copy, "--output", tmp_path / "m"), ("generate", "--model", copy, "--instruction", "Hi.")):
        result = sft(monkeypatch, *args)
        assert result.exit_code == 2 and error_line(result) == expected, result.output
    assert not (tmp_path / "m").exists()
    moved = sft(monkeypatch, "merge", copy, "--output", tmp_path / "m", "--base", tiny_model_dir)
    assert moved.exit_code == 0 and (tmp_path / "m" / "model.safetensors").is_file(), moved.output


@pytest.mark.slow
def test_merge_refuses_a_full_run(monkeypatch, tmp_path, tiny_model_dir, rows):
    run(monkeypatch, tiny_model_dir, rows, tmp_path / "full", "--max-steps", "1")
    result = sft(monkeypatch, "merge", tmp_path / "full", "--output", tmp_path / "merged")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {tmp_path / 'full'} holds no adapter (adapter_config.json): only an adapter run can be merged"
    )


@pytest.mark.slow
def test_generate_and_preview_work_on_an_adapter_run(monkeypatch, lora_run, rows, tmp_path):
    from sftcore.commands.generate import generate

    output, _ = lora_run
    row = ROWS[1]
    answer = sft(monkeypatch, "generate", "--model", output, "--instruction", row["instruction"], "--input", row["input"],
                 "--max-new-tokens", "8", "--no-progress")
    assert answer.exit_code == 0, answer.output
    assert sft(monkeypatch, "merge", output, "--output", tmp_path / "merged").exit_code == 0
    prompt = make_host().registry.build("template", "alpaca").format_prompt(row)
    assert answer.stdout.strip() == generate(str(tmp_path / "merged"), prompt, 8)  # the merged model answers the same
    for args in (("--config", output / "sft_config.yaml"), ("--model", output, "--data", rows)):  # the run's tokenizer
        preview = sft(monkeypatch, "preview", *args, "-n", "1", "--json")
        assert preview.exit_code == 0, preview.output
        assert json.loads(preview.stdout.splitlines()[0])["row"] == 1


@pytest.mark.slow
def test_training_on_an_adapter_run_is_told_to_merge_it_first(monkeypatch, lora_run, rows, tmp_path):
    output, _ = lora_run
    forbid_model_loading(monkeypatch)
    result = run(monkeypatch, output, rows, tmp_path / "again")
    assert result.exit_code == 2
    assert error_line(result) == f"Error: {output} holds an adapter, not a model: train on its merged model (sft merge {output} --output DIR)"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ("--collator", "packed"),
        ("--loader-opt", "chunked_loss=true", "--loader-opt", "loss_chunk_tokens=7"),
        ("--eval-split", "0.25"),
        ("--set", "gradient_checkpointing=true", "--set", "gradient_checkpointing_kwargs={use_reentrant: true}"),
    ],
    ids=["packed", "chunked-loss", "held-out", "checkpointing"],
)
def test_the_other_stages_keep_working_with_an_adapter(monkeypatch, tmp_path, tiny_model_dir, rows, peft, args):
    from safetensors.torch import load_file

    result = run(monkeypatch, tiny_model_dir, rows, tmp_path / "out", "--adapter", "lora", "--max-steps", "6", *args)
    assert result.exit_code == 0, result.output
    saved = load_file(tmp_path / "out" / ADAPTER_WEIGHTS)
    lora_b = [t for name, t in saved.items() if ".lora_B." in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # they start at zero: every adapter got gradients
    losses = [loss for _, loss in loss_points(tmp_path / "out")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    if "--eval-split" in args:
        assert "held-out loss (3 rows): first" in result.stdout


@pytest.mark.slow
def test_chunked_loss_gives_an_adapter_run_the_same_losses(monkeypatch, tmp_path, tiny_model_dir, rows, peft):
    plain = run(monkeypatch, tiny_model_dir, rows, tmp_path / "plain", "--adapter", "lora", "--max-steps", "4")
    chunked = run(monkeypatch, tiny_model_dir, rows, tmp_path / "chunked", "--adapter", "lora", "--max-steps", "4",
                  "--loader-opt", "chunked_loss=true", "--loader-opt", "loss_chunk_tokens=7")
    assert plain.exit_code == chunked.exit_code == 0, plain.output + chunked.output
    for (_, a), (_, b) in zip(loss_points(tmp_path / "plain"), loss_points(tmp_path / "chunked")):
        assert b == pytest.approx(a, rel=1e-5)


# Stopped and resumed: the same losses and adapter as a run never stopped.

RESUME = ("--adapter", "lora", "--adapter-opt", "dropout=0.1", "--epochs", "2", "--set", "save_steps=3")  # dropout: RNG restored too


def assert_same_adapter_run(resumed, reference, after: int) -> None:
    from safetensors.torch import load_file

    got, want = loss_points(resumed), loss_points(reference)
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, a), (_, b) in zip(got, want):
        if step > after:
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (step, got, want)
    final, expected = load_file(resumed / ADAPTER_WEIGHTS), load_file(reference / ADAPTER_WEIGHTS)
    assert final.keys() == expected.keys()
    for name in expected:
        assert (final[name] - expected[name]).abs().max().item() <= 1e-5, name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, rows):
    pytest.importorskip("peft")
    output = tmp_path_factory.mktemp("whole") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        result = run(monkeypatch, tiny_model_dir, rows, output, *RESUME)
    assert result.exit_code == 0, result.output
    return output


@pytest.mark.slow
def test_ctrl_c_then_resume_ends_as_an_uninterrupted_adapter_run(
    monkeypatch, tmp_path, tiny_model_dir, rows, uninterrupted, own_signal_handlers
):
    output = tmp_path / "out"
    stopped = run(monkeypatch, tiny_model_dir, rows, output, *RESUME, extra={"ctrl_c": CtrlC(4)})
    assert stopped.exit_code == 130, stopped.output
    assert (output / "checkpoint-4" / ADAPTER_WEIGHTS).is_file() and (output / "checkpoint-4" / "optimizer.pt").is_file()
    resumed = run(monkeypatch, tiny_model_dir, rows, output, *RESUME, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_adapter_run(output, uninterrupted, 4)


@pytest.mark.slow
def test_sigkill_then_resume_ends_as_an_uninterrupted_adapter_run(monkeypatch, caplog, tmp_path, tiny_model_dir, rows, uninterrupted):
    from sftcore.run.checkpoints import MARKER

    output = tmp_path / "out"
    args = ["run", "--model", str(tiny_model_dir), "--data", str(rows), "--output", str(output), *TRAIN, *RESUME]
    sigkill_once_written(sft_process(args, tmp_path, SFT_TEST_STEP_SECONDS="0.2"), output / "checkpoint-3" / MARKER)
    assert not (output / "summary.json").exists(), "killed before the end"
    with caplog.at_level(logging.INFO, logger="sftcore"):
        resumed = run(monkeypatch, tiny_model_dir, rows, output, *RESUME, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert any(m.startswith(f"resuming from {output / 'checkpoint-'}") for m in caplog.messages)
    assert_same_adapter_run(output, uninterrupted, 3)


@pytest.mark.slow
def test_two_processes_train_the_adapter_as_one(tmp_path, tiny_model_dir, rows, peft):
    from safetensors.torch import load_file

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    common = [
        sys.executable, "-m", "sftcore.cli", "run", "--model", str(tiny_model_dir), "--data", str(rows), "--adapter", "lora",
        "--max-steps", "4", "--lr", "1e-2", "--seed", "0", "--no-progress", "--set", "lr_scheduler_type=constant",
    ]
    done = {}
    for name, args in (("one", ["--batch-size", "4", "--grad-accum", "2"]), ("two", ["--batch-size", "2", "--grad-accum", "2", "--nproc", "2"])):
        env["SFT_CACHE_DIR"] = str(tmp_path / f"cache-{name}")
        done[name] = subprocess.run([*common, *args, "--output", str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=600)
        assert done[name].returncode == 0, done[name].stderr[-3000:]
    single, double = loss_points(tmp_path / "one"), loss_points(tmp_path / "two")
    assert [s for s, _ in single] == [s for s, _ in double] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(single, double):
        assert b == pytest.approx(a, rel=1e-4)
    one, two = load_file(tmp_path / "one" / ADAPTER_WEIGHTS), load_file(tmp_path / "two" / ADAPTER_WEIGHTS)
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] - two[name]).abs().max() < 1e-5, name
    assert done["two"].stdout.count("parameters: ") == 1


# A third party's adapter, through the same hook.


class LastBlock:
    """Trains the last decoder block only, and asks the loader for float32."""

    def load_options(self):
        return {"dtype": "float32"}

    def apply(self, model, tokenizer):
        from sftcore.model.adapters import decoder_blocks

        _, layers = decoder_blocks(model)
        model.requires_grad_(False)
        layers[-1].requires_grad_(True)
        return model


class Frozen:
    def apply(self, model, tokenizer):
        return model.requires_grad_(False)


class ThirdParty:
    @hookimpl
    def register_adapters(self, register):
        register("last-block", LastBlock)
        register("frozen", Frozen)


@pytest.mark.slow
def test_a_third_party_adapter_trains_what_it_chose_with_its_load_options(monkeypatch, tmp_path, tiny_model_dir, rows):
    from safetensors.torch import load_file

    from sftcore_plugins.flash import FlashLoader

    seen = []
    original = FlashLoader.load
    monkeypatch.setattr(FlashLoader, "load", lambda self, path, **options: seen.append(options) or original(self, path, **options))
    result = run(monkeypatch, tiny_model_dir, rows, tmp_path / "out", "--adapter", "last-block", "--max-steps", "3",
                 extra={"third": ThirdParty()})
    assert result.exit_code == 0, result.output
    assert seen == [{"dtype": "float32"}]
    base, trained = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    changed = sorted(name for name in base if not base[name].equal(trained[name]))
    assert changed and all(name.startswith("model.layers.1.") for name in changed), changed
    block = sum(t.numel() for name, t in base.items() if name.startswith("model.layers.1."))
    assert f"parameters: {block:,} trainable of {TINY_TOTAL:,}" in result.stdout


@pytest.mark.slow
def test_an_adapter_leaving_nothing_to_train_is_one_line(monkeypatch, tmp_path, tiny_model_dir, rows):
    result = run(monkeypatch, tiny_model_dir, rows, tmp_path / "out", "--adapter", "frozen", extra={"third": ThirdParty()})
    assert result.exit_code == 1
    assert error_line(result).startswith("Error: adapter 'frozen' of plugin 'third'")
    assert error_line(result).endswith(
        ": apply() returned a LlamaForCausalLM without a config or without a parameter to train; "
        "fix the plugin or disable it with SFT_DISABLE_PLUGINS=third"
    )


@pytest.mark.slow
def test_a_pad_token_the_loader_added_is_saved_with_the_adapter(monkeypatch, tmp_path, toks, checkpoint_for, rows, peft):
    """A checkpoint without a pad token gets a new one, and embedding rows for it: the adapter file
    must carry them, or the model `sft generate` and `sft merge` rebuild is another one."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftcore.model.adapters import saved_embedding_rows

    base = checkpoint_for(toks.gpt2())
    base_rows = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight.shape[0]
    output = tmp_path / "run"
    result = run(monkeypatch, base, rows, output, "--adapter", "lora", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    adapted = load_adapter_model(output, base).eval()
    rows_saved = saved_embedding_rows(output, adapted.get_base_model())
    assert rows_saved is not None and rows_saved > base_rows and rows_saved % 64 == 0
    assert sft(monkeypatch, "merge", output, "--output", tmp_path / "merged").exit_code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 2, 3, rows_saved - 1]])  # the last row: one the loader added
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max().item() < 1e-5
    answer = sft(monkeypatch, "generate", "--model", output, "--instruction", "Say hello.", "--max-new-tokens", "4", "--no-progress")
    assert answer.exit_code == 0, answer.output


@pytest.mark.slow
def test_generate_and_merge_without_peft_say_how_to_install_it(monkeypatch, lora_run, tmp_path):

    output, _ = lora_run
    pretend_packages(monkeypatch, missing=("peft",))
    expected = f"Error: the adapter run {output} needs the peft package, which is not installed: pip install 'sftcore[lora]'"
    merged = sft(monkeypatch, "merge", output, "--output", tmp_path / "merged")
    answer = sft(monkeypatch, "generate", "--model", output, "--instruction", "Say hello.", "--no-progress")
    assert (merged.exit_code, error_line(merged)) == (1, expected)
    assert (answer.exit_code, error_line(answer)) == (1, expected)
    assert not (tmp_path / "merged").exists()
