"""`sft run` in several processes: torchrun, `accelerate launch`, or `sft run --nproc N`.

The Hugging Face Trainer does the distributed training itself (DDP, FSDP, DeepSpeed, as the
launcher configures it). What is left here: knowing which process this is before the Trainer
exists, agreeing on values each process would compute differently (a timestamped output
directory), adding up per-process counters, and relaunching under torchrun.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from sftcore.errors import SftError, UsageError

log = logging.getLogger("sftcore.run")
# Set by torchrun, and so by `accelerate launch` and the DeepSpeed launcher, in every worker.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
# torchrun's choice for several workers on one machine: one OpenMP thread each, so that their
# thread pools together do not oversubscribe the cores.
WORKER_THREADS = 1


def launched() -> bool:
    """Whether this process is a worker of a distributed launcher."""
    return all(name in os.environ for name in RANK_VARIABLES)


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def _group() -> Any:
    """torch.distributed when a process group of more than one process is up, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def agreed(value: Any) -> Any:
    """The main process's ``value`` in every process (a no-op alone)."""
    dist = _group()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided(decide: Callable[[], Any]) -> Any:
    """``decide()``, called in the main process only, and its value in every process.

    The others never look for themselves (at an output directory the main process is changing,
    say). When ``decide`` raises, the main process raises it and the others raise its one line
    silently (`SftError.same_in_every_process`), so that none waits for a value that never comes.
    """
    if _group() is None:  # alone: this process is the main one
        return decide()
    if not is_main_process():
        value, failure = agreed(None)
        if failure is not None:
            raise _Failed(*failure)
        return value
    try:
        value = decide()
    except BaseException as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        code = exc.exit_code if isinstance(exc, SftError) else 1
        agreed((None, (message, code)))
        raise
    agreed((value, None))
    return value


class _Failed(SftError):
    """What the main process raised in `decided`: it prints the message, this process exits with its code."""

    same_in_every_process = True

    def __init__(self, message: str, exit_code: int) -> None:
        self.exit_code = exit_code
        super().__init__(message)


def summed(*counts: int) -> tuple[int, ...]:
    """Each count added up over all processes (each collates only its own batches)."""
    dist = _group()
    if dist is None:
        return counts
    import torch

    # NCCL reduces CUDA tensors only; gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return tuple(int(x) for x in total.tolist())


# Seconds the communication thread gets to drop the last collectives' tensors before teardown.
SETTLE_SECONDS = 1.0


def finish() -> None:
    """End the process group together: every process waits for the others, then tears it down.

    gloo's communication thread drops a finished collective's tensors after the caller has its
    result, and a tensor made in Python needs the GIL to be dropped. Torn down at once, the
    group joins that thread while holding the GIL (a deadlock, seen once); left to interpreter
    exit, the thread is killed mid-drop ("terminate called without an active exception", an
    abort, seen once). So: a barrier, a pause with the GIL released, then the teardown.
    """
    import time

    dist = _group()
    if dist is None:
        return
    dist.barrier()
    time.sleep(SETTLE_SECONDS)  # sleeping releases the GIL
    dist.destroy_process_group()


ENGINES = {"MULTI_CPU": "DDP over CPU processes (gloo)", "MULTI_GPU": "DDP", "FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}


def requested_engine(args: Any) -> str | None:
    """The sharding engine the launcher's config or the training arguments ask for, if any."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or getattr(args, "fsdp", None):
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or getattr(args, "deepspeed", None):
        return "DeepSpeed"
    return None


def engine_report(distributed_type: Any, args: Any, processes: int) -> tuple[str, str | None]:
    """A line naming the engine a Trainer's accelerator runs, and a warning where it is not the one asked for.

    ``distributed_type`` is accelerate's ``DistributedType`` (or its name). accelerate shards
    (FSDP, DeepSpeed) only on GPUs and other accelerators: asked for on CPU processes, it runs
    plain data parallelism instead, every process holding the whole model, and says nothing.
    """
    kind = str(getattr(distributed_type, "value", distributed_type))
    name = ENGINES.get(kind, kind)
    line = f"parallel: {processes} processes, {name}"
    asked = requested_engine(args)
    if asked is None or asked == name:
        return line, None
    return line, (
        f"{asked} was asked for, but this run is {name}: accelerate shards only on GPUs and other accelerators, "
        "so every process holds the whole model; run on GPUs to shard, or drop the "
        f"{asked} config to silence this"
    )


def without_nproc(argv: list[str]) -> list[str] | None:
    """``argv`` less its ``--nproc N`` (None when it has none).

    The workers must not see it: torchrun's own parser reads every ``--nproc...`` word, even
    after the script name, as an ambiguous abbreviation of its ``--nproc-per-node``.
    """
    out, found, skip = [], False, False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            found = skip = True
        elif arg.startswith("--nproc="):
            found = True
        else:
            out.append(arg)
    return out if found else None


def torchrun_arguments(argv: list[str], nproc: int) -> list[str]:
    """torchrun's command line for ``nproc`` workers on this machine, each running ``sft <argv>``.

    ``--standalone`` lets torchrun pick a free port, so two runs on one machine do not clash.
    """
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    return ["--standalone", f"--nproc_per_node={nproc}", "-m", "sftcore.cli", *argv]


def set_worker_threads(nproc: int) -> None:
    """OMP_NUM_THREADS for the workers, as torchrun would set it, unless the user set it.

    Found set, torchrun prints no banner of its own (a boxed warning on every run, whoever
    chose the value); sftcore's log says it in one line instead.
    """
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(WORKER_THREADS)  # the workers inherit the agent's environment
        log.info("OMP_NUM_THREADS=%d in each of the %d processes (torchrun's default); set it to choose another",
                 WORKER_THREADS, nproc)


def check_devices(nproc: int) -> None:
    """One process per GPU: NCCL refuses two processes on one device, and only after they started."""
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPU(s), one process each")


class WorkerFailed(SftError):
    """A worker of `sft run --nproc` exited with an error; its own message came before."""

    def __init__(self, rank: int, exit_code: int) -> None:
        self.exit_code = exit_code if 0 < exit_code < 256 else 1
        how = f"was killed by signal {-exit_code}" if exit_code < 0 else f"exited with code {exit_code}"
        super().__init__(f"worker {rank} {how}; its messages are above")


def relaunch(nproc: int) -> NoReturn:
    """Run this `sft` command line as ``nproc`` torchrun workers, from this process, and exit as they did.

    torchrun's agent runs here rather than replacing this process, so that its ends are reported
    as sftcore reports everything: a signal (Ctrl-C, SIGTERM), which the agent hands to the
    workers and on which they save a checkpoint that the main worker names, exits 128 + the
    signal number without the agent's traceback; a failed worker exits with that worker's code.
    """
    argv = without_nproc(sys.argv[1:])
    if argv is None:
        raise UsageError("--nproc relaunches the `sft` command line, and this process was not started from one; "
                         "start it under torchrun or accelerate launch instead")
    check_devices(nproc)
    arguments = torchrun_arguments(argv, nproc)
    set_worker_threads(nproc)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        run(parse_args(arguments))
    except SignalException as exc:
        raise SystemExit(128 + int(exc.sigval)) from None
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise WorkerFailed(rank, failure.exitcode) from None
    raise SystemExit(0)
