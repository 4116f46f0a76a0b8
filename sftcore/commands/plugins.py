"""`sft plugins`: what is installed, which plugin provides each component, and its options."""

from __future__ import annotations

import inspect
import json
from typing import Any

import click

from sftcore.commands.common import host_from
from sftcore.options import HOST_OPTIONS, describe, signature
from sftcore.registry import Component

STAGE_ORDER = ("template", "masker", "collator", "loader", "adapter", "reader")
HOST_NOTE = "set by sft unless given"


def options_of(component: Component) -> dict[str, Any]:
    """The options a component's factory takes (``--STAGE-opt KEY=VALUE``), read from its signature.

    ``options`` is None when the factory has no signature to read; ``other_options`` says it
    also takes any other KEY (``**kwargs``). An option the host passes itself is marked ``set_by_host``.
    """
    sig = signature(component.factory)
    if sig is None:
        return {"options": None, "other_options": True}
    host = HOST_OPTIONS.get(component.stage, {})
    options = [
        {
            "name": name,
            "type": _type_name(sig.hints.get(name, p.annotation)),
            "required": p.default is p.empty,
            "default": None if p.default is p.empty else _plain(p.default),
            "set_by_host": name in host,
        }
        for name, p in sig.named.items()
    ]
    return {"options": options, "other_options": sig.takes_any}


def _type_name(hint: Any) -> str:
    if hint is inspect.Parameter.empty or hint is Any:
        return "any"
    return hint if isinstance(hint, str) else describe(hint)


def _plain(value: Any) -> Any:
    """A default as JSON holds it; anything else as its repr."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def option_lines(component: Component) -> list[str]:
    """The human listing of a component's options, one line each: name, default, type."""
    found = options_of(component)
    if found["options"] is None:
        return ["  (options not known: its factory has no signature to read)"]
    rows = [
        (o["name"], "required" if o["required"] else "= " + repr(o["default"]),
         o["type"] + (f"  ({HOST_NOTE})" if o["set_by_host"] else ""))
        for o in found["options"]
    ]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(2)]
    lines = [f"  {n.ljust(widths[0])}  {v.ljust(widths[1])}  {t}" for n, v, t in rows]
    if found["other_options"]:
        lines.append("  (and any other KEY: the factory takes **kwargs)")
    return lines or ["  (no options)"]


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
                            **options_of(c),
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
    # After the table, so each table row stays one line per component for anything that reads it.
    click.echo("\nOPTIONS (--STAGE-opt KEY=VALUE)")
    for c in components:
        click.echo(f"{c.stage} {c.name}:")
        for line in option_lines(c):
            click.echo(line)
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
