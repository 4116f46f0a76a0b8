"""Helpers shared by subcommands."""

from __future__ import annotations

from collections.abc import Mapping

import click

from sftcore.host import Host, load_host
from sftcore.data.pipeline import ROW_POLICIES
from sftcore.registry import STAGES


def host_from(ctx: click.Context) -> Host:
    """Load the plugins once per invocation; print one line per plugin problem."""
    obj = ctx.ensure_object(dict)
    if "host" not in obj:
        host = load_host(disable=obj.get("disabled", ()))
        for problem in host.problems:
            click.echo(f"Warning: {problem}", err=True)
        obj["host"] = host
    return obj["host"]


# Shared by run, preview and prepare: duplicates change which rows are trained on.
on_duplicate_option = click.option(
    "--on-duplicate",
    type=click.Choice(ROW_POLICIES["on_duplicate"]),
    help="A row with the same prompt and response as an earlier one: keep it (default), skip it, or stop.",
)


def stage_options(function):
    """`--template NAME --template-opt k=v` (and so on) for every stage."""
    for stage in reversed(list(STAGES)):
        function = click.option(
            f"--{stage}-opt", f"{stage}_opts", multiple=True, metavar="KEY=VALUE", help=f"Option for the {stage} (repeatable)."
        )(function)
        function = click.option(f"--{stage}", f"{stage}_name", metavar="NAME", help=f"{stage.capitalize()} component by name.")(function)
    return function


max_length_option = click.option(
    "--max-length", type=int, help="Maximum tokens per example (default: the model's, capped at 2048)."
)
on_bad_row_option = click.option(
    "--on-bad-row", type=click.Choice(ROW_POLICIES["on_bad_row"]), help="Stop at a bad data row, or skip and count it."
)
cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Prepared-data cache (default: $SFT_CACHE_DIR/prepared or ~/.cache/sftcore/prepared).",
)


def data_options(config_help: str):
    """What decides the masked rows without training them: `sft preview` and `sft prepare`."""

    def decorate(function):
        for option in reversed(
            [
                click.option("--data", type=click.Path(), help="Data file (default: the config's; none at all: the demo set)."),
                click.option("--model", type=click.Path(), help="Checkpoint directory (only its tokenizer and config are read)."),
                click.option("--tokenizer", "tokenizer_path", type=click.Path(), help="Tokenizer directory, instead of --model."),
                click.option("--config", "config_file", type=click.Path(), help=config_help),
                stage_options,
                max_length_option,
                on_bad_row_option,
                on_duplicate_option,
            ]
        ):
            function = option(function)
        return function

    return decorate


def config_from_cli(config_file: str | None, values: dict, sets: tuple[str, ...]) -> dict:
    """The YAML config (if any, see `sftcore.config.read`) with command-line flags laid over it."""
    from sftcore import config as cfg

    config = cfg.read(config_file) if config_file else {}
    for key in cfg.SCALAR_KEYS:
        if values.get(key) is not None:
            config[key] = values[key]
    for stage in STAGES:
        options = cfg.parse_assignments(values.get(f"{stage}_opts") or (), f"--{stage}-opt")
        cfg.set_component(config, stage, values.get(f"{stage}_name"), options)
    overrides = {field: values[flag] for flag, field in cfg.FLAG_TO_TRAINING.items() if values.get(flag) is not None}
    overrides.update(cfg.training_assignments(sets))
    training = config.get("training")
    if overrides and (training is None or isinstance(training, Mapping)):  # else left for `problems` to report
        config["training"] = {**(training or {}), **overrides}
        for flag, field in cfg.FLAG_TO_TRAINING.items():
            if field in overrides:  # a flag overrides the file's value under either name
                config.pop(flag, None)
    return config


def data_config(ctx: click.Context, config_file: str | None, tokenizer_path: str | None, values: dict) -> tuple[Host, dict]:
    """The host and the effective config of a command that prepares data but does not train.

    ``--tokenizer`` stands in for ``--model``; training settings are dropped; every problem in
    what is left stops the command before anything loads.
    """
    from sftcore import config as cfg
    from sftcore.errors import UsageError

    if tokenizer_path:
        values["model"] = tokenizer_path
    config = cfg.effective(config_from_cli(config_file, values, ()))
    for key in ("training", *cfg.FLAG_TO_TRAINING):  # a flag's name beside its field is the run's to report
        config.pop(key, None)
    host = host_from(ctx)
    # The model's tokenizer and config are all it reads; a --tokenizer directory has the tokenizer only.
    found = cfg.problems(config, host.registry, weights=False, tokenizer_only=bool(tokenizer_path))
    if found:
        raise UsageError("; ".join(found))
    return host, config


def finished_run(path: str, flag: str) -> dict:
    """The effective config of the finished `sft run` in ``path`` (given as ``flag``); refused otherwise."""
    from pathlib import Path

    from sftcore import config as cfg
    from sftcore.errors import UsageError
    from sftcore.run.outdir import CONFIG_FILE, SUMMARY_FILE

    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise UsageError(f"{path} has no {CONFIG_FILE}: pass the output directory of `sft run`")
    # The config is saved when training starts, summary.json last, after the final weights: weights
    # without it are a previous run's (--overwrite) or half written (a kill while saving).
    if not (Path(path) / SUMMARY_FILE).is_file():
        raise UsageError(
            f"{path}: its run did not finish (no {SUMMARY_FILE}), so it holds no final model; "
            f"continue it with `sft run --resume`, or pass another {flag}"
        )
    return cfg.effective(cfg.load_yaml(str(config_path)))
