"""`sft plugins`: what is installed, which plugin provides each component."""

from __future__ import annotations

import json

import click

from sftcore.commands.common import host_from

STAGE_ORDER = ("template", "masker", "collator", "loader", "reader")


@click.group("plugins", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: plugins and components.")
@click.pass_context
def command(ctx: click.Context, as_json: bool) -> None:
    """List loaded plugins and the components they provide."""
    if ctx.invoked_subcommand is not None:
        return
    host = host_from(ctx)
    components = sorted(host.registry.all(), key=lambda c: (STAGE_ORDER.index(c.stage), c.name))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "plugins": [
                        {"name": p.name, "distribution": p.distribution, "version": p.version, "builtin": p.builtin}
                        for p in host.plugins
                    ],
                    "components": [
                        {
                            "stage": c.stage,
                            "name": c.name,
                            "plugin": c.plugin,
                            "distribution": c.distribution,
                            "version": c.version,
                            "description": c.description,
                        }
                        for c in components
                    ],
                    "problems": host.problems,
                    "blocked": host.blocked,
                },
                indent=2,
            )
        )
        return
    rows = [("STAGE", "NAME", "PROVIDED BY", "DESCRIPTION")]
    rows += [(c.stage, c.name, c.provided_by, c.description) for c in components]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    if host.blocked:
        click.echo(f"\nBlocked: {', '.join(host.blocked)}")
