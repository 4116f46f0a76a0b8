"""A run's output can be trusted: --overwrite removes only sftcore's files, and the old final model
first; a finished run is marked; a diverged run stops; one run at a time per directory; resumed
runs train on the same data from an intact checkpoint; the cache cleans up after dead writers;
disks and permissions fail in one line."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest
from safetensors import SafetensorError
from cli_runs import TWO_STEPS, forbid_model_loading, run_two_steps as run, sft

from sftcore import hookimpl
from sftcore.data import cache
from sftcore import config as cfg
from sftcore.run.outdir import DATA_FILE, LOCK_FILE, check_output, locked
from sftcore.run.checkpoints import MARKER, damage, newest_complete, write_marker
from sftcore.errors import SftError
from sftcore.run.outdir import SUMMARY_FILE
from sftcore.run.summary import Summary
from sftcore.run.train import default_output, output_errors





@pytest.fixture
def stopped(tmp_path, finished):
    """A copy of the finished run as a run stopped before its end leaves it: no summary.json."""
    output = tmp_path / "out"
    shutil.copytree(finished, output)
    (output / SUMMARY_FILE).unlink()
    return output



def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ---- --overwrite removes only what sftcore wrote -------------------------------------------


@pytest.mark.parametrize("extra", [(), ("--overwrite",)])
def test_a_directory_of_another_tool_is_refused_even_with_overwrite(monkeypatch, tmp_path, tiny_model_dir, data, extra):
    output = tmp_path / "theirs"
    (output / "checkpoint-1000").mkdir(parents=True)
    (output / "checkpoint-1000" / "weights.bin").write_text("not sftcore's")
    (output / "loss.csv").write_text("step,loss\n1000,0.5\n")
    before = listing(output)
    result = run(monkeypatch, tiny_model_dir, data, output, *extra)
    assert result.exit_code == 2
    assert result.stderr == f"Error: output {output} is not empty and holds no sft run; choose another --output, or empty it\n"
    assert listing(output) == before


def test_overwrite_in_an_sft_run_leaves_a_checkpoint_holding_files_sftcore_does_not_write(tmp_path, caplog):
    output = tmp_path / "out"
    ours, theirs = output / "checkpoint-3", output / "checkpoint-5"
    ours.mkdir(parents=True)
    theirs.mkdir()
    for name in ("optimizer.pt", "rng_state.pth", "trainer_state.json", "model.safetensors"):
        (ours / name).write_text("x")
    write_marker(ours, 3)
    (theirs / "notes.md").write_text("mine")
    (output / "sft_config.yaml").write_text("model: m\n")
    assert check_output(output, {}, resume=False, overwrite=True) is None
    assert listing(output) == ["checkpoint-5", "checkpoint-5/notes.md"]
    assert f"--overwrite: left {theirs}: it holds files sftcore does not write" in caplog.messages


# ---- the final model: removed first by --overwrite, trusted only once summary.json is there --


class KilledAtStep:
    """Stops the process at the end of step ``at`` as a kill would: nothing more is saved."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def trainer_callbacks(self, config):
        from transformers import TrainerCallback

        at = self.at

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == at:
                    raise KeyboardInterrupt

        return [Kill()]


@pytest.mark.slow
def test_overwrite_removes_the_old_final_model_before_the_new_run_trains(monkeypatch, tmp_path, finished, tiny_model_dir, data):
    output = tmp_path / "out"
    shutil.copytree(finished, output)
    assert (output / "model.safetensors").is_file()
    written = json.loads((output / SUMMARY_FILE).read_text())["model_files"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(written)

    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", output, *TWO_STEPS, "--overwrite",
        "--seed", "5", "--set", "save_steps=100", extra={"killed": KilledAtStep(1)},
    )
    assert result.exit_code == 130, result.output
    assert (output / "sft_config.yaml").is_file(), "the new run had started"
    assert not any((output / name).exists() for name in written)
    assert not (output / SUMMARY_FILE).exists() and not list(output.glob("checkpoint-*"))
    result = sft(monkeypatch, "generate", "--model", output, "--instruction", "hi")
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {output}: its run did not finish (no summary.json), so it holds no final model; "
        "continue it with `sft run --resume`, or pass another --model\n"
    )


def test_generate_refuses_weights_without_a_finished_run(monkeypatch, stopped):
    (stopped / "model.safetensors").write_bytes(b"an old or half-written model")
    result = sft(monkeypatch, "generate", "--model", stopped, "--instruction", "hi")
    assert (result.exit_code, result.stderr.count("\n")) == (2, 1)
    assert "its run did not finish (no summary.json)" in result.stderr


# ---- a diverged run stops ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("nan_filter", [(), ("--set", "logging_nan_inf_filter=true")])
def test_a_diverged_run_stops_with_exit_1_and_saves_no_final_model(monkeypatch, tmp_path, tiny_model_dir, data, nan_filter):
    output = tmp_path / "out"
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", output,
        "--max-steps", "20", "--batch-size", "2", "--lr", "1e30", "--no-progress", *nan_filter,
    )
    assert result.exit_code == 1, result.output
    last = result.stderr.splitlines()[-1]
    assert last.startswith("Error: the training "), result.stderr
    assert last.endswith(
        "; the run stopped and saved no final model. Try a lower learning rate (--lr, now 1e+30), "
        "or a smaller max_grad_norm (now 1) or more warmup (--set warmup_ratio=0.1)"
    ), last
    assert " became nan at step " in last or " became inf at step " in last
    assert not (output / "model.safetensors").exists() and not (output / SUMMARY_FILE).exists()
    assert not list(output.glob("checkpoint-*"))


def test_a_non_finite_loss_names_the_step_and_what_to_try():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from sftcore.run.interrupt import Diverged, StopOnNonFinite

    args = TrainingArguments(output_dir="unused", learning_rate=3e-4, fp16=False, max_grad_norm=0.0, report_to="none", use_cpu=True)
    state = TrainerState(global_step=7)
    StopOnNonFinite().on_log(args, state, TrainerControl(), logs={"loss": 2.5, "grad_norm": 1.0})
    with pytest.raises(Diverged) as caught:
        StopOnNonFinite().on_log(args, state, TrainerControl(), logs={"loss": math.nan})
    assert str(caught.value) == (
        "the training loss became nan at step 7; the run stopped and saved no final model. "
        "Try a lower learning rate (--lr, now 0.0003), or gradient clipping (--set max_grad_norm=1.0)"
    )
    assert caught.value.exit_code == 1


def test_the_nan_filter_is_off_unless_a_config_sets_it():
    from sftcore import config as cfg
    from sftcore.run.train import training_arguments

    config = cfg.effective({})
    assert training_arguments(config, "out").logging_nan_inf_filter is False
    config["training"]["logging_nan_inf_filter"] = True
    assert training_arguments(config, "out").logging_nan_inf_filter is True


# ---- one run per directory -----------------------------------------------------------------


def test_a_second_run_in_a_directory_in_use_fails_at_once_naming_the_holder(monkeypatch, tmp_path, tiny_model_dir, data):
    output = tmp_path / "out"
    output.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from sftcore.run.outdir import locked
            with locked(Path({str(output)!r})):
                print("held", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        result = run(monkeypatch, tiny_model_dir, data, output)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: output {output} is in use by another sft run (pid {holder.pid}); wait for it to end, or choose another --output\n"
    )
    assert listing(output) == [LOCK_FILE]


def test_the_lock_goes_with_its_holder(tmp_path):
    with locked(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with locked(tmp_path):  # released: taken again at once
        pass


def test_default_names_started_in_the_same_second_differ(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt: "20260101-120000")
    config = {"model": "some/model"}
    names = [default_output(config, create=True) for _ in range(3)]
    assert names == ["sft-runs/run-20260101-120000", "sft-runs/run-20260101-120000-2", "sft-runs/run-20260101-120000-3"]
    assert all((tmp_path / name).is_dir() for name in names)
    assert default_output(config) == names[0], "only the main process creates; the others' names are discarded"


# ---- resuming: the same data, an intact checkpoint -----------------------------------------


def test_resume_refuses_data_that_changed_since_the_run_started(monkeypatch, stopped, tiny_model_dir, data):
    record = json.loads((stopped / DATA_FILE).read_text())
    assert record == {"data": {"path": str(data), "sha256": cache.file_digest(data)}}
    record["data"]["sha256"] = "0" * 64  # as if the file had other content when the run started
    (stopped / DATA_FILE).write_text(json.dumps(record))
    result = run(monkeypatch, tiny_model_dir, data, stopped, "--resume")
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: --resume: {data} (data) changed since the run started (sha256 000000000000 then, "
        f"{cache.file_digest(data)[:12]} now); a resumed run must train on the data it started on: restore that file, "
        "or pass --overwrite to start again on this one\n"
    )


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(monkeypatch, caplog, stopped, tiny_model_dir, data):
    caplog.set_level(logging.INFO, "sftcore")
    optimizer = stopped / "checkpoint-2" / "optimizer.pt"
    size = optimizer.stat().st_size
    with open(optimizer, "r+b") as handle:
        handle.truncate(size // 2)
    result = run(monkeypatch, tiny_model_dir, data, stopped, "--resume", load=True)
    assert result.exit_code == 0, result.output
    assert (
        f"ignoring {stopped / 'checkpoint-2'}: optimizer.pt has {size // 2} bytes, {size} when saved" in caplog.messages
    )
    assert f"resuming from {stopped / 'checkpoint-1'}" in caplog.messages
    assert json.loads((stopped / SUMMARY_FILE).read_text())["steps"] == 2


def test_a_checkpoint_whose_files_changed_is_not_complete(monkeypatch, tmp_path, stopped, tiny_model_dir, data):
    assert newest_complete(stopped) == (stopped / "checkpoint-2", [])
    weights = stopped / "checkpoint-1" / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF  # same size, one bit pattern changed
    weights.write_bytes(bytes(content))
    assert damage(stopped / "checkpoint-1") == "model.safetensors differs from the file saved (sha256)"
    (stopped / "checkpoint-2" / "scheduler.pt").unlink()
    assert damage(stopped / "checkpoint-2") == "scheduler.pt is missing"
    marker = stopped / "checkpoint-2" / MARKER
    marker.write_text(marker.read_text()[:-20])
    assert damage(stopped / "checkpoint-2") == f"its {MARKER} file is damaged"
    result = run(monkeypatch, tiny_model_dir, data, stopped, "--resume")
    assert result.exit_code == 2
    assert result.stderr == f"Error: --resume: {stopped} has no complete checkpoint to resume from; pass --overwrite to start again\n"


def test_the_marker_lists_every_file_of_the_checkpoint(finished):
    marker = json.loads((finished / "checkpoint-2" / MARKER).read_text())
    files = {p.name for p in (finished / "checkpoint-2").iterdir()} - {MARKER}
    assert marker["step"] == 2 and set(marker["files"]) == files
    assert marker["files"]["optimizer.pt"] == {
        "size": (finished / "checkpoint-2" / "optimizer.pt").stat().st_size,
        "sha256": cache.file_digest(finished / "checkpoint-2" / "optimizer.pt"),
    }


# ---- the cache after a killed write --------------------------------------------------------


def test_the_temporary_of_a_killed_cache_write_goes_at_the_next_use(tmp_path):
    directory = tmp_path / "prepared"
    writer = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, signal
            import safetensors.numpy
            from sftcore import hookimpl
            from sftcore.data import cache
            from sftcore.data.pipeline import Prepared

            def save_file(arrays, path, metadata=None):
                with open(path, "wb") as handle:
                    handle.write(b"x" * 100_000)  # part of the entry, then the kill
                os.kill(os.getpid(), signal.SIGKILL)

            safetensors.numpy.save_file = save_file
            rows = [{{"input_ids": [1, 2], "labels": [-100, 2], "row": 1}}]
            cache.store({str(directory)!r}, "k", Prepared(rows=rows, rows_read=1), 8)
        """)],
    )
    assert writer.returncode == -signal.SIGKILL
    [orphan] = directory.glob(".*.tmp")
    live = directory / f".{os.getpid()}@{cache.HOST}.abc123.tmp"  # a write in progress in a live process
    live.write_bytes(b"y")
    assert cache.load(directory, "k") is None
    assert not orphan.exists()
    assert live.exists()


@pytest.mark.parametrize(
    ("target", "error", "reason"),
    [
        ("tempfile.mkstemp", PermissionError(errno.EROFS, "Read-only file system"), "Read-only file system"),
        ("safetensors.numpy.save_file", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ],
)
def test_a_cache_that_cannot_be_written_is_skipped_with_a_warning(
    monkeypatch, caplog, tmp_path, tiny_model_dir, data, target, error, reason
):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(target, fail)
    result = sft(
        monkeypatch, "prepare", "--model", tiny_model_dir, "--data", data, "--cache-dir", tmp_path / "c", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert f"cannot write the prepared-data cache in {tmp_path / 'c'} ({reason}); going on without it" in caplog.messages
    assert "rows: 6 prepared of 6 read" in result.stdout
    assert not list((tmp_path / "c").glob(".*"))


# ---- disks and permissions: one line --------------------------------------------------------


def test_an_output_that_is_a_dangling_symlink_is_one_line(monkeypatch, tmp_path, tiny_model_dir, data):
    output = tmp_path / "out"
    output.symlink_to(tmp_path / "gone" / "runs")
    result = run(monkeypatch, tiny_model_dir, data, output)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: output {output} is a symbolic link to {tmp_path / 'gone' / 'runs'}, which does not exist; "
        "create its target, or choose another --output\n"
    )


def test_a_read_only_output_is_one_line(monkeypatch, tmp_path, tiny_model_dir, data):
    """Tests run as root, whom chmod does not stop: the read-only mount is simulated at os.open."""
    output = tmp_path / "out"
    output.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(output)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    result = run(monkeypatch, tiny_model_dir, data, output)
    assert result.exit_code == 1
    assert result.stderr == f"Error: output {output} is not writable (Read-only file system); choose another --output\n"


@pytest.mark.slow
def test_a_full_disk_while_saving_the_model_is_one_line(monkeypatch, tmp_path, tiny_model_dir, data):
    output = tmp_path / "out"

    def full(self, output_dir=None, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "model.safetensors"))

    monkeypatch.setattr("transformers.Trainer.save_model", full)
    result = run(monkeypatch, tiny_model_dir, data, output, load=True)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: {output / 'checkpoint-1' / 'model.safetensors'}: No space left on device; free some space, then run again "
        "(--resume continues from a complete checkpoint)"
    )
    assert "Traceback" not in result.output and not (output / SUMMARY_FILE).exists()


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"),
        SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "out/model.safetensors"'),
    ],
)
def test_a_full_disk_reported_by_torch_or_safetensors_is_one_line(tmp_path, error):
    with pytest.raises(SftError) as caught, output_errors(tmp_path):
        raise error
    assert str(caught.value).startswith(f"output {tmp_path}: a file could not be written (")
    assert str(caught.value).endswith("); free some space, then run again (--resume continues from a complete checkpoint)")
    with pytest.raises(RuntimeError, match="another problem"), output_errors(tmp_path):
        raise RuntimeError("another problem")


def test_any_other_os_error_is_one_line_at_the_command_line(monkeypatch, tmp_path):
    def broken(ctx):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp_path / "disk"))

    monkeypatch.setattr("sftcore.commands.validate.host_from", broken)
    (tmp_path / "run.yaml").write_text("model: m\n")
    result = sft(monkeypatch, "validate", tmp_path / "run.yaml")
    assert (result.exit_code, result.stderr) == (1, f"Error: {tmp_path / 'disk'}: Input/output error\n")


# ---- the held-out summary ------------------------------------------------------------------


def test_the_summary_gives_the_best_held_out_loss_and_its_step():
    summary = Summary(
        output="out", rows_read=1, rows_used=1, skipped={}, dropped={}, truncated={}, tokens=1, supervised_tokens=1,
        padding_fraction=0.0, tokens_per_second=1.0, steps=30, first_loss=2.0, last_loss=0.5, seconds=1.0,
        eval_rows=4, first_eval_loss=1.9, last_eval_loss=1.7, best_eval_loss=1.25, best_eval_step=20,
    )
    assert "held-out loss (4 rows): first 1.9000, last 1.7000, best 1.2500 at step 20" in summary.lines()


# ---- a diverged run, under fp16 and between logged steps -----------------------------------


def fp16_args():
    """What StopOnNonFinite reads of the arguments of an fp16 run (CPUs refuse fp16 TrainingArguments)."""
    return types.SimpleNamespace(fp16=True, learning_rate=1e-3, max_grad_norm=1.0)


def test_an_fp16_step_the_scaler_skips_does_not_stop_the_run():
    from transformers import TrainerControl, TrainerState

    from sftcore.run.interrupt import Diverged, StopOnNonFinite

    state = TrainerState(global_step=3)
    StopOnNonFinite().on_log(fp16_args(), state, TrainerControl(), logs={"loss": 2.5, "grad_norm": math.inf})
    with pytest.raises(Diverged, match="^the training loss became inf at step 3;"):
        StopOnNonFinite().on_log(fp16_args(), state, TrainerControl(), logs={"loss": math.inf, "grad_norm": math.inf})
    without_fp16 = types.SimpleNamespace(fp16=False, learning_rate=1e-3, max_grad_norm=1.0)
    with pytest.raises(Diverged, match="^the training gradient norm became inf at step 3;"):
        StopOnNonFinite().on_log(without_fp16, state, TrainerControl(), logs={"loss": 2.5, "grad_norm": math.inf})
    # accelerate launch --mixed_precision fp16 sets mixed_precision, not fp16: the scaler runs all the same
    launched = types.SimpleNamespace(fp16=False, mixed_precision="fp16", learning_rate=1e-3, max_grad_norm=1.0)
    StopOnNonFinite().on_log(launched, state, TrainerControl(), logs={"loss": 2.5, "grad_norm": math.inf})


def test_a_step_that_saves_is_logged_so_a_nan_there_is_seen_before_the_checkpoint():
    from transformers import TrainerControl, TrainerState

    from sftcore.run.interrupt import StopOnNonFinite

    saving, not_saving = TrainerControl(should_save=True), TrainerControl()
    StopOnNonFinite().on_step_end(fp16_args(), TrainerState(global_step=5), saving)
    StopOnNonFinite().on_step_end(fp16_args(), TrainerState(global_step=6), not_saving)
    StopOnNonFinite().on_epoch_end(fp16_args(), TrainerState(global_step=7), epoch_end := TrainerControl(should_save=True))
    assert (saving.should_log, not_saving.should_log, epoch_end.should_log) == (True, False, True)


# ---- DDP's unused parameters, TrainingArguments' own refusals, multi-line OSErrors: one line --


def test_ddp_unused_parameters_are_one_line_naming_the_setting(tmp_path):
    error = RuntimeError(
        "Expected to have finished reduction in the prior iteration before starting a new one. This error "
        "indicates that your module has parameters that were not used in producing loss.\n"
        "Parameter indices which did not receive grad for rank 0: 3 4"
    )
    with pytest.raises(SftError) as caught, output_errors(tmp_path):
        raise error
    assert str(caught.value) == (
        "DDP: some of the model's parameters took no part in the loss, and sftcore does not ask DDP to look for "
        "such parameters by default; pass --set ddp_find_unused_parameters=true"
    )
    # Told to look already, DDP means outputs outside the loss: that advice would be wrong.
    with pytest.raises(RuntimeError, match="^Expected to have finished reduction"), output_errors(tmp_path, True):
        raise error


def test_settings_training_arguments_refuses_are_one_line_and_leave_no_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    forbid_model_loading(monkeypatch)
    result = sft(monkeypatch, "run", "--set", "load_best_model_at_end=true", "--max-steps", "1", "--no-progress")
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: training settings: --load_best_model_at_end requires the save and eval strategy to match, except "
        'when --save_strategy="best", but found - Evaluation strategy: IntervalStrategy.NO - Save strategy: '
        "SaveStrategy.STEPS; change the config's training section or --set\n"
    )
    assert listing(tmp_path) == []


def test_a_multi_line_os_error_is_one_line_at_the_command_line(monkeypatch, tmp_path):
    def offline(ctx):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your internet connection.")

    monkeypatch.setattr("sftcore.commands.validate.host_from", offline)
    (tmp_path / "run.yaml").write_text("model: m\n")
    result = sft(monkeypatch, "validate", tmp_path / "run.yaml")
    assert (result.exit_code, result.stderr) == (
        1, "Error: We couldn't connect to 'https://huggingface.co' to load the files. Check your internet connection.\n"
    )


# ---- locks, cleanups, damaged records --------------------------------------------------------


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(monkeypatch, caplog, tmp_path):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr("fcntl.flock", no_locks)
    entered = False
    with locked(tmp_path):
        entered = True
    assert entered
    assert caplog.messages == [
        f"output {tmp_path} cannot be locked (No locks available); running unlocked: a second run there would not be refused"
    ]


def test_a_refused_run_leaves_an_empty_directory_empty(monkeypatch, tmp_path, tiny_model_dir, data):
    output = tmp_path / "empty"
    output.mkdir()
    result = run(monkeypatch, tiny_model_dir, data, output, "--resume")
    assert (result.exit_code, result.stderr) == (
        2, f"Error: --resume: {output} holds no run to resume; leave out --resume to start one\n"
    )
    assert listing(output) == []


def test_a_stale_temporary_goes_even_when_its_pid_is_alive_again(tmp_path):
    directory = tmp_path / "prepared"
    directory.mkdir()
    reused = directory / f".{os.getpid()}@{cache.HOST}.abc123.tmp"  # a dead writer's pid, now this process's
    fresh = directory / f".{os.getpid()}@{cache.HOST}.def456.tmp"
    reused.write_bytes(b"x")
    fresh.write_bytes(b"y")
    hours_ago = time.time() - cache.STALE_TEMP_SECONDS - 60
    os.utime(reused, (hours_ago, hours_ago))
    assert cache.load(directory, "k") is None
    assert (reused.exists(), fresh.exists()) == (False, True)


def test_a_damaged_data_record_is_one_line(monkeypatch, stopped, tiny_model_dir, data):
    (stopped / DATA_FILE).write_text('["not", "a", "record"]\n')
    result = run(monkeypatch, tiny_model_dir, data, stopped, "--resume")
    assert (result.exit_code, result.stderr) == (
        2,
        f"Error: --resume: {stopped / DATA_FILE} is damaged, so the data the run started on is not known; restore it, "
        "or pass --overwrite to start again\n",
    )


@pytest.mark.parametrize("files", [["optimizer.pt"], {"optimizer.pt": 12}, {"optimizer.pt": {"size": "12"}}])
def test_a_marker_listing_files_otherwise_is_damaged(tmp_path, files):
    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / MARKER).write_text(json.dumps({"step": 1, "files": files}))
    assert damage(tmp_path) == f"its {MARKER} file is damaged"


# ---- what a checkpoint's marker can tell ---------------------------------------------------


def test_a_file_above_the_threshold_is_fingerprinted_by_its_ends(monkeypatch, tmp_path):
    from sftcore.run import checkpoints

    monkeypatch.setattr(checkpoints, "WHOLE_HASH_BYTES", 4096)
    monkeypatch.setattr(checkpoints, "END_BYTES", 1024)
    (tmp_path / "trainer_state.json").write_text("{}")
    big = tmp_path / "optimizer.pt"
    big.write_bytes(os.urandom(10_000))
    write_marker(tmp_path, 1)
    listed = json.loads((tmp_path / MARKER).read_text())["files"]
    assert set(listed["optimizer.pt"]) == {"size", "sha256_ends"}
    assert set(listed["trainer_state.json"]) == {"size", "sha256"}

    def flipped(offset):
        content = bytearray(big.read_bytes())
        content[offset] ^= 0xFF
        big.write_bytes(bytes(content))

    flipped(5000)  # the middle of a large file: not read, as the module docstring says
    assert damage(tmp_path) is None
    flipped(9_999)
    assert damage(tmp_path) == "optimizer.pt differs from the file saved (sha256)"
    flipped(9_999)
    flipped(0)
    assert damage(tmp_path) == "optimizer.pt differs from the file saved (sha256)"
    flipped(0)
    assert damage(tmp_path) is None
    listed["optimizer.pt"] = {"size": 10_000, "sha256": cache.file_digest(big)}  # an earlier marker: whole files
    (tmp_path / MARKER).write_text(json.dumps({"step": 1, "files": listed}))
    assert damage(tmp_path) is None


def test_a_resume_reads_each_checkpoint_file_once(monkeypatch, caplog, stopped):
    from collections import Counter

    weights = stopped / "checkpoint-2" / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF
    weights.write_bytes(bytes(content))
    hashed = Counter()
    real = cache._sha256
    monkeypatch.setattr(cache, "_sha256", lambda path: hashed.update([str(path)]) or real(path))
    config = cfg.absolute_paths(cfg.load_yaml(str(stopped / "sft_config.yaml")))
    assert check_output(stopped, config, resume=True, overwrite=False) == stopped / "checkpoint-1"
    assert f"ignoring {stopped / 'checkpoint-2'}: model.safetensors differs from the file saved (sha256)" in caplog.messages
    assert hashed and max(hashed.values()) == 1, hashed
