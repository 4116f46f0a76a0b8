"""Stopping a run cleanly: Ctrl-C (SIGINT) or SIGTERM saves a checkpoint, then the run exits.

The signal handler only sets a flag; `StopOnSignal.callback` turns it into "save, then stop"
at the end of the current optimizer step, so the checkpoint is a step boundary the Trainer
can resume from exactly. A second Ctrl-C stops at once, without a checkpoint.

A loss that stops being finite stops the run too (`StopOnNonFinite`), before anything more is
saved: every later step would train NaN weights.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sftcore.run.checkpoints import write_marker
from sftcore.errors import SftError

log = logging.getLogger("sftcore.run")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SftError):
    """The run stopped on a signal after saving a checkpoint; exits 128 + the signal number (130 for Ctrl-C)."""

    same_in_every_process = True  # every process stops at the same step (StopOnSignal.requested)

    def __init__(self, signum: int, message: str):
        self.exit_code = 128 + signum
        super().__init__(message)


def interrupted(signum: int, output: Path, state: Any) -> Interrupted:
    return Interrupted(
        signum,
        f"stopped by {signal.Signals(signum).name} at step {state.global_step} of {state.max_steps}; "
        f"checkpoint saved in {output / f'checkpoint-{state.global_step}'}. "
        f"To continue, run the same command with --resume",
    )


class StopOnSignal:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """Handle SIGINT and SIGTERM while inside; the previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield self
            return
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            raise KeyboardInterrupt
        self.signum = signum
        from sftcore.run import distributed

        if not distributed.is_main_process():  # each process gets the signal; one says so
            return
        log.warning(
            "%s: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once, without one)",
            signal.Signals(signum).name,
        )

    def requested(self) -> bool:
        """Whether any process got a signal: every process must take the same step to save together."""
        from sftcore.run import distributed

        return distributed.summed(int(self.signum is not None))[0] > 0

    def callback(self) -> TrainerCallback:
        stop = self

        class SaveAndStop(TrainerCallback):
            stopping = False  # set in every process at once: requested() is agreed over all

            def on_step_end(self, args, state, control, **kwargs):
                if stop.requested():
                    self.stopping = True
                    control.should_save = True
                    control.should_training_stop = True
                    control.should_evaluate = False  # a held-out pass would only delay the stop

            def on_epoch_end(self, args, state, control, **kwargs):
                if self.stopping:  # the Trainer ends the epoch it stops in, which may ask for evaluation
                    control.should_evaluate = False

        return SaveAndStop()


class NoFinalCheckpoint(TrainerCallback):
    """No checkpoint at the last step unless ``save_steps`` schedules one there.

    The Trainer saves one whenever training ends; the run's output is the final model already,
    and a checkpoint beside it holds another copy of the weights plus the optimizer state (for
    AdamW, twice the weights again in fp32) that nothing resumes: a finished run has nothing
    left to continue. Added after the Trainer's own flow callback, before `StopOnSignal`'s,
    which still saves at the last step when a signal asks for it.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and control.should_save:
            every = state.save_steps if args.save_strategy == "steps" else 0
            if not (every and state.global_step % every == 0):
                control.should_save = False


class MarkComplete(TrainerCallback):
    """Writes `MARKER` into each checkpoint once the Trainer has written everything else in it."""

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every process has written its part of the checkpoint (sharded optimizer state)
        if state.is_world_process_zero:
            write_marker(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)


class Diverged(SftError):
    """The loss became NaN or infinite; the run stopped without saving a final model."""

    same_in_every_process = True  # the logged loss is averaged over every process


class StopOnNonFinite(TrainerCallback):
    """Raises `Diverged` at the first logged loss (or gradient norm) that is not finite.

    Raised from ``on_log``, which the Trainer calls before it saves a checkpoint at that step,
    so no NaN weights are saved as resumable; a step that saves is always logged, for that
    (``on_step_end``: otherwise a save_steps that is no multiple of logging_steps would save
    and mark a step whose loss nobody looked at). sftcore turns the Trainer's
    ``logging_nan_inf_filter`` off by default: it logs the mean of earlier losses for a NaN one.
    The gradient norm is never filtered, so a run that sets the filter on still stops; except
    under fp16, whose GradScaler meets an infinite norm by design (an overflow) and skips that
    step, lowering its scale: there the loss decides alone.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss",) if fp16(args) else ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise Diverged(diverged_message(args, state.global_step, key, value))

    def on_step_end(self, args, state, control, **kwargs):
        # Added after every other callback, so it sees each one's should_save.
        if control.should_save:
            control.should_log = True

    on_epoch_end = on_step_end  # a save at the end of an epoch (save_strategy "epoch")


def fp16(args: Any) -> bool:
    """Whether the run trains in fp16 with a GradScaler: asked for (``fp16``), or set by the
    launcher (``accelerate launch --mixed_precision fp16``), which leaves ``fp16`` False."""
    return bool(args.fp16) or getattr(args, "mixed_precision", None) == "fp16"


def diverged_message(args: Any, step: int, key: str, value: float) -> str:
    what = "loss" if key == "loss" else "gradient norm"
    hints = [f"a lower learning rate (--lr, now {args.learning_rate:g})"]
    if fp16(args):
        hints.append("bf16 instead of fp16, whose range overflows (--set fp16=false --set bf16=true)")
    if not args.max_grad_norm:
        hints.append("gradient clipping (--set max_grad_norm=1.0)")
    else:
        hints.append(f"a smaller max_grad_norm (now {args.max_grad_norm:g}) or more warmup (--set warmup_ratio=0.1)")
    return f"the training {what} became {value} at step {step}; the run stopped and saved no final model. Try " + ", or ".join(hints)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
