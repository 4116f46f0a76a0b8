"""One run loop for every combination of components: prepare (`sftcore.data.prepare`), load, train, save, summarise."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from sftcore import config as cfg
from sftcore.run import distributed
from sftcore.errors import SftError, UsageError, one_line
from sftcore.host import Host
from sftcore.assets import BUILTIN_MODEL
from sftcore.data.prepare import build_stage, cap_max_length, eval_rows, model_path, prepare_data
from sftcore.data.pipeline import Prepared
from sftcore.run.stats import BatchCounter, LossCurve
from sftcore.run.summary import Summary, write_summary
from sftcore.model.weights import transformers_bars
from sftcore.model.vocab import check_token_ids

log = logging.getLogger("sftcore.run")


@contextmanager
def builtin_model_threads(config: Mapping[str, Any]) -> Iterator[None]:
    """One intra-op thread while training the built-in model, then the previous count again.

    Its matmuls (hidden size 64) are too small for threads to pay: on a 2-core machine with other
    work running, 100 demo steps took 5.2-5.3 s on one thread and 8.5-71 s on two.
    """
    if str(config["model"]) != BUILTIN_MODEL:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(
    host: Host, user_config: Mapping[str, Any], *, progress: bool = True, resume: bool = False, overwrite: bool = False
) -> Summary:
    """Train with the Hugging Face Trainer; save weights, tokenizer, state, config and summary.

    ``resume`` continues the run in the output directory from its newest complete checkpoint;
    ``overwrite`` replaces the run there (see `sftcore.run.outdir`).
    """
    from sftcore.run.outdir import take

    config = cfg.effective(user_config)
    cfg.check(config, host.registry)
    adapter = build_stage(host, config, "adapter")  # before anything loads or is written: it may need a package
    cap_max_length(config)  # before the output check: a resumed run's saved config holds the capped length
    if resume and not config.get("output"):
        raise UsageError("--resume needs --output: the directory of the run to continue")
    started = time.perf_counter()
    progress = progress and distributed.is_main_process()  # one set of bars, not one per process
    # TrainingArguments first: under a launcher it sets up the processes, with the user's ddp_* settings.
    named = config.get("output")
    args = training_arguments(config, named or default_output(config))
    # Made only now, so that settings TrainingArguments refuses leave no directory behind; by the
    # main process, whose name every process takes (each would stamp its own).
    output = Path(distributed.decided(lambda: named or default_output(config, create=True)))
    args.output_dir = config["output"] = str(output)
    log.info("output: %s", output)
    new = not named or not (output.exists() or output.is_symlink())  # a default name was made, empty, for this run
    # The main process holds the directory for the whole run (a second run there fails at once)
    # and decides alone what it holds: the others take its checkpoint, or its refusal.
    with ExitStack() as held:
        checkpoint = distributed.decided(
            lambda: take(held, output, config, new=new, resume=resume, overwrite=overwrite)
        )
        # The main process prepares and caches; the others wait for it, then read its cache.
        with args.main_process_first(desc="preparing data"):
            data = prepare_data(host, config, progress=progress)
            held_out = eval_rows(host, config, data, progress)
        with transformers_bars(progress), builtin_model_threads(config), output_errors(output, args.ddp_find_unused_parameters):
            return fit(host, config, data, args, started, progress, checkpoint, held_out, adapter)


# What to do about the errors a run's writes meet most (a full disk, a read-only mount).
WRITE_HINTS = {
    errno.ENOSPC: "; free some space, then run again (--resume continues from a complete checkpoint)",
    errno.EDQUOT: "; free some space, then run again (--resume continues from a complete checkpoint)",
    errno.EROFS: "; choose another --output",
    errno.EACCES: "; choose another --output",
}


# How torch.save and safetensors report a write that failed (a full disk): not as an OSError.
WRITE_FAILED = ("file write failed", "os error 28", "No space left on device")
# How DDP reports parameters that took no part in a step's loss, when not told to look for them.
UNUSED_PARAMETERS = "Expected to have finished reduction in the prior iteration before starting a new one"


@contextmanager
def output_errors(output: Path, find_unused: bool | None = False) -> Iterator[None]:
    """An OSError while the run reads or writes its files as one line naming the file; so too a
    failed write torch or safetensors reports otherwise, and DDP's unused parameters when DDP was
    not told to look for them (``find_unused``; told, the same message means something else)."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as exc:
        where = exc.filename or output
        raise SftError(f"{where}: {one_line(exc)}{WRITE_HINTS.get(exc.errno, '')}") from None
    except (RuntimeError, SafetensorError) as exc:
        if UNUSED_PARAMETERS in str(exc) and not find_unused:
            raise SftError(
                "DDP: some of the model's parameters took no part in the loss, and sftcore does not ask DDP to "
                "look for such parameters by default; pass --set ddp_find_unused_parameters=true"
            ) from None
        text = (str(exc).strip().splitlines() or [""])[-1]
        if not any(sign in text for sign in WRITE_FAILED):
            raise
        raise SftError(f"output {output}: a file could not be written ({text}){WRITE_HINTS[errno.ENOSPC]}") from None


def padding_free(host: Host, config: Mapping[str, Any]) -> bool:
    """Whether the configured collator says its batches carry no padding (``padding_free = True``)."""
    factory = host.registry.get("collator", config["collator"]["name"]).factory
    return bool(getattr(factory, "padding_free", False))


def fit(
    host: Host, config: dict[str, Any], data: Prepared, args: Any, started: float, progress: bool,
    checkpoint: Path | None = None, held_out: Any = None, adapter: Any = None,
) -> Summary:
    """Load the model, put the adapter on it, train on the prepared rows (from ``checkpoint`` on, if
    given), save (files: the main process only)."""
    from sftcore.model.adapters import MODEL_CARD, is_adapter_dir, parameter_counts, parameters_line
    from sftcore.run.checkpoints import logged_losses
    from sftcore.run.outdir import CONFIG_FILE, record_data
    from sftcore.run.interrupt import Diverged, MarkComplete, NoFinalCheckpoint, StopOnNonFinite, StopOnSignal, interrupted

    output = Path(args.output_dir)
    main = distributed.is_main_process()
    output.mkdir(parents=True, exist_ok=True)
    loader = build_stage(host, config, "loader", packing=padding_free(host, config))
    adapter = adapter or build_stage(host, config, "adapter")
    model, tokenizer = loader.load(model_path(config), **getattr(adapter, "load_options", dict)())
    check_token_ids(model, tokenizer, data.rows, held_out)  # an id without an embedding fails mid-step otherwise
    if not data.rows:
        raise SftError(
            f"{config['data']}: no row left to train on ({data.rows_read} read; skipped {dict(data.skipped)}; "
            f"dropped {dict(data.dropped)}); check max_length and the template's field names"
        )
    from transformers import set_seed

    set_seed(args.seed)  # an adapter's random start (LoRA's A) from the run's seed: the same run twice is the same run
    model = adapter.apply(model, tokenizer)
    parameters = parameter_counts(model)
    log.info("%s", parameters_line(*parameters))
    collator = BatchCounter(
        build_stage(
            host, config, "collator",
            pad_token_id=tokenizer.pad_token_id,
            attn_implementation=getattr(model.config, "_attn_implementation", None),
        )
    )
    # A resumed run's curves start where the first one's began.
    curve = LossCurve(logged_losses(checkpoint), logged_losses(checkpoint, "eval_loss"))
    trainer = build_trainer(host, config, model, tokenizer, data, collator, curve, args, progress, held_out)
    stop = StopOnSignal()
    trainer.add_callback(MarkComplete())
    trainer.add_callback(NoFinalCheckpoint())
    trainer.add_callback(stop.callback())
    trainer.add_callback(StopOnNonFinite())
    if main:
        cfg.dump(config, output / CONFIG_FILE)
        record_data(output, config)
    try:
        with stop.installed():
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Diverged:
        distributed.finish()  # every process met the same averaged loss at the same step
        raise
    if stop.signum is not None and trainer.state.global_step < trainer.state.max_steps:
        distributed.finish()  # every process stopped at this step (StopOnSignal.requested)
        raise interrupted(stop.signum, output, trainer.state)
    before = file_stamps(output) if main else {}
    # Every process: FSDP and DeepSpeed gather the weights for it; the main process writes.
    trainer.save_model(str(output))  # weights (safetensors) and tokenizer, no optimizer state
    trainer.save_state()
    model_files = sorted(name for name, stamp in file_stamps(output).items() if before.get(name) != stamp) if main else []
    if MODEL_CARD in model_files and is_adapter_dir(output):
        (output / MODEL_CARD).unlink()  # PEFT's card of blanks, naming a cache path as the base
        model_files.remove(MODEL_CARD)
    # Each process counted only the batches it collated.
    collator.real_tokens, collator.positions = distributed.summed(collator.real_tokens, collator.positions)
    files = [str(p) for p in curve.write(output)] if main else []
    seconds = time.perf_counter() - started
    train_seconds = result.metrics.get("train_runtime", seconds)
    summary = Summary.of(output, data, held_out, collator, curve, int(result.global_step), train_seconds, seconds, files, model_files)
    summary.trainable_parameters, summary.total_parameters = parameters
    if main:
        write_summary(output, summary)
    distributed.finish()
    return summary


def file_stamps(directory: Path) -> dict[str, tuple[int, int]]:
    """``name: (size, mtime_ns)`` of each file in ``directory``: which ones a save wrote."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file()}


def default_output(config: Mapping[str, Any], *, create: bool = False) -> str:
    """``sft-runs/demo-YYYYmmdd-HHMMSS`` (``run-`` for a model of the user's), ``-2``, ``-3``... when taken.

    ``create`` makes the directory, exclusively: two runs started in the same second get two.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"sft-runs/{'demo' if config['model'] == BUILTIN_MODEL else 'run'}-{stamp}"
    if not create:
        return base
    name, taken = base, 1
    try:
        os.makedirs(os.path.dirname(base), exist_ok=True)
        while True:
            try:
                os.mkdir(name)  # atomic: exactly one run gets each name
                return name
            except FileExistsError:
                taken += 1
                name = f"{base}-{taken}"
    except OSError as exc:
        raise SftError(f"{exc.filename or name}: cannot create the output directory ({exc.strerror}); pass --output DIR") from None


def training_arguments(config: Mapping[str, Any], output: str) -> Any:
    """``TrainingArguments``: sftcore's defaults, then the config's ``training`` section."""
    import torch
    from transformers import TrainingArguments

    defaults = {
        "output_dir": str(output),
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "logging_steps": 1,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        "report_to": "none",
        # The Trainer would log the mean of earlier losses for a NaN one, hiding a diverged run
        # (interrupt.StopOnNonFinite); a config may still set it, and the gradient norm still stops it.
        "logging_nan_inf_filter": False,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
        # Without CUDA, accelerate sets up CPU processes (gloo) only when told to use the CPU.
        "use_cpu": distributed.launched() and not torch.cuda.is_available(),
        # The Trainer asks DDP to search every step's graph for unused parameters unless
        # checkpointing; a causal LM uses all of its own (transformers' MoE experts are fused
        # tensors), so the search only costs a traversal and warns on every run. A model that
        # leaves some unused takes --set ddp_find_unused_parameters=true.
        "ddp_find_unused_parameters": False,
    }
    if cfg.evaluates(config):  # the held-out loss after every epoch, in batches like training's
        defaults["eval_strategy"] = "epoch"
        defaults["per_device_eval_batch_size"] = config["training"].get("per_device_train_batch_size", 8)
    try:
        return TrainingArguments(**{**defaults, **config["training"]})
    except (ValueError, TypeError) as exc:  # settings each valid alone that do not go together
        raise UsageError(f"training settings: {one_line(exc)}; change the config's training section or --set") from None


def build_trainer(host, config, model, tokenizer, data, collator, curve, args, progress=True, held_out=None):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from sftcore.host import plugin_callbacks
    from sftcore.run.trainer import trainer_class

    class RecordLoss(TrainerCallback):
        """Keeps every logged loss and shows one progress bar with the latest loss on it."""

        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step", disable=not progress)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                curve.points.append((state.global_step, float(logs["loss"])))
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)
            if logs and "eval_loss" in logs:
                curve.eval_points.append((state.global_step, float(logs["eval_loss"])))
                curve.eval_seconds += float(logs.get("eval_runtime", 0.0))

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    callbacks = [RecordLoss(), *plugin_callbacks(host, config)]  # each plugin's answer checked
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=data.rows,
        eval_dataset=held_out,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    for noisy in (ProgressCallback, PrinterCallback):  # they print a dict per logged step
        trainer.remove_callback(noisy)
    if args.world_size > 1 and distributed.is_main_process():
        line, warning = distributed.engine_report(trainer.accelerator.distributed_type, args, args.world_size)
        log.info("%s", line)
        if warning:
            log.warning("%s", warning)
    return trainer
