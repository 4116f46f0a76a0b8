"""The `sft` command line: click wiring only. Each command lives in `sftcore.commands.<name>`
and is imported when it runs, so `sft --help` never imports torch."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

import sftcore
from sftcore.run.distributed import is_main_process
from sftcore.errors import SftError, one_line

COMMANDS = {
    "run": "train a model: data in, fine-tuned model out",
    "preview": "show the tokens a model will be trained on, masked and supervised",
    "generate": "answer an instruction with a trained model, using its training template",
    "merge": "fold an adapter run's adapter into its base model: a plain checkpoint",
    "prepare": "tokenize and mask a data file into the on-disk cache",
    "validate": "check a run config without loading a model; report every problem",
    "plugins": "list plugins and their components; scaffold a new plugin",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        try:
            module = importlib.import_module(f"sftcore.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"sftcore.commands.{name}":
                return None
            raise
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SftError as exc:
            if not exc.same_in_every_process or is_main_process():
                click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:  # Ctrl-C outside training, or a second one during it: no checkpoint
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except OSError as exc:  # the last resort: a disk, a mount or a permission the user can fix
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"Error: {where}{one_line(exc)}", err=True)
            ctx.exit(1)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(sftcore.__version__, prog_name="sft")
@click.option(
    "--disable-plugin",
    "disabled",
    multiple=True,
    metavar="NAME",
    help="Block a plugin by name (repeatable); SFT_DISABLE_PLUGINS=a,b does the same.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@click.pass_context
def cli(ctx: click.Context, disabled: tuple[str, ...], verbose: bool) -> None:
    """Supervised fine-tuning of causal language models, every stage a plugin.

    Run `sft run` with no arguments to train a tiny model on the bundled demo set.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="sft: %(message)s",
        stream=sys.stderr,
    )
    ctx.obj = {"disabled": disabled}


def main() -> None:
    cli(prog_name="sft")


if __name__ == "__main__":  # `python -m sftcore.cli`: how torchrun starts each worker of `sft run --nproc`
    main()
