"""`sft run` in several processes: the torchrun relaunch of `--nproc`, and a 2-process CPU (gloo) run
whose losses and weights match a 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from cli_runs import loss_points

from sftcore.run import distributed
from sftcore.assets import DEMO_DATA
from sftcore.errors import UsageError

SFT = str(Path(sys.executable).with_name("sft"))
THREADS_LINE = "OMP_NUM_THREADS=1 in each of the 2 processes (torchrun's default); set it to choose another"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--nproc", "2", "--seed", "1"], ["run", "--seed", "1"]),
        (["-v", "run", "--nproc=4"], ["-v", "run"]),
        (["run", "--seed", "1"], None),
    ],
)
def test_without_nproc(argv, expected):
    assert distributed.without_nproc(argv) == expected


def run_options() -> list[click.Option]:
    from sftcore.commands.run import command

    return [p for p in command.params if isinstance(p, click.Option) and p.name != "nproc"]


def test_torchrun_hands_every_sft_run_option_to_the_workers_untouched():
    """torchrun's parser reads option-like words even after the script; none of ours may look like its own."""
    from torch.distributed.run import get_args_parser

    argv = ["--disable-plugin", "x", "-v", "run"]
    for option in run_options():
        argv += [option.opts[0]] if option.is_flag else [option.opts[0], "1"]
    parsed = get_args_parser().parse_args(distributed.torchrun_arguments(argv, 2))
    assert (parsed.module, parsed.training_script, parsed.nproc_per_node) == (True, "sftcore.cli", "2")
    assert parsed.training_script_args == argv


def test_relaunch_needs_an_sft_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest", "-q"])
    with pytest.raises(UsageError, match="torchrun or accelerate launch"):
        distributed.relaunch(2)


def test_no_more_processes_than_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    distributed.check_devices(1)
    with pytest.raises(UsageError, match="1 GPU"):
        distributed.check_devices(2)


def test_rank_and_launch_come_from_the_launcher_environment(monkeypatch):
    for name in distributed.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.is_main_process() and not distributed.launched()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched() and not distributed.is_main_process()


def test_alone_nothing_is_exchanged():
    assert distributed.agreed("runs/x") == "runs/x"
    assert distributed.summed(3, 5) == (3, 5)


class Args:
    fsdp: list = []
    deepspeed = None


@pytest.mark.parametrize(
    ("kind", "environment", "options", "line", "warned"),
    [
        ("MULTI_CPU", {}, {}, "parallel: 2 processes, DDP over CPU processes (gloo)", None),
        ("MULTI_GPU", {}, {}, "parallel: 2 processes, DDP", None),
        ("FSDP", {"ACCELERATE_USE_FSDP": "true"}, {}, "parallel: 2 processes, FSDP", None),
        ("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true"}, {}, "parallel: 2 processes, DeepSpeed", None),
        # accelerate turns these into plain data parallelism on CPU processes without a word.
        ("MULTI_CPU", {"ACCELERATE_USE_FSDP": "true"}, {}, "parallel: 2 processes, DDP over CPU processes (gloo)", "FSDP"),
        ("MULTI_CPU", {}, {"fsdp": ["full_shard"]}, "parallel: 2 processes, DDP over CPU processes (gloo)", "FSDP"),
        ("MULTI_GPU", {}, {"deepspeed": "ds.json"}, "parallel: 2 processes, DDP", "DeepSpeed"),
    ],
)
def test_the_engine_in_use_is_named_and_a_silent_fallback_is_not(monkeypatch, kind, environment, options, line, warned):
    from accelerate.utils import DistributedType

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    args = Args()
    for name, value in options.items():
        setattr(args, name, value)
    said, warning = distributed.engine_report(DistributedType[kind], args, 2)
    assert said == line
    if warned is None:
        assert warning is None
    else:
        assert warning.startswith(f"{warned} was asked for, but this run is ") and "whole model" in warning


def test_the_cli_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "sftcore.cli", "run", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--nproc" in done.stdout


def counted_tokens(directory: Path) -> float:
    """Real tokens the run's batches held, from its summary's tokens/s and the Trainer's runtime."""
    summary = json.loads((directory / "summary.json").read_text())
    state = json.loads((directory / "trainer_state.json").read_text())
    runtime = next(h["train_runtime"] for h in state["log_history"] if "train_runtime" in h)
    return summary["tokens_per_second"] * runtime


@pytest.mark.slow
def test_two_gloo_processes_train_as_one_with_the_same_global_batch(tmp_path):
    from safetensors.torch import load_file

    from sftcore.assets import tiny_model

    data = tmp_path / "data.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:16]))
    # Without OMP_NUM_THREADS, as most users start: torchrun would set it and say so at length.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["SFT_CACHE_DIR"] = str(tmp_path / "cache-one")
    common = [
        "--model", str(tiny_model(tmp_path / "model")), "--data", str(data), "--max-steps", "4", "--lr", "1e-3",
        "--seed", "0", "--no-progress", "--set", "lr_scheduler_type=constant", "--set", "warmup_steps=0",
    ]
    # Global batch 8 both ways: 4 rows x 2 accumulation steps, and 2 rows x 2 steps x 2 processes.
    one = subprocess.run(
        [SFT, "run", *common, "--output", str(tmp_path / "one"), "--batch-size", "4", "--grad-accum", "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert one.returncode == 0, one.stderr
    # A cache of its own, so it prepares the data; transformers' debug log shows who waited for whom.
    env.update(SFT_CACHE_DIR=str(tmp_path / "cache-two"), TRANSFORMERS_VERBOSITY="debug")
    two = subprocess.run(
        [sys.executable, "-m", "sftcore.cli", "run", *common, "--output", str(tmp_path / "two"),
         "--batch-size", "2", "--grad-accum", "2", "--nproc", "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr

    single, double = loss_points(tmp_path / "one"), loss_points(tmp_path / "two")
    assert [s for s, _ in double] == [s for s, _ in single] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(single, double):
        assert b == pytest.approx(a, rel=1e-4)
    weights = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name, tensor in weights[0].items():
        assert (weights[1][name] - tensor).abs().max() < 1e-5, name
    # Only the main process reports; it prepared and cached the data while the other waited (and
    # then read that cache); its counters cover both processes.
    assert two.stdout.count("saved to") == 1
    assert two.stderr.count("parallel: 2 processes, DDP over CPU processes (gloo)") == 1
    assert "parallel:" not in one.stderr
    assert two.stderr.count("tokenized and cached") == 1
    # No third-party noise: neither torchrun's thread banner nor DDP's unused-parameter search warning.
    assert two.stderr.count(THREADS_LINE) == 1
    assert "Setting OMP_NUM_THREADS" not in two.stderr
    assert "find_unused_parameters=True" not in two.stderr
    log = two.stderr
    # Process 1 may print its "waiting" line before or after the main process starts tokenizing
    # (it can simply start later), so only each process's own order is certain.
    assert "1: waiting for the main local process to perform preparing data" in log
    assert log.index("tokenized and cached") < log.index(
        "0: main local process completed preparing data, releasing all replicas")
    rows_seen_twice = 2 * json.loads((tmp_path / "one" / "summary.json").read_text())["tokens"]
    assert counted_tokens(tmp_path / "one") == pytest.approx(rows_seen_twice, rel=1e-3)
    assert counted_tokens(tmp_path / "two") == pytest.approx(rows_seen_twice, rel=1e-3)


@pytest.mark.slow
def test_ctrl_c_on_two_processes_saves_one_checkpoint_and_exits_130(tmp_path):
    """A terminal's Ctrl-C reaches torchrun's agent, which hands it to each worker: every worker
    stops at the same step, the checkpoint is complete, one message names it, and the exit code
    is the signal's, with no launcher traceback."""
    import signal
    import time

    from sftcore.assets import tiny_model
    from sftcore.run.checkpoints import MARKER, newest_complete

    output = tmp_path / "out"
    env = {**os.environ, "SFT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [SFT, "run", "--model", str(tiny_model(tmp_path / "model")), "--data", str(DEMO_DATA), "--output", str(output),
         "--max-steps", "100000",
         "--batch-size", "2", "--no-progress", "--nproc", "2", "--set", "save_steps=100000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    seen = []
    for line in process.stdout:  # wait until both processes train
        seen.append(line)
        if "parallel: 2 processes" in line:
            break
    else:
        pytest.fail("".join(seen))
    time.sleep(3)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
    rest, _ = process.communicate(timeout=300)
    log = "".join(seen) + rest
    assert process.returncode == 130, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    checkpoint, unfinished = newest_complete(output)
    assert checkpoint is not None and not unfinished and (checkpoint / MARKER).is_file(), log[-3000:]
    step = int(checkpoint.name.split("-")[1])
    assert 0 < step < 100000
    stops = [line for line in log.splitlines() if line.startswith("Error: ")]
    assert stops == [
        f"Error: stopped by SIGINT at step {step} of 100000; checkpoint saved in {checkpoint}. "
        "To continue, run the same command with --resume"
    ]
    assert log.count("SIGINT: saving a checkpoint after this step") == 1


@pytest.mark.parametrize(
    ("rank", "code", "message", "exit_code"),
    [
        (1, 2, "worker 1 exited with code 2; its messages are above", 2),
        (0, -9, "worker 0 was killed by signal 9; its messages are above", 1),
    ],
)
def test_a_failed_worker_is_reported_with_its_exit_code(rank, code, message, exit_code):
    failed = distributed.WorkerFailed(rank, code)
    assert (str(failed), failed.exit_code) == (message, exit_code)


@pytest.mark.parametrize(
    ("ending", "exit_code", "message"),
    [
        ("done", 0, None),
        ("sigint", 130, None),  # the main worker already said where its checkpoint is
        ("sigterm", 143, None),
        ("worker-2", 2, "worker 1 exited with code 2; its messages are above"),
        ("worker-killed", 1, "worker 1 was killed by signal 9; its messages are above"),
    ],
)
def test_how_a_relaunched_run_ends_is_how_sft_exits(monkeypatch, ending, exit_code, message):
    """`--nproc`: torchrun's agent ends in a return, a signal or a failed worker; sft exits accordingly."""
    import signal

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    started = []

    def agent(args):
        started.append((args.nproc_per_node, args.module, args.training_script, args.training_script_args))
        if ending.startswith("sig"):
            raise SignalException("got a signal", sigval=signal.SIGINT if ending == "sigint" else signal.SIGTERM)
        if ending.startswith("worker"):
            code = 2 if ending == "worker-2" else -9
            raise ChildFailedError("sftcore.cli", {1: ProcessFailure(local_rank=1, pid=1, exitcode=code, error_file="")})

    monkeypatch.setattr(torchrun, "run", agent)
    monkeypatch.setattr(sys, "argv", ["sft", "run", "--nproc", "2", "--seed", "1"])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # relaunch sets it for the workers
    with pytest.raises((SystemExit, distributed.WorkerFailed)) as info:
        distributed.relaunch(2)
    assert started == [("2", True, "sftcore.cli", ["run", "--seed", "1"])]
    if message is None:
        assert isinstance(info.value, SystemExit) and info.value.code == exit_code
    else:
        assert isinstance(info.value, distributed.WorkerFailed)
        assert (str(info.value), info.value.exit_code) == (message, exit_code)


@pytest.mark.parametrize(("given", "seen", "said"), [(None, "1", True), ("3", "3", False)])
def test_workers_get_torchruns_thread_count_without_its_banner(monkeypatch, caplog, given, seen, said):
    """torchrun prints a boxed warning whenever it sets OMP_NUM_THREADS itself, that is whenever
    the variable is unset as its agent starts; sftcore sets it first, to the value torchrun would
    choose, and says so in one line. A value the user set is theirs."""
    import logging

    import torch.distributed.run as torchrun

    at_start = []
    monkeypatch.setattr(torchrun, "run", lambda args: at_start.append(os.environ.get("OMP_NUM_THREADS")))
    monkeypatch.setattr(sys, "argv", ["sft", "run", "--nproc", "2"])
    if given is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    with caplog.at_level(logging.INFO, logger="sftcore"), pytest.raises(SystemExit):
        distributed.relaunch(2)
    assert at_start == [seen]
    assert caplog.messages == ([THREADS_LINE] if said else [])


def test_ddp_does_not_search_for_unused_parameters_unless_asked(tmp_path):
    """The Trainer's default (search, unless checkpointing) makes DDP warn on every run that it
    found none; a config may still ask for the search."""
    from sftcore import config as cfg
    from sftcore.run.train import training_arguments

    config = cfg.effective({"model": "m", "data": "d"})
    assert training_arguments(config, str(tmp_path)).ddp_find_unused_parameters is False
    config["training"]["ddp_find_unused_parameters"] = True
    assert training_arguments(config, str(tmp_path)).ddp_find_unused_parameters is True


@pytest.mark.slow
def test_two_processes_resumed_mid_epoch_with_a_batch_sampler_end_as_if_never_stopped(tmp_path):
    """The packed collator draws its own batches each epoch; a 2-process run resumed from a
    checkpoint in the middle of its second epoch must train that epoch's remaining batches, the
    ones an uninterrupted run trains, and end with the same losses and weights."""
    import shutil

    from safetensors.torch import load_file

    from sftcore.assets import tiny_model

    data = tmp_path / "data.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:24]))
    env = {**os.environ, "SFT_CACHE_DIR": str(tmp_path / "cache")}
    common = [
        sys.executable, "-m", "sftcore.cli", "run", "--model", str(tiny_model(tmp_path / "model")), "--data", str(data),
        "--collator", "packed", "--batch-size", "2", "--epochs", "3", "--lr", "1e-3", "--seed", "0", "--no-progress",
        "--nproc", "2", "--set", "save_steps=1", "--set", "save_total_limit=null", "--set", "lr_scheduler_type=constant",
        "--set", "warmup_steps=0",
    ]
    whole = tmp_path / "whole"
    done = subprocess.run([*common, "--output", str(whole)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((whole / "trainer_state.json").read_text())["log_history"]
    steps = [h["step"] for h in history if "loss" in h]
    per_epoch = next(h["step"] for h in history if "loss" in h and h["epoch"] >= 1.0)
    middle = per_epoch + per_epoch // 2  # inside the second epoch
    assert per_epoch < middle < 2 * per_epoch and steps[-1] == 3 * per_epoch, (per_epoch, steps)

    # The same directory as a run stopped right after checkpoint `middle` leaves it.
    stopped = tmp_path / "stopped"
    shutil.copytree(whole, stopped)
    for path in stopped.iterdir():
        if path.name.startswith("checkpoint-") and int(path.name.split("-")[1]) > middle:
            shutil.rmtree(path)
        elif not path.name.startswith("checkpoint-") and path.name != "sft_config.yaml":
            path.unlink()
    done = subprocess.run([*common, "--output", str(stopped), "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {stopped / f'checkpoint-{middle}'}" in done.stderr

    resumed, uninterrupted = loss_points(stopped), loss_points(whole)
    assert [s for s, _ in resumed] == [s for s, _ in uninterrupted]
    for (step, a), (_, b) in zip(resumed, uninterrupted):
        assert a == pytest.approx(b, rel=1e-5), (step, a, b)
    final, expected = load_file(stopped / "model.safetensors"), load_file(whole / "model.safetensors")
    for name, tensor in expected.items():
        assert (final[name] - tensor).abs().max() < 1e-5, name
