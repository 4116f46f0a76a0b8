"""`sft prepare`: tokenize and mask a data file into the prepared-data cache, ahead of `sft run`."""

from __future__ import annotations

import time

import click

from sftcore.commands.common import cache_dir_option, data_config, data_options


@click.command("prepare")
@data_options("Run config: prepare exactly what `sft run --config` trains on.")
@cache_dir_option
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Tokenizing processes.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def command(ctx: click.Context, config_file, tokenizer_path, workers, no_progress, **values) -> None:
    """Tokenize and mask a data file once; `sft run` with the same data, tokenizer, components and
    options then loads the result instead of tokenizing again.

    Give `sft run` the same --max-length, --on-bad-row and --on-duplicate (or the same
    --config): they are part of what the cache entry is for.
    """
    from sftcore.data.prepare import prepare_data
    from sftcore.run.summary import reasons

    host, config = data_config(ctx, config_file, tokenizer_path, values)
    started = time.perf_counter()
    data = prepare_data(host, config, progress=not no_progress, workers=workers)
    seconds = time.perf_counter() - started
    click.echo(
        f"rows: {len(data.rows)} prepared of {data.rows_read} read; skipped: {reasons(data.skipped)}; "
        f"dropped: {reasons(data.dropped)}; truncated: {reasons(data.truncated)}"
    )
    if data.turns:
        click.echo(f"turns: {reasons({k: v for k, v in data.turns.items() if v})}")
    click.echo(
        f"tokens: {data.tokens}, {data.supervised_tokens} supervised; max_length {config['max_length']}; "
        f"{seconds:.1f}s"
    )
