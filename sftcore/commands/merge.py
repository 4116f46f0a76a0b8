"""`sft merge`: an adapter run's adapter folded into its base, as a plain checkpoint."""

from __future__ import annotations

import click


@click.command("merge")
@click.argument("run", type=click.Path())
@click.option("--output", required=True, type=click.Path(), help="Directory for the merged model (new, or empty).")
@click.option("--base", type=click.Path(), help="The model RUN was trained from, if it has moved (default: its config's model).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def command(run: str, output: str, base: str | None, no_progress: bool) -> None:
    """Merge the adapter that `sft run --adapter` trained in RUN into the model it started from.

    --output gets a safetensors checkpoint and the run's tokenizer, which any transformers code
    loads without PEFT, and the run's records (sft_config.yaml, summary.json), so `sft generate
    --model OUTPUT` prompts it as training did. Its logits equal the adapter model's; a qlora run
    merges into the full-precision base. The merge runs in float32 on the CPU: memory for 4 bytes
    a parameter (32 GB for an 8B model).
    """
    from sftcore.commands.common import finished_run
    from sftcore.data.prepare import model_path
    from sftcore.model.adapters import adapter_base, merge
    from sftcore.model.weights import transformers_bars
    from sftcore.run.outdir import CONFIG_FILE, SUMMARY_FILE

    config = finished_run(run, "RUN")
    base = adapter_base(run, base or model_path(config))
    with transformers_bars(not no_progress):
        merge(run, base, output, records=(CONFIG_FILE, SUMMARY_FILE))
    click.echo(f"merged {run} into {output}")
