"""Helpers shared by subcommands."""

from __future__ import annotations

import click

from sftcore.manager import Host, load_host
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
    type=click.Choice(["keep", "skip", "error"]),
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
