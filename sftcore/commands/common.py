"""Helpers shared by subcommands."""

from __future__ import annotations

import click

from sftcore.manager import Host, load_host


def host_from(ctx: click.Context) -> Host:
    """Load the plugins once per invocation; print one line per plugin problem."""
    obj = ctx.ensure_object(dict)
    if "host" not in obj:
        host = load_host(disable=obj.get("disabled", ()))
        for problem in host.problems:
            click.echo(f"Warning: {problem}", err=True)
        obj["host"] = host
    return obj["host"]
