"""`sft validate`: every problem in a run config at once, without loading a model."""

from __future__ import annotations

import click

from sftcore import config as cfg
from sftcore.commands.common import config_from_cli, host_from


@click.command("validate")
@click.argument("config_file", type=click.Path())
@click.pass_context
def command(ctx: click.Context, config_file: str) -> None:
    """Check a YAML run config: keys, component names and options, files, training fields."""
    effective = cfg.effective(config_from_cli(config_file, {}, ()))  # the file as `sft run --config` takes it
    found = cfg.problems(effective, host_from(ctx).registry)
    if not found:
        click.echo(f"{config_file}: OK")
        return
    click.echo(f"{config_file}: {len(found)} problem{'s' if len(found) > 1 else ''}", err=True)
    for problem in found:
        click.echo(f"  - {problem}", err=True)
    ctx.exit(2)
