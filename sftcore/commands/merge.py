"""`sft merge`: an adapter run's adapter folded into its base, as a plain checkpoint."""

from __future__ import annotations

import click


@click.command("merge")
@click.argument("run", type=click.Path())
@click.option("--output", required=True, type=click.Path(), help="Directory for the merged model (new, or empty).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def command(run: str, output: str, no_progress: bool) -> None:
    """Merge the adapter that `sft run --adapter` trained in RUN into the model it started from.

    --output gets a safetensors checkpoint and the run's tokenizer, which any transformers code
    loads without PEFT; its logits equal the adapter model's.
    """
    from sftcore.commands.common import finished_run
    from sftcore.data.prepare import model_path
    from sftcore.model.adapters import merge
    from sftcore.model.weights import transformers_bars

    base = model_path(finished_run(run, "RUN"))
    with transformers_bars(not no_progress):
        merge(run, base, output)
    click.echo(f"merged {run} into {output}")
