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


@command.command("new")
@click.argument("name")
@click.option("--dir", "directory", default=".", type=click.Path(file_okay=False), help="Where to create sft-plugin-NAME/.")
@click.pass_context
def new(ctx: click.Context, name: str, directory: str) -> None:
    """Create sft-plugin-NAME/: a plugin distribution with one template and its test."""
    from sftcore.errors import UsageError
    from sftcore.scaffold import write_skeleton

    registry = host_from(ctx).registry
    if name in registry.names("template"):
        taken = registry.get("template", name).provided_by
        raise UsageError(f"template '{name}' is already provided by {taken}; pick another name")
    target = write_skeleton(name, directory)
    click.echo(f"Created {target}/ (entry point sft: {name}). Next:")
    click.echo(f"  pip install -e {target}\n  sft plugins\n  python -m pytest {target}")
