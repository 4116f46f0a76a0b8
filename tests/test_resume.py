"""Interrupted runs: Ctrl-C saves a checkpoint and exits 130; a run killed outright, even while it
writes a checkpoint, resumes from its newest complete checkpoint and ends exactly where an
uninterrupted run with the same seed ends."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import loss_points, sft, write_jsonl

from sftcore import hookimpl
from sftcore.run.checkpoints import MARKER, newest_complete

HERE = Path(__file__).resolve().parent
# 22 rows, 4 a batch: 6 steps an epoch (the last one short), 12 steps in all; checkpoints every 4
# steps fall mid-epoch, so resuming has to skip the batches the first run already trained on.
ROWS = [{"instruction": f"Count to {i}.", "output": " ".join(str(k) for k in range(i % 7 + 1))} for i in range(22)]
STEPS, SAVE_STEPS = 12, 4
TOLERANCE = 1e-5


def run_args(model, data) -> list[str]:
    return [
        "run", "--model", str(model), "--data", str(data), "--batch-size", "4", "--epochs", "2", "--lr", "1e-3",
        "--seed", "7", "--max-length", "96", "--set", f"save_steps={SAVE_STEPS}", "--no-progress",
    ]


def assert_same_run(resumed: Path, reference: Path, resumed_from: int) -> None:
    """Same steps, the same loss at every step (after the resume point too), the same final weights."""
    from safetensors.torch import load_file

    got, want = loss_points(resumed), loss_points(reference)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    after = [(g, w) for (s, g), (_, w) in zip(got, want) if s > resumed_from]
    assert len(after) == STEPS - resumed_from
    for g, w in after:
        assert abs(g - w) <= TOLERANCE * max(1.0, abs(w)), (got, want)
    assert json.loads((resumed / "summary.json").read_text())["steps"] == STEPS
    final, expected = load_file(resumed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert final.keys() == expected.keys()
    for name in expected:
        assert (final[name] - expected[name]).abs().max().item() <= TOLERANCE, name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ROWS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data):
    """The uninterrupted run every interrupted one must end up equal to."""
    output = tmp_path_factory.mktemp("reference") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        result = sft(monkeypatch, *run_args(tiny_model_dir, data), "--output", output)
    assert result.exit_code == 0, result.output
    return output


def sft_process(args: list[str], tmp_path: Path, **env: str) -> subprocess.Popen:
    variables = {**os.environ, "SFT_CACHE_DIR": str(tmp_path / "cache"), **env}
    for var in ("SFT_DISABLE_PLUGINS", "SFT_STRICT_PLUGINS"):
        variables.pop(var, None)
    return subprocess.Popen(
        [sys.executable, str(HERE / "sft_process.py"), *args], env=variables,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def sigkill_once_written(process: subprocess.Popen, path: Path) -> str:
    """SIGKILL ``process`` as soon as ``path`` exists (or it ended); its stderr."""
    deadline = time.monotonic() + 300
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr[-3000:]
    return stderr


def resume(monkeypatch, model, data, output):
    result = sft(monkeypatch, *run_args(model, data), "--output", output, "--resume")
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(monkeypatch, caplog, tmp_path, tiny_model_dir, data, reference):
    output = tmp_path / "out"
    process = sft_process([*run_args(tiny_model_dir, data), "--output", str(output)], tmp_path, SFT_TEST_STEP_SECONDS="0.15")
    first = output / f"checkpoint-{SAVE_STEPS}" / MARKER
    sigkill_once_written(process, first)
    assert first.exists() and not (output / "model.safetensors").exists(), "killed before the end"

    checkpoint, _ = newest_complete(output)
    resumed_from = int(checkpoint.name.split("-")[1])
    assert resumed_from < STEPS
    with caplog.at_level(logging.INFO, logger="sftcore"):
        resume(monkeypatch, tiny_model_dir, data, output)
    assert f"resuming from {checkpoint}" in caplog.messages
    assert_same_run(output, reference, resumed_from)


@pytest.mark.slow
def test_a_checkpoint_killed_while_written_is_never_resumed(monkeypatch, caplog, tmp_path, tiny_model_dir, data, reference):
    output = tmp_path / "out"
    dying = 2 * SAVE_STEPS
    process = sft_process([*run_args(tiny_model_dir, data), "--output", str(output)], tmp_path, SFT_TEST_DIE_SAVING=str(dying))
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == -signal.SIGKILL, stderr[-3000:]
    partial = output / f"checkpoint-{dying}"
    assert (partial / "model.safetensors").exists() and (partial / "optimizer.pt").exists()
    assert not (partial / MARKER).exists()
    with pytest.raises(json.JSONDecodeError):
        json.loads((partial / "trainer_state.json").read_text())  # what resuming from it would have read

    with caplog.at_level(logging.INFO, logger="sftcore"):
        resume(monkeypatch, tiny_model_dir, data, output)
    assert f"ignoring {partial}: it was not completely written (the run stopped while saving it)" in caplog.messages
    assert f"resuming from {output / f'checkpoint-{SAVE_STEPS}'}" in caplog.messages
    assert_same_run(output, reference, SAVE_STEPS)


def _own_handler(signum, frame):  # never called: only its identity matters
    raise AssertionError(f"signal {signum} reached the test's own handler")


@pytest.fixture
def own_signal_handlers():
    """SIGINT and SIGTERM handled by a function of this test's own during it.

    What a run must restore is whatever handler was there before it, which is not always
    Python's default: a job started in the background (``cmd &``, nohup) starts with SIGINT
    ignored. A handler of the test's own makes the check the same in every such shell.
    """
    previous = {s: signal.signal(s, _own_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield _own_handler
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_the_handlers_from_before_come_back_whatever_they_were(own_signal_handlers):
    from sftcore.run.interrupt import StopOnSignal

    for before in (own_signal_handlers, signal.SIG_IGN):
        signal.signal(signal.SIGINT, before)
        with StopOnSignal().installed() as stop:
            assert signal.getsignal(signal.SIGINT) == stop._handle
        assert signal.getsignal(signal.SIGINT) is before
        assert signal.getsignal(signal.SIGTERM) is own_signal_handlers


class CtrlC:
    """Sends this process SIGINT at the end of step ``at``, ``times`` times: as if the user pressed Ctrl-C."""

    def __init__(self, at: int, times: int = 1, signum: int = signal.SIGINT) -> None:
        self.at, self.times, self.signum = at, times, signum

    @hookimpl
    def trainer_callbacks(self, config):
        from transformers import TrainerCallback

        plugin = self

        class Press(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == plugin.at:
                    for _ in range(plugin.times):
                        os.kill(os.getpid(), plugin.signum)

        return [Press()]


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes_exactly(
    monkeypatch, caplog, tmp_path, tiny_model_dir, data, reference, own_signal_handlers
):
    output = tmp_path / "out"
    stopped_at = 5  # between two scheduled checkpoints
    with caplog.at_level(logging.INFO, logger="sftcore"):
        result = sft(monkeypatch, *run_args(tiny_model_dir, data), "--output", output, extra={"ctrl_c": CtrlC(stopped_at)})
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == (
        f"Error: stopped by SIGINT at step {stopped_at} of {STEPS}; checkpoint saved in {output / f'checkpoint-{stopped_at}'}. "
        "To continue, run the same command with --resume"
    )
    assert "SIGINT: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once, without one)" in caplog.messages
    checkpoint = output / f"checkpoint-{stopped_at}"
    for name in (MARKER, "trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert (checkpoint / name).is_file(), name
    assert not (output / "model.safetensors").exists() and not (output / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is own_signal_handlers, "the previous handler is back"
    assert signal.getsignal(signal.SIGTERM) is own_signal_handlers

    resume(monkeypatch, tiny_model_dir, data, output)
    assert_same_run(output, reference, stopped_at)


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(monkeypatch, tmp_path, tiny_model_dir, data):
    output = tmp_path / "out"
    result = sft(
        monkeypatch, *run_args(tiny_model_dir, data), "--output", output, "--max-steps", "3",
        extra={"ctrl_c": CtrlC(at=2, times=2)},
    )
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == "Interrupted."
    assert not list(output.glob("checkpoint-*"))


def test_sigterm_also_saves_and_exits_143(monkeypatch, tmp_path, tiny_model_dir, data):
    """What a cluster scheduler sends before it kills a job."""
    output = tmp_path / "out"
    result = sft(
        monkeypatch, *run_args(tiny_model_dir, data), "--output", output, "--max-steps", "3",
        extra={"ctrl_c": CtrlC(at=2, signum=signal.SIGTERM)},
    )
    assert result.exit_code == 143
    assert result.stderr.splitlines()[-1].startswith("Error: stopped by SIGTERM at step 2 of 3; checkpoint saved in")
    assert newest_complete(output) == (output / "checkpoint-2", [])


def fake_checkpoint(output: Path, step: int, complete: bool) -> Path:
    path = output / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        (path / MARKER).write_text(f"{step}\n")
    return path


def test_newest_complete_checkpoint_skips_unfinished_ones(tmp_path):
    assert newest_complete(tmp_path / "missing") == (None, [])
    fake_checkpoint(tmp_path, 9, complete=True)
    ten = fake_checkpoint(tmp_path, 10, complete=True)
    twenty = fake_checkpoint(tmp_path, 20, complete=False)
    hundred = fake_checkpoint(tmp_path, 100, complete=False)  # numeric order, not text order
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-30").write_text("a file")
    assert newest_complete(tmp_path) == (ten, [hundred, twenty])
    (ten / "trainer_state.json").unlink()  # a marker without the state it vouches for does not count
    assert newest_complete(tmp_path)[0] == tmp_path / "checkpoint-9"


def test_resuming_a_tied_model_does_not_report_its_tied_weight_missing():
    """A checkpoint stores a tied weight once; only a weight loaded under no name is missing."""
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer

    from sftcore.assets import TINY_LLAMA
    from sftcore.run.trainer import trainer_class, untied_missing

    config = AutoConfig.from_pretrained(TINY_LLAMA)
    assert config.tie_word_embeddings
    tied = AutoModelForCausalLM.from_config(config)
    assert untied_missing(tied, ["lm_head.weight"]) == []
    assert untied_missing(tied, ["lm_head.weight", "model.embed_tokens.weight"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert untied_missing(tied, ["model.norm.weight"]) == ["model.norm.weight"]
    config.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(config)
    assert untied_missing(untied, ["lm_head.weight"]) == ["lm_head.weight"]
    # The hook the filter overrides must still exist, or the filter is dead code.
    assert "_issue_warnings_after_load" in vars(Trainer)
    assert "_issue_warnings_after_load" in vars(trainer_class())


@pytest.mark.parametrize(("tied", "warned"), [(True, False), (False, True)])
def test_the_missing_weight_warning_on_a_real_load(tmp_path, tied, warned):
    """A state dict without lm_head.weight (how a tied checkpoint stores it), loaded as the Trainer
    loads a checkpoint: no warning for a tied model, the Trainer's own for an untied one."""
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments
    from transformers.utils import logging as hf_logging

    from sftcore.assets import TINY_LLAMA
    from sftcore.run.trainer import trainer_class

    config = AutoConfig.from_pretrained(TINY_LLAMA)
    config.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(config)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = trainer_class()(model=model, args=args)
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = hf_logging.get_logger("transformers.trainer")
    handler = Keep()
    logger.addHandler(handler)
    try:
        trainer._issue_warnings_after_load(model.load_state_dict(state, strict=False))
    finally:
        logger.removeHandler(handler)
    assert any("missing keys" in message and "lm_head.weight" in message for message in seen) == warned, seen
