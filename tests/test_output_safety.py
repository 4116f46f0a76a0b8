"""`sft run` never writes over another run: a non-empty output directory is refused unless it is
this run's and --resume is given (same config) or --overwrite replaces it."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_runs import forbid_model_loading, run_two_steps as run, sft

from sftcore import config as cfg
from sftcore.run.checkpoints import MARKER
from sftcore.run.outdir import check_output, differences
from sftcore.errors import UsageError
from sftcore.run.outdir import SUMMARY_FILE





@pytest.fixture
def copy_of(tmp_path, finished):
    def copy():
        target = tmp_path / "out"
        shutil.copytree(finished, target)
        return target

    return copy



def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_a_directory_holding_something_else_is_refused_untouched(monkeypatch, tmp_path, tiny_model_dir, data):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    result = run(monkeypatch, tiny_model_dir, data, output)
    assert result.exit_code == 2
    assert result.stderr == f"Error: output {output} is not empty and holds no sft run; choose another --output, or empty it\n"
    assert listing(output) == ["notes.txt"]


def test_the_same_run_again_points_to_resume_and_overwrite(monkeypatch, copy_of, tiny_model_dir, data):
    output = copy_of()
    (output / SUMMARY_FILE).unlink()  # as a run stopped before its end leaves it
    before = listing(output)
    result = run(monkeypatch, tiny_model_dir, data, output)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: output {output} already holds this run, stopped before its end; pass --resume to continue it "
        "from its last checkpoint, or --overwrite to start again\n"
    )
    assert listing(output) == before


@pytest.mark.parametrize(
    ("extra", "what"),
    [((), "choose another --output"), (("--resume",), "--resume: nothing is left to train")],
)
def test_a_finished_run_is_neither_repeated_nor_resumed(monkeypatch, copy_of, tiny_model_dir, data, extra, what):
    output = copy_of()
    before = listing(output)
    result = run(monkeypatch, tiny_model_dir, data, output, *extra)
    assert result.exit_code == 2
    assert result.stderr == f"Error: output {output} holds this run, finished; {what}, or pass --overwrite to train it again\n"
    assert listing(output) == before


@pytest.mark.parametrize("resume", [False, True])
def test_another_config_is_refused_naming_what_differs(monkeypatch, copy_of, tiny_model_dir, data, resume):
    output = copy_of()
    result = run(monkeypatch, tiny_model_dir, data, output, "--seed", "5", "--template", "alpaca-output", *(["--resume"] if resume else []))
    assert result.exit_code == 2
    verb = "--resume needs the config it was started with" if resume else "choose another --output"
    assert result.stderr == (
        f"Error: output {output} holds a run with another config (template.name: 'alpaca' then, 'alpaca-output' now; "
        f"training.seed: 42 then, 5 now); {verb}, or pass --overwrite to replace it\n"
    )


@pytest.mark.parametrize(
    ("prepare", "extra", "message"),
    [
        ("missing", ("--resume",), "--resume: {output} holds no run to resume; leave out --resume to start one"),
        ("no-checkpoint", ("--resume",), "--resume: {output} has no complete checkpoint to resume from; pass --overwrite to start again"),
        ("copy", ("--resume", "--overwrite"), "--resume continues the run in the output directory, --overwrite replaces it: pass one of them"),
    ],
)
def test_resume_needs_a_run_and_a_complete_checkpoint(monkeypatch, copy_of, tiny_model_dir, data, prepare, extra, message):
    output = copy_of()
    if prepare == "missing":
        shutil.rmtree(output)
    elif prepare == "no-checkpoint":
        (output / SUMMARY_FILE).unlink()  # a run stopped before its end
        for checkpoint in output.glob("checkpoint-*"):
            (checkpoint / MARKER).unlink()  # as a kill during the first save leaves it
    result = run(monkeypatch, tiny_model_dir, data, output, *extra)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {message.format(output=output)}\n"


def test_resume_without_output_is_a_usage_error(monkeypatch, tiny_model_dir, data):
    forbid_model_loading(monkeypatch)
    result = sft(monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--resume", "--no-progress")
    assert (result.exit_code, result.stderr) == (2, "Error: --resume needs --output: the directory of the run to continue\n")


def test_overwrite_removes_checkpoints_records_and_the_final_model_and_nothing_else(tmp_path):
    output = tmp_path / "out"
    (output / "checkpoint-7").mkdir(parents=True)
    (output / "checkpoint-7" / MARKER).write_text("7\n")
    (output / "checkpoint-notes").mkdir()
    # pytorch_model.bin: weights a save_safetensors=false run writes, unlisted when it was killed while saving them.
    for name in ("sft_config.yaml", "loss.csv", "trainer_state.json", "notes.txt", "model.safetensors", "config.json",
                 "pytorch_model.bin"):
        (output / name).write_text("x")
    (output / "summary.json").write_text(json.dumps({"model_files": ["config.json", "model.safetensors"]}))
    assert check_output(output, {}, resume=False, overwrite=True) is None
    assert listing(output) == ["checkpoint-notes", "notes.txt"]
    for name in ("sft_config.yaml", "loss.csv"):
        (output / name).write_text("x")
    assert check_output(output, {}, resume=False, overwrite=True, remove=False) is None
    assert (output / "loss.csv").exists(), "only the main process removes"


@pytest.mark.slow
def test_overwrite_starts_again_in_the_same_directory(monkeypatch, copy_of, tiny_model_dir, data):
    output = copy_of()
    (output / "notes.txt").write_text("keep me")
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", output, "--overwrite",
        "--max-steps", "1", "--batch-size", "2", "--seed", "5", "--no-progress",
    )
    assert result.exit_code == 0, result.output
    # The old run's checkpoints are gone; the new one saved none (its only step is the last, and
    # save_steps is 500).
    assert not list(output.glob("checkpoint-*"))
    assert json.loads((output / "summary.json").read_text())["steps"] == 1
    assert cfg.load_yaml(str(output / "sft_config.yaml"))["training"]["seed"] == 5
    assert (output / "notes.txt").read_text() == "keep me"


def test_what_a_resumed_run_may_change():
    saved = {"output": "a", "max_length": 512, "training": {"seed": 1, "save_steps": 10}, "template": {"name": "alpaca"}}
    same = {"output": "./a", "max_length": None, "cache_dir": "/tmp/c", "training": {"seed": 1, "save_steps": 5}, "template": {"name": "alpaca"}}
    assert differences(saved, same) == []
    changed = {**same, "max_length": 256, "training": {"seed": 2, "save_steps": 10}}
    assert differences(saved, changed) == ["max_length: 512 then, 256 now", "training.seed: 1 then, 2 now"]


def test_resume_refuses_checkpoints_without_optimizer_state(tmp_path):
    """save_only_model checkpoints would resume with a fresh optimizer and schedule: not the same run."""
    config = {"model": "m", "data": "d.jsonl", "training": {"seed": 1, "save_only_model": True}}
    output = tmp_path / "out"
    (output / "checkpoint-2").mkdir(parents=True)
    (output / "checkpoint-2" / MARKER).write_text("2\n")
    (output / "checkpoint-2" / "trainer_state.json").write_text("{}")
    cfg.dump(config, output / "sft_config.yaml")
    with pytest.raises(UsageError, match="trained with save_only_model, so its checkpoints hold no optimizer"):
        check_output(output, config, resume=True, overwrite=False)
    config["training"]["save_only_model"] = False
    cfg.dump(config, output / "sft_config.yaml")
    assert check_output(output, config, resume=True, overwrite=False) == output / "checkpoint-2"


def test_a_finished_run_keeps_scheduled_checkpoints_only(monkeypatch, tmp_path, tiny_model_dir, data):
    """save_steps=3 over 4 steps: checkpoint-3 as scheduled, none at the last step beside the final model."""
    output = tmp_path / "out"
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", output,
        "--max-steps", "4", "--batch-size", "2", "--set", "save_steps=3", "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (output / "checkpoint-3" / MARKER).is_file() and (output / "model.safetensors").is_file()


def test_overwrite_removes_a_marked_checkpoint_whatever_else_it_holds_and_the_config_last(monkeypatch, tmp_path):
    import pathlib

    output = tmp_path / "out"
    for step in (4, 8):  # a PEFT save adds README.md; a killed save wrote no marker
        (output / f"checkpoint-{step}").mkdir(parents=True)
        (output / f"checkpoint-{step}" / "README.md").write_text("adapter card")
        (output / f"checkpoint-{step}" / "adapter_model.safetensors").write_text("x")
    (output / "checkpoint-4" / "notes.txt").write_text("a file the Trainer never writes")
    (output / "checkpoint-4" / MARKER).write_text("4\n")
    for name in ("sft_config.yaml", "sft_data.json", "loss.csv", "model.safetensors", "summary.json"):
        (output / name).write_text("{}")
    removed = []
    real_unlink, real_rmtree = pathlib.Path.unlink, shutil.rmtree
    monkeypatch.setattr(pathlib.Path, "unlink", lambda self, *a, **k: (removed.append(self.name), real_unlink(self, *a, **k)))
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: (removed.append(path.name), real_rmtree(path, *a, **k)))
    assert check_output(output, {}, resume=False, overwrite=True) is None
    assert listing(output) == []
    assert removed[0] == SUMMARY_FILE and removed[-1] == "sft_config.yaml"
    assert {"checkpoint-4", "checkpoint-8"} <= set(removed)
