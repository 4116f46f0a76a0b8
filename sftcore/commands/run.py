"""`sft run`: train a model."""

from __future__ import annotations

import logging

import click

from sftcore import config as cfg
from sftcore.run import distributed
from sftcore.commands.common import (
    cache_dir_option,
    config_from_cli,
    host_from,
    max_length_option,
    on_bad_row_option,
    on_duplicate_option,
    stage_options,
)


@click.command("run")
@click.option("--model", type=click.Path(), help="Checkpoint directory to fine-tune.")
@click.option("--data", type=click.Path(), help="Training data: .json array or .jsonl.")
@click.option("--eval-data", type=click.Path(), help="Held-out rows (same format): their loss after each epoch.")
@click.option("--eval-split", type=float, metavar="FRACTION", help="Hold out this fraction of --data instead (e.g. 0.05).")
@click.option("--output", type=click.Path(), help="Output directory (default: sft-runs/<name>-<time>).")
@click.option("--config", "config_file", type=click.Path(), help="YAML run config; flags override it.")
@stage_options
@max_length_option
@click.option("--epochs", type=float, help="Training epochs.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--batch-size", type=int, help="Rows per device per step.")
@click.option("--grad-accum", type=int, help="Gradient accumulation steps.")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@on_bad_row_option
@on_duplicate_option
@cache_dir_option
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Any TrainingArguments field (repeatable).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its newest complete checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --output (its checkpoints and records are removed).")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine (one per GPU): reruns this command under torchrun.")
@click.pass_context
def command(
    ctx: click.Context, config_file: str | None, sets: tuple[str, ...], no_progress: bool, nproc: int,
    resume: bool, overwrite: bool, **values,
) -> None:
    """Fine-tune a causal LM so the loss falls on response tokens only.

    With no arguments: train a tiny model on the bundled demo set (under a minute on a CPU).
    Under torchrun or accelerate launch it trains in every process; the main one reports.
    """
    config = config_from_cli(config_file, values, sets)
    host = host_from(ctx)
    if nproc > 1 and not distributed.launched():
        from sftcore.data.prepare import build_stage

        effective = cfg.effective(config)
        cfg.check(effective, host.registry)  # report config problems once, not per worker
        build_stage(host, effective, "adapter")  # and a package the adapter lacks, before torchrun starts
        distributed.relaunch(nproc)
    if not distributed.is_main_process():
        logging.getLogger("sftcore").setLevel(logging.WARNING)
    from sftcore.run.train import run

    summary = run(host, config, progress=not no_progress, resume=resume, overwrite=overwrite)
    if distributed.is_main_process():
        for line in summary.lines():
            click.echo(line)
